"""Tune every loss on validation MAP@R with Optuna: ``python -m benchmarks.tune [options]``.

Each loss gets the same number of trials of Optuna's TPE sampler (fixed seed) over its
search space (its ``search_space`` in ``benchmarks/core/loss_registry.py``) and the same training budget (the dataset and training
options of ``python -m benchmarks.run``). A trial trains one run per seed with the
harness and scores it by the best validation MAP@R over its trained epochs, averaged over
seeds. The test split is dropped when the data is loaded: tuning never embeds it.

Studies live in an Optuna database (``--storage``, default SQLite ``<out>/tuning.db``):
a kill loses at most the trial in flight, rerunning continues, and several processes or
machines pointed at one database share the studies. Outputs under ``--out``: ``best.toml``
(read by ``python -m benchmarks.run --config``), ``tuning.md`` (every trial) and
``plots/<loss>.png``. A trial whose loss became NaN or infinite is recorded as pruned
(TPE ranks it below every completed trial); it counts toward the budget. Only distinct
settings count; a trial left running by a killed process is marked failed (at once on this
host, elsewhere once its heartbeat has been silent for ``core.tuning.STALE_AFTER_S`` seconds)
and its setting tried again.
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

from .core.console import quiet_known_warnings
from .core.launch import USER_ERRORS
from .core.loss_registry import DEFAULT_LOSSES, LOSSES, TUNABLE_LOSSES
from .core.settings import default_out, resolve
from .core.tuning import mask_credentials, parse_loss_names, tune
from .report.tuning_report import write_tuning

DEFAULT_TRIALS = 30


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tune",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tune each loss's hyperparameters on validation MAP@R with Optuna's TPE sampler; the test "
        "split is never loaded. Every other option is an option of `python -m benchmarks.run` (dataset, "
        "--epochs, --batch-size, --limit-per-class, --config, ...) and sets the training budget of a trial.",
        epilog="Search spaces:\n" + "\n".join(
            f"  {loss}: " + "; ".join(p.describe() for p in LOSSES[loss].search_space) for loss in TUNABLE_LOSSES),
    )
    add = parser.add_argument
    add("--losses", default=DEFAULT_LOSSES, metavar="NAMES", help=f"losses to tune (default: {DEFAULT_LOSSES})")
    add("--trials", type=int, default=DEFAULT_TRIALS, metavar="N", help=f"finished trials per loss (default {DEFAULT_TRIALS})")
    add("--seeds", type=int, default=1, metavar="K", help="training seeds 0..K-1 per trial, value = mean (default 1)")
    add("--sampler-seed", type=int, default=0, metavar="S", help="seed of the TPE sampler (default 0)")
    add("--out", metavar="DIR", help="output folder (default: results/tune-<dataset>)")
    add("--storage", metavar="URL", help="Optuna database URL shared by several processes or machines "
        "(default: sqlite:///<out>/tuning.db)")
    return parser


def say(*parts) -> None:
    print(*parts, flush=True)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = mask_credentials("python -m benchmarks.tune " + " ".join(shlex.quote(a) for a in argv))
    args, run_argv = build_parser().parse_known_args(argv)
    quiet_known_warnings()
    started = time.time()
    try:
        losses = parse_loss_names(args.losses)
        settings = resolve(run_argv)
        out = Path(args.out or default_out(settings.dataset, "tune"))
        tuning = tune(settings, losses, args.trials, args.seeds, out, args.storage, args.sampler_seed, say)
    except USER_ERRORS as error:
        print(mask_credentials(f"python -m benchmarks.tune: error: {error}"), file=sys.stderr)
        return 2
    toml = write_tuning(out, tuning, command)
    print(f"\n{time.time() - started:.0f} s; wrote {out / 'tuning.md'} and plots in {out / 'plots'}")
    print(f"{out / 'best.toml'}:\n{toml}" if toml else "no best.toml: a loss has no completed trial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
