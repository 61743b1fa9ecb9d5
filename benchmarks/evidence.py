"""The README's "Does ICE help?" table of a finished --out folder: ``python -m benchmarks.evidence DIR...``.

One row per loss: test MAP@R and P@1 at each run's best validation epoch (mean ± std over
seeds, in %), then the loss minus ICE over seed-paired runs (``report.seed_paired``: the
difference in points, its 95 % interval and p, and the smallest difference these seeds
detect), and a last line saying which losses are better than ICE, worse, or not
distinguishable from it. The first
row is the untrained model. Reads the run folders only; trains nothing.
"""

import argparse
import sys
from pathlib import Path
from typing import Dict, List

from .core.convergence import cap_note, capped_runs, convergence_lines
from .core.loss_registry import LOSSES
from .core.out_folder import OutFolder
from .core.metrics import PRIMARY_METRIC
from .report.comparisons import compare_losses
from .core.query_scores import load_run_scores
from .core.results import best_epoch_rows
from .report.mean_std import mean_std_text
from .report.tables import difference_text

METRIC_COLUMNS = (("MAP@R", PRIMARY_METRIC), ("P@1", "precision_at_1"))


def ice_table(out) -> str:
    """Markdown table of every loss in ``out`` against its ICE run (the first loss named ``ice``)."""
    folder = OutFolder(out)
    rows_by_run, run_folders, left_out = folder.finished_runs(epochs=0)  # the command was run to its end
    if not rows_by_run:
        raise ValueError(f"{out} holds no finished run")
    stored = folder.settings_of_runs()
    capped = capped_runs(rows_by_run, stored["epochs"], stored["patience"])
    registry_order = list(LOSSES)  # ICE first, then PML's losses in the harness's order
    labels = sorted({label for label, _ in rows_by_run},
                    key=lambda label: (registry_order.index(label.partition(":")[0]), label))
    ice = labels[0]
    if not ice.startswith("ice"):
        raise ValueError(f"{out} holds no ICE run to compare with")
    all_rows = [r for rows in rows_by_run.values() for r in rows]
    best = best_epoch_rows(all_rows)
    scores, without_scores = load_run_scores(run_folders)
    header = (["loss", "seeds"] + [name for name, _ in METRIC_COLUMNS]
              + [f"Δ{name} vs ICE [95 % CI], p" for name, _ in METRIC_COLUMNS] + ["detectable ΔMAP@R"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    untrained = list({r["seed"]: r for r in all_rows if r["epoch"] == 0}.values())
    lines.append("| untrained model | " + str(len(untrained)) + " | "
                 + " | ".join(mean_std_text(untrained, m) for _, m in METRIC_COLUMNS) + " | | | |")
    verdicts: Dict[str, List[str]] = {"better": [], "worse": [], "same": [], "untested": []}
    for label in labels:
        cells = [f"`{label}`", str(len(best[label]))] + [mean_std_text(best[label], m) for _, m in METRIC_COLUMNS]
        if label == ice:
            cells += ["", "", ""]
        else:
            comparisons = compare_losses(scores, label, ice)
            headline = comparisons[PRIMARY_METRIC].seeds
            cells += [difference_text(comparisons[m]) for _, m in METRIC_COLUMNS]
            cells.append(f"{100 * headline.detectable:.1f}" if headline else "")
            kind = "untested" if headline is None else (
                "same" if not headline.significant else ("better" if headline.mean > 0 else "worse"))
            verdicts[kind].append(label.partition(":")[0] + cap_note(label, capped))
        lines.append("| " + " | ".join(cells) + " |")
    summary = (f"On test MAP@R (seed-paired test), better than ICE: {', '.join(verdicts['better']) or 'none'}; "
               f"worse than ICE: {', '.join(verdicts['worse']) or 'none'}; no detectable difference: "
               f"{', '.join(verdicts['same']) or 'none'}.")
    if verdicts["untested"]:
        summary += f" Not tested (fewer than 2 seeds in common with ICE): {', '.join(verdicts['untested'])}."
    if stored["patience"] is None:
        summary = "Not trained to convergence (a fixed budget): no verdict about which loss is better."
    elif capped.get(ice, (0, 0))[0]:
        summary += f" ICE{cap_note(ice, capped)}."
    notes = [note for _, note in left_out] + list(without_scores.values())
    return "\n".join(lines + ["", *convergence_lines(capped, stored["epochs"], stored["patience"]), "", summary]
                     + [f"- left out: {note}" for note in notes])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evidence", description=__doc__.split("\n\n")[1])
    parser.add_argument("out", nargs="+", help="--out folders of python -m benchmarks.run")
    args = parser.parse_args(argv)
    for out in args.out:
        try:
            table = ice_table(Path(out))
        except ValueError as error:
            print(f"python -m benchmarks.evidence: error: {error}", file=sys.stderr)
            return 2
        print(f"{out}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
