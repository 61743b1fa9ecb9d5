"""Where one epoch's time goes, per loss: ``python -m benchmarks.epoch_cost [run options]``.

Trains each loss of ``--losses`` (seed 0, the test split never loaded) for ``--epochs``
epochs with the harness's own run, timing its phases (``benchmarks/core/epoch_profile.py``:
data, forward, loss, backward, optimizer, evaluation, bookkeeping), and prints the mean
seconds per epoch of each phase over the epochs after the first (the first also pays for
one-off set-up). Every other option is an option of ``python -m benchmarks.run``.
"""

import argparse
import shlex
import sys
from pathlib import Path

import torch

from .core.epoch_profile import PHASES, profile_epochs
from .storage.files import atomic_write_text
from .core.console import quiet_known_warnings
from .core.launch import USER_ERRORS
from .core.settings import UsageError, resolve
from .core.tuning import load_validation_data

PROG = "python -m benchmarks.epoch_cost"
DEFAULT_EPOCHS = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n", 1)[1], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", metavar="FILE", type=Path, help="also write the table to FILE")
    return parser


def cost_table(costs_by_loss) -> str:
    """Markdown: seconds per epoch of each phase (mean over the measured epochs) and the total."""
    lines = ["| loss | " + " | ".join(PHASES) + " | total |", "|---|" + "---:|" * (len(PHASES) + 1)]
    for label, costs in costs_by_loss.items():
        means = [sum(c.seconds[phase] for c in costs) / len(costs) for phase in PHASES]
        lines.append(f"| `{label}` | " + " | ".join(f"{m:.2f}" for m in means) + f" | {sum(means):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, run_argv = build_parser().parse_known_args(argv)
    quiet_known_warnings()
    try:
        if not any(a == "--epochs" or a.startswith("--epochs=") for a in run_argv):
            run_argv += ["--epochs", str(DEFAULT_EPOCHS)]
        settings = resolve(run_argv)
        if settings.epochs < 2:
            raise UsageError("--epochs must be at least 2: the first epoch pays for set-up and is not reported")
        data = load_validation_data(settings, Path("."), print)
    except USER_ERRORS as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    costs = {}
    for spec in settings.losses:
        costs[spec.label] = profile_epochs(settings, data, spec)[1:]
        print(f"{spec.label}: {sum(c.total for c in costs[spec.label]) / len(costs[spec.label]):.2f} s per epoch",
              flush=True)
    command = "python -m benchmarks.epoch_cost " + " ".join(shlex.quote(a) for a in argv)
    report = (f"Seconds per epoch (mean of epochs 2 to {settings.epochs}), {settings.dataset}, batch "
              f"{settings.batch_size}, {torch.get_num_threads()} thread(s), device {settings.device}; "
              f"`{command}`\n\n{cost_table(costs)}\n")
    print("\n" + report)
    if args.out is not None:
        atomic_write_text(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
