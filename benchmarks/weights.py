"""ICE's relative weight analysis of a finished run: ``python -m benchmarks.weights --out DIR``.

Embeds batches of validation images (``m_per_class`` per class, as in training) with the
untrained model of the run's seed and with its checkpoint, and plots, for several ``lam``,
the formulas of ``benchmarks/report/weight_analysis.py``: each positive pair's matching
probability ``p``, its weight ``w = exp(lam (1 - p))`` and its share of the gradient
``w (1 - p) / sum w (1 - p)``, and the share carried by the hardest 10 % of pairs.
Writes ``weights.png`` and ``weights.md`` into the run's folder.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler

from .core import loss_specs, settings
from .core.models import fresh_models
from .storage.files import BrokenFile, atomic_write_text
from .core.out_folder import OutFolder
from .core.run_store import RunStore
from .data.registry import DATASETS, load_dataset
from .report.plots import save_figure
from .report.weight_analysis import HARDEST_FRACTION, pair_weights, weights_and_pulls

FORMULAS = ("p = exp(-l),  l = softplus(logsumexp_neg Z - Z_pos);  w = exp(lam (1 - p));  "
            "share = w (1 - p) / sum w (1 - p)")


def run_settings(out: Path) -> settings.Settings:
    """The settings of the runs in ``out``, from its config.json."""
    stored = OutFolder(out).stored_settings()
    if stored is None:
        raise settings.UsageError(f"{out} has no config.json: not an output folder of benchmarks.run")
    if stored.get("dataset") not in DATASETS:
        raise settings.UsageError(f"{out / 'config.json'} names no dataset of this harness: not an output folder "
                                  "of benchmarks.run; give --out a folder that benchmarks.run wrote")
    resolved = settings.resolve(["--dataset", stored["dataset"], "--device", "cpu", "--out", str(out)])
    values = {k: v for k, v in stored.items() if k in settings.FIELDS}
    run = dataclasses.replace(resolved, **values)
    if run.freeze_trunk:
        raise settings.UsageError("runs with a frozen trunk (cached features) are not supported")
    return run


def find_run(out: Path, loss: str, seed: int):
    """(loss spec, checkpoint) of the run of ``loss`` (default: the first ICE run) and ``seed``."""
    folders = sorted(p.parent for p in (out / "runs").glob(f"*/seed{seed}/checkpoint.pth"))
    unreadable = []
    for folder in folders:
        stored = RunStore(folder).load(epochs=0, restart_broken=False)
        unreadable += [stored.note] if stored.note else []
        label = stored.key[0] if stored.key else ""
        if stored.checkpoint is not None and ((loss is None and label.startswith("ice")) or label == loss):
            return loss_specs.parse_loss_spec(label), stored.checkpoint
    raise settings.UsageError(f"no finished run of {loss or 'an ICE loss'} with seed {seed} under {out / 'runs'}"
                              + "".join(f"; {note}" for note in unreadable))


def embed_batches(trunk, embedder, dataset, run, num_batches, seed):
    """Embeddings and labels of ``num_batches`` sampled batches of ``dataset``."""
    sampler = MPerClassSampler(dataset.labels, run.m_per_class, batch_size=run.batch_size,
                               length_before_new_iter=run.batch_size * num_batches)
    np.random.seed(seed)  # PML's sampler draws from NumPy: the same batches for every model
    indices = list(sampler)
    trunk.eval(), embedder.eval()
    batches = []
    with torch.no_grad():
        for start in range(0, len(indices), run.batch_size):
            items = [dataset[i] for i in indices[start:start + run.batch_size]]
            images = torch.stack([torch.as_tensor(image) for image, _ in items])
            labels = torch.as_tensor([label for _, label in items])
            batches.append((embedder(trunk(images)), labels))
    return batches


def analyse(batches, scale, lams):
    """Pooled matching probabilities and, per lam, the mean hardest-10 % share over batches."""
    analyses = [pair_weights(embeddings, labels, scale, lams) for embeddings, labels in batches]
    probs = torch.cat([a.match_prob for a in analyses]).numpy()
    hardest = {lam: float(np.mean([a.hardest_share(lam) for a in analyses])) for lam in lams}
    return probs, hardest


def plot(path, results, lams, title):
    """p histograms, weight curves, and the hardest pairs' share against lam."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    grid = np.linspace(0, 1, 101)
    for name, (probs, hardest) in results.items():
        axes[0].hist(probs, bins=40, range=(0, 1), alpha=0.5, label=name)
        axes[2].plot(lams, [100 * hardest[lam] for lam in lams], marker="o", label=name)
    for lam in lams:
        _, pulls = weights_and_pulls(-torch.log(torch.from_numpy(grid)), lam)
        axes[1].plot(grid, pulls.numpy(), label=f"lam = {lam:g}")
    axes[0].set(xlabel="matching probability p of a positive pair", ylabel="pairs", title="p, untrained and trained")
    axes[1].set(xlabel="p", ylabel="w (1 - p), unnormalised pull", yscale="log", title="pull of a pair against p")
    axes[2].axhline(100 * HARDEST_FRACTION, color="grey", ls=":", label="equal shares")
    axes[2].set(xlabel="lam", ylabel="% of the gradient", title="share of the hardest 10 % of pairs")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"{title}\n{FORMULAS}", fontsize=9)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)
    plt.close(figure)


def report(results, lams, header):
    """weights.md: the settings, the formulas and a row per model."""
    lines = ["# Relative weight analysis", "", *header, "", f"Formulas: `{FORMULAS}`", "",
             "| model | pairs | median p | " + " | ".join(f"hardest 10 % share, lam {lam:g}" for lam in lams) + " |",
             "|---|---|---|" + "---|" * len(lams)]
    for name, (probs, hardest) in results.items():
        shares = " | ".join(f"{100 * hardest[lam]:.1f} %" for lam in lams)
        lines.append(f"| {name} | {len(probs)} | {np.median(probs):.3f} | {shares} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder of python -m benchmarks.run")
    parser.add_argument("--loss", default=None, help="loss label of the run (default: the first ICE run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    parser.add_argument("--lams", default="0,0.5,1,2,4", help="reweighting strengths (default 0,0.5,1,2,4)")
    parser.add_argument("--batches", type=int, default=8, help="validation batches to embed (default 8)")
    args = parser.parse_args(argv)
    try:
        args.lams = [float(x) for x in args.lams.split(",")]
    except ValueError:
        parser.error(f"--lams must be numbers like 0,1,2, got {args.lams!r}")
    if args.batches < 1 or any(lam < 0 for lam in args.lams):
        parser.error("--batches must be >= 1 and every lam >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run = run_settings(args.out)
        spec, checkpoint = find_run(args.out, args.loss, args.seed)
    except (settings.UsageError, BrokenFile) as error:
        print(f"python -m benchmarks.weights: {error}", file=sys.stderr)
        return 2
    scale = spec.describe_values().get("scale") or 1.0
    data = load_dataset(run.dataset, run.data_root, False, run.image_size, run.val, run.limit_per_class)
    results = {}
    for name, state in (("untrained", None), (f"trained (epoch {checkpoint['epoch']})", checkpoint["models"])):
        trunk, embedder = fresh_models(run, None, args.seed)
        if state is not None:
            trunk.load_state_dict(state["trunk"]), embedder.load_state_dict(state["embedder"])
        results[name] = analyse(embed_batches(trunk, embedder, data.val, run, args.batches, args.seed), scale, args.lams)
    folder = args.out / "runs" / spec.folder_name / f"seed{args.seed}"
    header = [f"- run: `{spec.label}`, seed {args.seed}, {args.out}", f"- scale of the analysis: {scale:g}",
              f"- {args.batches} validation batches of {run.batch_size} ({run.m_per_class} per class)"]
    plot(folder / "weights.png", results, args.lams, f"{spec.label}, seed {args.seed}, scale {scale:g}")
    text = report(results, args.lams, header)
    atomic_write_text(folder / "weights.md", text)
    print(text + f"\nWrote {folder / 'weights.png'} and {folder / 'weights.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
