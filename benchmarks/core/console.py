"""What a person sees: one overall progress bar with an ETA, one line per run, the final table.

``--verbose`` adds a line per evaluated epoch, ``--quiet`` prints only the final table.
PML's own per-iteration bars (trainer and tester) are turned off.
"""

import functools
import logging
import sys
import types
import warnings

import tqdm
from pytorch_metric_learning.testers import base_tester
from pytorch_metric_learning.trainers import base_trainer

from .metrics import PRIMARY_METRIC
from .results import best_epoch_rows


def silence_pml_progress_bars() -> None:
    """PML's trainer and tester draw a tqdm bar per epoch and per evaluation: make them silent."""
    silent = types.SimpleNamespace(tqdm=functools.partial(tqdm.tqdm, disable=True))
    base_trainer.tqdm = silent
    base_tester.tqdm = silent


class _DropFrozenTrunkWarning(logging.Filter):
    """A frozen (cached-feature) trunk has no optimizer by design; PML warns about it."""

    def filter(self, record):
        return 'missing "trunk_optimizer"' not in record.getMessage()


def quiet_known_warnings() -> None:
    # PML's progress bar formats the loss tensor itself; DDP's buffers are kept rank-local on purpose.
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated")
    pml_logger = logging.getLogger("PML")
    if not any(isinstance(f, _DropFrozenTrunkWarning) for f in pml_logger.filters):
        pml_logger.addFilter(_DropFrozenTrunkWarning())
    silence_pml_progress_bars()


def _percent(row, key) -> str:
    return f"{100 * row[key]:.1f}"


class Console:
    """Printing for rank 0; other ranks print nothing."""

    def __init__(self, enabled: bool, verbose: bool, quiet: bool):
        self.enabled, self.verbose, self.quiet = enabled, verbose, quiet
        self.bar = None

    def say(self, text: str) -> None:
        """A line for people (not under --quiet)."""
        if self.enabled and not self.quiet:
            (self.bar.write if self.bar is not None else print)(text)
            sys.stdout.flush()

    def result(self, text: str) -> None:
        """The final output (also under --quiet)."""
        if self.enabled:
            print(text, flush=True)

    def start(self, total_epochs: int) -> None:
        """The overall bar over every epoch to evaluate (drawn only on a terminal)."""
        if self.enabled and not self.quiet and total_epochs:
            self.bar = tqdm.tqdm(total=total_epochs, unit="epoch", desc="all runs", dynamic_ncols=True,
                                 disable=None, leave=False)

    def advance(self, epochs: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(epochs)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def epoch(self, row: dict) -> None:
        if self.verbose:
            tested = f", test MAP@R {_percent(row, PRIMARY_METRIC)}" if PRIMARY_METRIC in row else ""
            self.say(f"    {row['loss']} seed {row['seed']} epoch {row['epoch']}: "
                     f"val MAP@R {_percent(row, 'val_' + PRIMARY_METRIC)}{tested}")

    def run_done(self, label: str, seed: int, rows, seconds, note: str = "") -> None:
        """One line per run: best validation epoch with its validation and test MAP@R, wall time."""
        if not rows:
            self.say(f"{label} seed {seed}: no evaluated epoch {note}".rstrip())
            return
        best = best_epoch_rows(rows)[label][0]
        took = f", {seconds:.1f} s" if seconds is not None else ""
        self.say(f"{label} seed {seed}: best epoch {best['epoch']}, val MAP@R {_percent(best, 'val_' + PRIMARY_METRIC)}, "
                 f"test MAP@R {_percent(best, PRIMARY_METRIC)}{took}{note}")
