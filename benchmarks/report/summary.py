"""summary.md, rebuilt from the rows of every run, and the statistics it shares with other reports."""

from typing import Dict, List, Sequence, Tuple

from ..core.convergence import capped_runs, convergence_lines
from ..core.experiment import Finished
from ..core.metrics import METRICS, PRIMARY_METRIC, SHORT_NAMES
from ..core.query_scores import load_run_scores
from ..core.results import best_epoch_rows, sort_rows
from ..storage.files import atomic_write_text
from .mean_std import mean_std
from .plots import write_plots
from .tables import comparison_table


def summary_table(rows: Sequence[dict], loss_order: Sequence[str]) -> str:
    """Markdown table: mean ± std over seeds of the test metrics at the best validation epoch."""
    best = best_epoch_rows(rows)
    header = ["loss", "seeds", "best epoch"] + [SHORT_NAMES[m] for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    def line(name, chosen, epoch_text):
        cells = [name, str(len(chosen)), epoch_text]
        for metric in METRICS:
            mean, std = mean_std([r[metric] * 100 for r in chosen])
            cells.append(f"{mean:.1f} ± {std:.1f}")
        return "| " + " | ".join(cells) + " |"

    # The untrained model (epoch 0) is the same for every loss of a seed: one baseline row.
    untrained = {r["seed"]: r for r in rows if r["epoch"] == 0}
    if untrained:
        lines.append(line("untrained model", list(untrained.values()), "0"))
    for loss in [l for l in loss_order if l in best]:
        chosen = best[loss]
        lines.append(line(f"`{loss}`", chosen, f"{mean_std([r['epoch'] for r in chosen])[0]:.1f}"))
    return "\n".join(lines)


def write_summary(path, rows, loss_order, header_lines: Sequence[str], failures: Dict[Tuple[str, int], str],
                  comparison: str = "", left_out: Sequence[str] = ()) -> str:
    """Write summary.md atomically (unless ``path`` is None) and return the table of ``rows``; ``failures`` maps
    (loss, seed) of each failed run, whose rows the caller leaves out, to its error;
    ``comparison`` is the markdown of ``tables.comparison_table``; ``left_out``: notes on the
    runs left out of the table or the comparisons (files missing or unreadable)."""
    table = summary_table(rows, loss_order)
    parts = ["# Benchmark summary", "", *header_lines, "",
             "Test metrics (%) at each run's best validation epoch (validation MAP@R), "
             "mean ± standard deviation over seeds.", "", table, ""]
    if comparison:  # significance: paired tests over test queries
        parts += ["## Paired comparisons (test queries, best validation epoch)", "", comparison, ""]
    if failures:
        parts += ["## Failed runs (left out of the table)", ""]
        parts += [f"- `{loss}` seed {seed}: {error}" for (loss, seed), error in sorted(failures.items())] + [""]
    if left_out:
        parts += ["## Left out (files missing or unreadable)", "", *(f"- {note}" for note in left_out), ""]
    if path is not None:
        atomic_write_text(path, "\n".join(parts))
    return table


def publish_summary(finished: Finished) -> None:
    """results.csv, summary.md and the plots of a finished experiment, and the table, comparisons,
    failures and left-out runs on its console. Failed runs stay out of the table, plots and paired
    comparisons, runs without readable test scores out of the comparisons; the summary counts
    the runs the epoch cap stopped (``core.convergence``)."""
    folder, settings, console, labels = finished.folder, finished.settings, finished.console, finished.labels
    folder.publish_rows(finished.rows_by_run, labels)
    kept_runs = sorted((key for key in finished.rows_by_run if key not in finished.failures),
                       key=lambda key: (labels.index(key[0]), key[1]))
    kept = sort_rows([r for key in kept_runs for r in finished.rows_by_run[key]], labels)
    capped = capped_runs({key: finished.rows_by_run[key] for key in kept_runs}, settings.epochs, settings.patience)
    # significance: each loss against ICE and against the best loss, paired by seed
    scores, without_scores = load_run_scores({key: finished.run_folders[key] for key in kept_runs})
    left_out = [*finished.left_out, *without_scores.values()]
    ice_label = next((label for label in scores if label.partition(":")[0] == "ice"), None)
    comparison = comparison_table(scores, ice_label, capped, converged=settings.patience is not None)
    header = finished.header + [line for text in convergence_lines(capped, settings.epochs, settings.patience)
                                for line in ("", text)]
    table = write_summary(None if folder.read_only else folder.summary, kept, labels, header, finished.failures,
                          comparison, left_out)
    plots = write_plots(folder.path / "plots", kept, labels) if kept and not folder.read_only else []
    console.result("\nTest metrics (%) at each run's best validation epoch, mean ± std over seeds:\n")
    console.result(table)
    if comparison:
        console.result("\n" + comparison)
    if finished.failures:
        console.say("\nFailed runs (left out of the table and plots):\n" + "\n".join(
            f"  {label} seed {seed}: {error}" for (label, seed), error in finished.failures.items()))
    if left_out:
        console.result("\nLeft out (files missing or unreadable):\n" + "\n".join(f"  {note}" for note in left_out))
    if folder.read_only:
        console.say(f"\n{folder.path} cannot be written: nothing was updated there")
    else:
        console.say(f"\nWrote {folder.results_csv}, {folder.summary}, " + ", ".join(map(str, plots)))
