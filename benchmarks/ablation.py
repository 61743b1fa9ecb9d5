"""The paper's ablation of ICE's reweighting and scale: ``python -m benchmarks.ablation [options]``.

Around the tuned ICE of ``--losses`` (default: the dataset's tuned settings), train

- "lam": every lam of ``LAMS`` with each normalization of ``NORMALIZATIONS``, at the tuned
  scale (lam = 0 once: every weight is 1, so both normalizations are the same loss);
- "scale": every scale of ``SCALES`` (and the tuned one) at the tuned lam and normalization;
  (``--groups`` chooses them, default both)

``--seeds`` seeds each (default 5), as ``python -m benchmarks.run`` would, in ``--out`` (default
``results/ablation-<dataset>``; rerunning resumes). Then it writes ``ablation.md``: test
MAP@R and P@1 at each run's best validation epoch (mean ± std over seeds), the setting that
validation picks in each group, and each lam > 0 against lam = 0 of its normalization,
paired by seed (``report.comparisons.compare_losses``); and ``ablation.png``.
Every other option is an option of ``benchmarks.run`` (dataset, budget, ``--config``).
"""

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from pml_ice.reducers.ice_reweight_reducer import NORMALIZATIONS

from .core.convergence import capped_runs, convergence_lines
from .storage.files import atomic_write_text
from .core.console import quiet_known_warnings
from .core.launch import run_experiment
from .core.loss_specs import LossSpec, make_loss_spec
from .core.out_folder import OutFolder
from .core.settings import Settings, UsageError, default_out, resolve
from .core.metrics import PRIMARY_METRIC
from .report.comparisons import compare_losses
from .report.plots import save_figure
from .report.summary import publish_summary
from .core.query_scores import QUERY_METRICS
from .report.mean_std import mean_std, mean_std_text
from .report.tables import difference_text

LAMS = (0, 0.5, 1, 2, 4)
SCALES = (2, 4, 8, 16, 32, 64)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One ablated ICE: its hyperparameters and its spec."""

    scale: float
    lam: float
    normalize: str

    @property
    def spec(self) -> LossSpec:
        return make_loss_spec("ice", {"lam": self.lam, "normalize": self.normalize, "scale": self.scale})


def tuned_ice(settings: Settings) -> Setting:
    """The first ICE spec of the settings' losses, as the centre of the ablation."""
    ice = next((spec for spec in settings.losses if spec.name == "ice"), None)
    if ice is None:
        raise UsageError("--losses names no ICE spec to ablate around, e.g. --losses ice:scale=16,lam=1")
    values = ice.describe_values()
    return Setting(float(values["scale"]), float(values["lam"]), values["normalize"])


def grid(centre: Setting, groups: Sequence[str] = ("lam", "scale")) -> Dict[str, List[Setting]]:
    """The groups of the ablation: the lam x normalization grid ("lam") and the scale sweep ("scale")."""
    no_reweighting = Setting(centre.scale, 0, NORMALIZATIONS[0])  # all weights 1: both normalizations agree
    lam_grid = [no_reweighting] + [Setting(centre.scale, lam, normalize)
                                   for normalize in NORMALIZATIONS for lam in LAMS if lam > 0]
    scales = sorted(set(SCALES) | {centre.scale})
    both = {"lam": lam_grid, "scale": [dataclasses.replace(centre, scale=s) for s in scales]}
    return {group: both[group] for group in groups}


def groups_of(text: str) -> Tuple[str, ...]:
    chosen = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not chosen or set(chosen) - {"lam", "scale"}:
        raise argparse.ArgumentTypeError(f"--groups takes lam and/or scale separated by a comma, got {text!r}")
    return chosen


GROUP_TITLES = {"lam": "## lam and normalize, at the tuned scale",
                "scale": "## scale, at lam {centre.lam:g} and normalize {centre.normalize}"}


def all_settings(groups: Dict[str, List[Setting]]) -> List[Setting]:
    return list(dict.fromkeys(s for group in groups.values() for s in group))


def collect(folder: OutFolder, settings: Sequence[Setting], seeds: int, epochs: int):
    """Best-validation-epoch rows and per-query test scores of each finished setting, and notes
    on the runs left out (``OutFolder.best_epochs``)."""
    wanted = {(setting.spec.label, seed) for setting in settings for seed in range(seeds)}
    return folder.best_epochs(epochs, wanted.__contains__)


def group_table(group: str, settings: Sequence[Setting], best, scores) -> List[str]:
    """Markdown rows of one group; '*' marks the best validation MAP@R; lam > 0 is compared
    with lam = 0 of its normalization (seed-paired test)."""
    header = ["normalize", "lam", "scale", "seeds", "val MAP@R", "test MAP@R", "test P@1"]
    if group == "lam":
        header += ["ΔMAP@R vs lam = 0 [95 % CI], p", "ΔP@1 vs lam = 0 [95 % CI], p"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    found = [s for s in settings if s.spec.label in best]
    if not found:
        return lines
    picked = max(found, key=lambda s: mean_std([r["val_" + PRIMARY_METRIC] for r in best[s.spec.label]])[0])
    for setting in found:
        label, chosen = setting.spec.label, best[setting.spec.label]
        reference = Setting(setting.scale, 0, NORMALIZATIONS[0]).spec.label
        comparisons = ["", ""] if group == "lam" else []
        if group == "lam" and setting.lam > 0 and reference in scores and label in scores:
            differences = compare_losses(scores, label, reference)
            comparisons = [difference_text(differences[m]) for m in QUERY_METRICS]
        marker = " *" if setting == picked else ""
        cells = [setting.normalize, f"{setting.lam:g}", f"{setting.scale:g}{marker}", str(len(chosen)),
                 mean_std_text(chosen, "val_" + PRIMARY_METRIC), mean_std_text(chosen, PRIMARY_METRIC), mean_std_text(chosen, "precision_at_1")]
        lines.append("| " + " | ".join(cells + comparisons) + " |")
    return lines


def write_plot(path: Path, groups: Dict[str, List[Setting]], best) -> None:
    """Test and validation MAP@R against lam (one line per normalization) and against scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    panels = dict(zip(groups, axes[0]))

    def draw(ax, points: Sequence[Tuple[float, str]], name: str, colour: str):
        for split, style in ((PRIMARY_METRIC, "-o"), ("val_" + PRIMARY_METRIC, "--s")):
            kept = [(x, mean_std([100 * r[split] for r in best[label]])) for x, label in points if label in best]
            if kept:
                ax.errorbar([x for x, _ in kept], [m for _, (m, _) in kept], yerr=[s for _, (_, s) in kept], fmt=style,
                            color=colour, capsize=3, label=f"{name}, {'test' if split == PRIMARY_METRIC else 'validation'}")
    if "lam" in panels:
        for normalize, colour in zip(NORMALIZATIONS, ("tab:blue", "tab:orange")):
            points = [(s.lam, s.spec.label) for s in groups["lam"] if s.normalize == normalize or s.lam == 0]
            draw(panels["lam"], points, f"normalize={normalize}", colour)
        panels["lam"].set_xlabel("lam")
    if "scale" in panels:
        by_scale, centre = panels["scale"], groups["scale"][0]
        draw(by_scale, [(s.scale, s.spec.label) for s in groups["scale"]], f"lam={centre.lam:g}, {centre.normalize}",
             "tab:green")
        by_scale.set_xlabel("scale")
        by_scale.set_xscale("log")
        by_scale.minorticks_off()
        by_scale.set_xticks([s.scale for s in groups["scale"]], [f"{s.scale:g}" for s in groups["scale"]])
        by_scale.tick_params(axis="x", labelrotation=45)
    for ax in panels.values():
        ax.set_ylabel("MAP@R (%), mean ± std over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_report(out: Path, settings: Settings, centre: Setting, seeds: int, command: str,
                 group_names: Sequence[str] = ("lam", "scale")) -> str:
    groups = grid(centre, group_names)
    folder = OutFolder(out)
    best, scores, left_out = collect(folder, all_settings(groups), seeds, settings.epochs)
    wanted = {(setting.spec.label, seed) for setting in all_settings(groups) for seed in range(seeds)}
    rows_by_run = {key: rows for key, rows in folder.finished_runs(settings.epochs)[0].items() if key in wanted}
    convergence = convergence_lines(capped_runs(rows_by_run, settings.epochs, settings.patience), settings.epochs,
                                    settings.patience)
    parts = ["# ICE ablation: the reweighting (lam, normalize) and the scale", "", f"Command: `{command}`", "",
             f"- dataset {settings.dataset}, model {settings.model}, up to {settings.epochs} epochs (patience "
             f"{settings.patience}), batch "
             f"{settings.batch_size} ({settings.m_per_class} per class), lr {settings.lr}; seeds 0..{seeds - 1}",
             f"- centre (the tuned ICE): scale {centre.scale:g}, lam {centre.lam:g}, normalize {centre.normalize}",
             *(f"- {line}" for line in convergence),
             "- metrics at each run's best validation epoch, in %, mean ± std over seeds; `*` marks the setting "
             "with the best validation MAP@R in its group (the one validation selects)",
             "- Δ vs lam = 0: the same scale with lam = 0 (no reweighting: every weight is 1, so "
             "the normalizations agree and lam = 0 is trained once), paired by seed; "
             "95 % interval and p of the seed-paired test (training runs and test queries), no multiplicity correction",
             *(f"- left out: {note}" for note in left_out),
             *(line for group in groups for line in (
                 "", GROUP_TITLES[group].format(centre=centre), "", *group_table(group, groups[group], best, scores))),
             "", "![ablation](ablation.png)", ""]
    text = "\n".join(parts)
    atomic_write_text(out / "ablation.md", text)
    write_plot(out / "ablation.png", groups, best)
    return text


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python -m benchmarks.ablation " + " ".join(shlex.quote(a) for a in argv)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ablation", description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, metavar="K", help="seeds 0..K-1 per setting (default 5)")
    parser.add_argument("--groups", type=groups_of, default=("lam", "scale"), metavar="G,G",
                        help="which groups to train and report: lam (lam x normalize), scale (the scale sweep); "
                        "default both")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: results/ablation-<dataset>)")
    args, run_argv = parser.parse_known_args(argv)
    quiet_known_warnings()
    try:
        settings = resolve(run_argv)
        centre = tuned_ice(settings)
        out = Path(args.out or default_out(settings.dataset, "ablation"))
        experiment = resolve(run_argv + ["--seeds", str(args.seeds), "--out", str(out)])
    except UsageError as error:
        print(f"python -m benchmarks.ablation: error: {error}", file=sys.stderr)
        return 2
    specs = tuple(s.spec for s in all_settings(grid(centre, args.groups)))
    status = run_experiment(dataclasses.replace(experiment, losses=specs), "python -m benchmarks.ablation",
                            publish_summary)
    if status:
        return status
    print("\n" + write_report(out, settings, centre, args.seeds, command, args.groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
