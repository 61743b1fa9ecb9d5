"""The results of runs: one row per (loss, seed, evaluated epoch), results.csv, and the row of a
run's best validation epoch, the epoch every table reports."""

import csv
import io
import math
from typing import Dict, List, Sequence

from ..storage.files import atomic_write_text
from .metrics import METRICS, PRIMARY_METRIC

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
