"""Two output folders compared loss by loss: ``python -m benchmarks.compare A B [--out FILE]``.

For every loss (by name: ``ice``, ``ntxent``, ...; its settings may differ between
the folders) with finished runs in both: test MAP@R and P@1 at each run's best validation
epoch, and A minus B by the seed-paired test that gives every verdict of the harness. It is
made for one experiment at two settings (batch size, epochs, model, ...): the runs of both
folders must have been tested on the same queries (same dataset and split), or it refuses.
A seed fixes the initial weights wherever the model is the same; the batches differ where the
batch size does. The folders are only read; ``--out FILE`` also writes the report to FILE.
"""

import argparse
import shlex
import sys
from pathlib import Path
from typing import Dict, List

from .core.convergence import cap_note, capped_runs, convergence_lines
from .storage.files import BrokenFile, atomic_write_text
from .core.out_folder import OutFolder
from .core.settings import UsageError
from .report.comparisons import compare_losses
from .core.metrics import PRIMARY_METRIC, SHORT_NAMES
from .core.query_scores import QUERY_METRICS
from .report.mean_std import mean_std_text
from .report.tables import difference_text, verdict


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n", 1)[1],
                                     allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", metavar="A", type=Path, help="an --out folder of benchmarks.run")
    parser.add_argument("b", metavar="B", type=Path, help="another one, with runs tested on the same queries")
    parser.add_argument("--out", metavar="FILE", type=Path, help="also write the report to FILE")
    return parser


class Folder:
    """The settings (config.json) of an output folder and, per loss name, its one tuned label,
    the best-validation-epoch rows of its finished runs and their test scores; notes on the
    runs left out (unreadable files, failed or unfinished runs)."""

    def __init__(self, path: Path):
        self.path = path
        folder = OutFolder(path)
        self.settings = folder.settings_of_runs()
        self.best, self.scores, self.left_out = folder.best_epochs(self.settings["epochs"])
        self.capped = capped_runs(folder.finished_runs(self.settings["epochs"])[0], self.settings["epochs"],
                                  self.settings["patience"])
        self.labels: Dict[str, str] = {}
        for label in self.best:
            name = label.partition(":")[0]
            if name in self.labels:
                raise UsageError(f"{path} holds two settings of {name} ({self.labels[name]} and {label}); "
                                 "this command compares folders with one setting per loss")
            self.labels[name] = label


def check_report_file(out: Path, folders: List[Path]) -> None:
    """Refuse a report file that is a folder or lies in a compared folder (they are only read)."""
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name, such as {out / 'compare.md'}")
    for folder in folders:
        if folder.resolve() in out.resolve().parents:
            raise UsageError(f"--out {out} is inside {folder}, which this command only reads; write the report "
                             "outside the compared folders")


def converged(folder: Folder) -> bool:
    """Whether the folder's runs stopped early on validation (not a fixed budget)."""
    return folder.settings["patience"] is not None


def differing_settings(a: Folder, b: Folder) -> List[str]:
    return [f"{key} {a.settings.get(key)!r} / {b.settings.get(key)!r}"
            for key in sorted(set(a.settings) | set(b.settings)) if a.settings.get(key) != b.settings.get(key)]


def report(a: Folder, b: Folder, command: str) -> str:
    names = [name for name in a.labels if name in b.labels]
    if not names:
        raise UsageError(f"{a.path} and {b.path} have no loss with finished runs in common")
    header = ["loss", "setting in A", "setting in B", "seeds", "A: test MAP@R", "B: test MAP@R",
              *(f"Δ{SHORT_NAMES[m]} A - B [95 % CI], p" for m in QUERY_METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sentences = []
    for name in names:
        label_a, label_b = a.labels[name], b.labels[name]
        key_a, key_b = f"{name} in A", f"{name} in B"
        scores = {key_a: a.scores.get(label_a, {}), key_b: b.scores.get(label_b, {})}
        try:
            comparisons = compare_losses(scores, key_a, key_b)
        except ValueError as error:
            raise UsageError(f"{a.path} and {b.path} cannot be compared on {name}: {error}; compare folders "
                             "of one dataset and split, with seeds in common") from error
        seeds = set(scores[key_a]) & set(scores[key_b])
        rows_a, rows_b = ([row for row in rows if row["seed"] in seeds] for rows in (a.best[label_a], b.best[label_b]))
        lines.append("| " + " | ".join([
            name, f"`{label_a}`", f"`{label_b}`", str(len(seeds)), mean_std_text(rows_a, PRIMARY_METRIC),
            mean_std_text(rows_b, PRIMARY_METRIC), *(difference_text(comparisons[m]) for m in QUERY_METRICS),
        ]) + " |")
        sentence = verdict(key_a, key_b, comparisons[PRIMARY_METRIC])
        if not (converged(a) and converged(b)):
            sentence = f"{name}: not trained to convergence (a fixed budget), no verdict"
        sentences.append(sentence + cap_note(label_a, a.capped).replace(f"`{label_a}`", f"`{label_a}` in A")
                         + cap_note(label_b, b.capped).replace(f"`{label_b}`", f"`{label_b}` in B"))
    differing = differing_settings(a, b)
    capped = [f"{folder.path}: {line}" for folder in (a, b)
              for line in convergence_lines(folder.capped, folder.settings["epochs"], folder.settings["patience"])]
    parts = [f"# {a.path} (A) against {b.path} (B)", "", f"Command: `{command}`", "",
             f"- settings that differ (A / B): {', '.join(differing) if differing else 'none'}",
             *(f"- {line}" for line in capped),
             "- test metrics at each run's best validation epoch, in %, mean ± std over the seeds both folders "
             "finished; Δ: A - B by the seed-paired test (training runs and test queries; "
             "a seed fixes the initial weights, the batches differ where the batch size does), "
             "no multiplicity correction", "", *lines, "", *(f"- {sentence}" for sentence in sentences),
             *(f"- left out of {name}: {note}" for name, folder in (("A", a), ("B", b)) for note in folder.left_out),
             ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python -m benchmarks.compare " + " ".join(shlex.quote(a) for a in argv)
    args = build_parser().parse_args(argv)
    try:
        if args.out:
            check_report_file(args.out, [args.a, args.b])
        text = report(Folder(args.a), Folder(args.b), command)
    except (UsageError, BrokenFile) as error:
        print(f"python -m benchmarks.compare: error: {error}", file=sys.stderr)
        return 2
    if args.out:
        atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
