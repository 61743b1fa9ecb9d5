"""results.csv and summary.md, rebuilt from the rows of every run; the statistics they share."""

import csv
import io
import math
from typing import Dict, List, Sequence, Tuple

from ..core.files import atomic_write_text
from .metrics import METRICS, PRIMARY_METRIC, SHORT_NAMES

COLUMNS = ["loss", "seed", "epoch", *METRICS, *("val_" + m for m in METRICS)]


def sort_rows(rows: Sequence[dict], loss_order: Sequence[str]) -> List[dict]:
    order = {label: i for i, label in enumerate(loss_order)}
    return sorted(rows, key=lambda r: (order[r["loss"]], r["seed"], r["epoch"]))


def write_results_csv(path, rows: Sequence[dict]) -> None:
    """Write ``rows`` (one per loss, seed and evaluated epoch) atomically; test cells are empty
    where the test split was not evaluated (every trained epoch but the best)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in COLUMNS})
    atomic_write_text(path, buffer.getvalue())


def best_row(run_rows: Sequence[dict]) -> dict:
    """The row of one run's best validation epoch (earliest on ties): the epoch every table reports."""
    key = "val_" + PRIMARY_METRIC
    return max(run_rows, key=lambda r: (_finite(r[key]), -r["epoch"]))


def best_epoch_rows(rows: Sequence[dict]) -> Dict[str, List[dict]]:
    """Per loss, the row of each seed's best validation epoch."""
    by_run: Dict[tuple, List[dict]] = {}
    for row in rows:
        by_run.setdefault((row["loss"], row["seed"]), []).append(row)
    best: Dict[str, List[dict]] = {}
    for (loss, _), run_rows in by_run.items():
        best.setdefault(loss, []).append(best_row(run_rows))
    return best


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def mean_std(values: Sequence[float]):
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def mean_std_text(rows: Sequence[dict], metric: str) -> str:
    """``"mean ± std"`` of a metric over rows, in %."""
    mean, std = mean_std([100 * r[metric] for r in rows])
    return f"{mean:.1f} ± {std:.1f}"


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
