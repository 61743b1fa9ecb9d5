"""When a run counts as trained to convergence, and what a table says about it.

A run stops early once its validation MAP@R has not improved for more than ``patience``
evaluations (PML's rule: epoch - best epoch > patience); the epoch cap (``--epochs``) is a
safety net. Until a trained epoch beats the untrained model (epoch 0), the run is warming
up: it neither stops early nor decays its learning rate, since a loss whose first epochs
score below the initial weights (trainable proxies still random) has not reached a plateau.
A run that reached the cap before the patience rule stopped it, or still warming up, was
stopped by the cap: its model may still have been improving. Without a patience
(``--patience -1``) every run trains exactly ``--epochs`` epochs: a fixed budget, not
trained to convergence.
"""

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .results import best_row

# The protocol's bound: the cap may stop at most this fraction of the runs of a published table.
MOST_CAPPED = 0.1


def warming_up(run_rows: Sequence[dict]) -> bool:
    """Whether no trained epoch of a run's rows (epoch 0 included) has beaten the untrained
    model's validation MAP@R yet."""
    return best_row(run_rows)["epoch"] == 0


def stopped_by_cap(run_rows: Sequence[dict], epochs: int, patience: Optional[int]) -> bool:
    """Whether a run's rows (one per evaluated epoch, epoch 0 included) end at the cap ``epochs``
    still warming up or before ``patience`` evaluations without improvement had stopped it."""
    if max(row["epoch"] for row in run_rows) < epochs:
        return False
    return patience is None or warming_up(run_rows) or epochs - best_row(run_rows)["epoch"] <= patience


def capped_runs(rows_by_run: Mapping[Tuple[str, int], Sequence[dict]], epochs: int,
                patience: Optional[int]) -> Dict[str, Tuple[int, int]]:
    """Per loss label: (runs stopped by the cap, runs)."""
    counts: Dict[str, List[int]] = {}
    for (label, _), rows in rows_by_run.items():
        if rows:
            count = counts.setdefault(label, [0, 0])
            count[0] += stopped_by_cap(rows, epochs, patience)
            count[1] += 1
    return {label: (capped, total) for label, (capped, total) in counts.items()}


def convergence_lines(counts: Mapping[str, Tuple[int, int]], epochs: int, patience: Optional[int]) -> List[str]:
    """The summary's line ``runs stopped by the epoch cap: K of N`` and what it means for the table."""
    capped = sum(k for k, _ in counts.values())
    total = sum(n for _, n in counts.values())
    lines = [f"runs stopped by the epoch cap: {capped} of {total}"]
    if patience is None:
        lines.append(f"Fixed budget of {epochs} epochs without early stopping: these models were not trained to "
                     "convergence, and no verdict about which loss is better is drawn from them.")
    elif capped > MOST_CAPPED * total:
        lines.append(f"More than a tenth of the runs reached the cap of {epochs} epochs while validation MAP@R "
                     "was still improving: this table does not meet the protocol's convergence rule (raise "
                     "--epochs and rerun to extend the runs).")
    return lines


def cap_note(label: str, counts: Mapping[str, Tuple[int, int]]) -> str:
    """`` (`label`: K of N runs stopped by the epoch cap)`` when the cap stopped any of its runs."""
    capped, total = counts.get(label, (0, 0))
    return f" (`{label}`: {capped} of {total} runs stopped by the epoch cap)" if capped else ""
