"""ICE's library defaults, chosen on validation over several datasets:
``python -m benchmarks.defaults TUNE_DIR [TUNE_DIR ...] [--top K] [--out DIR]``.

Each ``TUNE_DIR`` is a finished ``python -m benchmarks.tune`` folder of one dataset with an
ICE study. The candidates are the best ``--top`` completed ICE trials of every study; each
is trained on every dataset where its study did not complete it (seed 0, that dataset's
tuning budget, not pruned; ``benchmarks/core/defaults.py``). The default is the candidate
whose worst shortfall, the drop in validation MAP@R from the dataset's best ICE trial, is
smallest. Writes ``defaults.md`` and the cache of trained values ``validation.json`` in
``--out`` (default ``results/defaults``); rerunning reuses the cache.
"""

import argparse
import shlex
import sys
from pathlib import Path

from .core.defaults import candidates, choose, read_tuned_dataset, shortfalls, validation_values
from .storage.files import atomic_write_text
from .core.console import quiet_known_warnings
from .core.launch import USER_ERRORS

PROG = "python -m benchmarks.defaults"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n", 1)[1], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tuned", nargs="+", type=Path, metavar="TUNE_DIR", help="--out folders of benchmarks.tune")
    parser.add_argument("--top", type=int, default=3, metavar="K", help="candidates per dataset (default 3)")
    parser.add_argument("--out", type=Path, default=Path("results/defaults"), metavar="DIR",
                        help="output folder (default results/defaults)")
    return parser


def report(datasets, falls, chosen, command) -> str:
    names = [d.name for d in datasets]
    lines = ["| ICE setting | " + " | ".join(f"shortfall on {n}" for n in names) + " | worst | mean |",
             "|---|" + "---:|" * (len(names) + 2)]
    for label, by_dataset in sorted(falls.items(), key=lambda item: max(item[1].values())):
        cells = [f"{100 * by_dataset[n]:.2f}" for n in names]
        worst, mean = max(by_dataset.values()), sum(by_dataset.values()) / len(by_dataset)
        marker = " (chosen)" if label == chosen else ""
        lines.append(f"| `{label}`{marker} | " + " | ".join(cells) + f" | {100 * worst:.2f} | {100 * mean:.2f} |")
    best = "; ".join(f"{d.name} {100 * d.best:.2f}" for d in datasets)
    return "\n".join([
        "# ICE's defaults: the smallest worst-case shortfall on validation", "", f"Command: `{command}`", "",
        "Shortfall: the best ICE trial's validation MAP@R on the dataset minus the setting's, in points "
        f"(best trials: {best}). Candidates: the best completed ICE trials of each dataset's study.", "",
        *lines, "", f"Chosen: `{chosen}`.", ""])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    quiet_known_warnings()
    try:
        if args.top < 1:
            raise ValueError(f"--top must be at least 1, got {args.top}")
        datasets = [read_tuned_dataset(folder) for folder in args.tuned]
        if len({d.name for d in datasets}) < len(datasets):
            raise ValueError("give each dataset's tuning folder once")
        labels = candidates(datasets, args.top)
        values = validation_values(datasets, labels, args.out / "validation.json", print)
    except USER_ERRORS as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    falls = shortfalls(datasets, values)
    chosen = choose(falls)
    text = report(datasets, falls, chosen, PROG + " " + " ".join(shlex.quote(a) for a in argv))
    atomic_write_text(args.out / "defaults.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
