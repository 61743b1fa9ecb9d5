"""Compare ICE with PML's losses: ``python -m benchmarks.run [options]``.

Trains one embedding model per (loss, seed) with PML's MetricLossOnly trainer, evaluates
it with PML's GlobalEmbeddingSpaceTester after every epoch, and writes results.csv,
summary.md, plots and per-run record-keeper logs under --out. Rerunning the same command
skips finished runs and resumes interrupted ones. Under ``torchrun --nproc_per_node=N``
it trains with DistributedDataParallel and PML's DistributedLossWrapper.
"""

import sys

from .core.console import Console, quiet_known_warnings
from .core.launch import refuse, run_experiment
from .core.settings import UsageError, resolve
from .report.summary import publish_summary

PROG = "python -m benchmarks.run"


def main(argv=None) -> int:
    quiet_known_warnings()
    try:
        settings = resolve(argv)
    except UsageError as error:
        return refuse(PROG, error, Console(enabled=True, verbose=False, quiet=False))
    return run_experiment(settings, PROG, publish_summary)


if __name__ == "__main__":
    sys.exit(main())
