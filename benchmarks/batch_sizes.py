"""Does a bigger batch help? ``python -m benchmarks.batch_sizes [options]``.

For each batch size of ``--batch-sizes`` (default 128,1024,4096), at one budget in epochs
(the dataset's, or ``--epochs``): tune each loss of ``--losses`` (default ice,ntxent) on
validation with ``--trials`` trials (the same for every loss and batch size), as
``python -m benchmarks.tune`` does, into ``<out>/batch<B>/tuning``; then train each loss's
best setting with ``--seeds`` seeds, as ``python -m benchmarks.run --config best.toml``
does, into ``<out>/batch<B>``. Batches larger than ``--cache-chunk`` (default 128) train through
gradient caching in chunks of that size, so BatchNorm normalises over as many samples at
every batch size and only the loss sees the larger batch. A fixed budget in epochs gives a
larger batch fewer optimizer steps. Rerunning resumes. Then it writes
``<out>/batch_sizes.md``: test MAP@R and P@1 per loss and batch size (mean ± std over seeds);
each loss at each batch size against itself at the smallest, and the first loss against the
others at each batch size, by the seed-paired test (a seed fixes the initial weights; the
batches differ between batch sizes). Every other option is an option of ``benchmarks.run``
(dataset, ``--epochs``, ``--m-per-class``, ...), written in full; not ``--config``, as the
final runs read ``best.toml`` as theirs.
"""

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Dict, List

from .core.console import quiet_known_warnings
from .core.convergence import capped_runs, convergence_lines
from .core.launch import USER_ERRORS, check_batches, prepare_data, run_experiment
from .core.loss_specs import LossSpec
from .core.metrics import PRIMARY_METRIC, SHORT_NAMES
from .core.out_folder import OutFolder
from .core.query_scores import QUERY_METRICS
from .core.settings import (SeedList, Settings, UsageError, build_parser as build_run_parser, check_out_folder,
                            default_out, flag, integer_list, resolve)
from .core.training import samples_per_epoch
from .core.tuning import parse_loss_names, tune
from .report.comparisons import compare_losses
from .report.mean_std import mean_std_text
from .report.summary import publish_summary
from .report.tables import difference_text, verdict
from .report.tuning_report import write_tuning
from .storage.files import atomic_write_text

PROG = "python -m benchmarks.batch_sizes"
DEFAULT_BATCH_SIZES = "128,1024,4096"
DEFAULT_LOSSES = "ice,ntxent"
# benchmarks.run's settings this command sets itself (--config: its final runs read best.toml as theirs)
FIXED_SETTINGS = ("batch_size", "cache_chunk", "losses", "seeds", "out", "quiet", "config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n", 1)[1],
                                     allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--batch-sizes", type=integer_list(1), default=integer_list(1)(DEFAULT_BATCH_SIZES), metavar="B,B",
        help=f"global batch sizes (default {DEFAULT_BATCH_SIZES})")
    add("--losses", default=DEFAULT_LOSSES, metavar="NAMES", help=f"losses to tune and train (default {DEFAULT_LOSSES})")
    add("--trials", type=int, default=8, metavar="N", help="tuning trials per loss and batch size (default 8)")
    add("--seeds", default="5", metavar="K|S,S", help="final seeds: a count or seeds, as for benchmarks.run (default 5)")
    add("--cache-chunk", type=int, default=128, metavar="N",
        help="samples per chunk of gradient caching for larger batches (default 128)")
    add("--out", metavar="DIR", help="output folder (default: results/batch-sizes-<dataset>)")
    return parser


def check_run_options(run_argv: List[str]) -> None:
    """Refuse in ``run_argv`` what benchmarks.run's parser does not read without abbreviations
    (``--cache 8`` would be --cache-chunk under another name) and the options of ``FIXED_SETTINGS``."""
    parser = build_run_parser()
    parser.allow_abbrev = False
    given, unknown = parser.parse_known_args(run_argv)
    if unknown:
        options = [option for action in parser._actions for option in action.option_strings]
        meant = [f"{text} for {' or '.join(found)}?" for text in unknown
                 if (found := [o for o in options if o.startswith(text.partition("=")[0])])]
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}; write the options of benchmarks.run in full"
                         + (f" ({', '.join(meant)})" if meant else ""))
    fixed = [flag(name) for name in FIXED_SETTINGS if getattr(given, name) is not None]
    if fixed:
        raise UsageError(f"{', '.join(fixed)}: set by this command (see --help)")


def write_report(out: Path, settings: Settings, batch_sizes: List[int], tuned: Dict[int, Dict[str, LossSpec]],
                 seeds, command: str, cache_chunk: int, train_size: int) -> str:
    """batch_sizes.md from the finished runs under ``out`` of the specs ``tuned`` at each batch size."""
    losses = list(tuned[batch_sizes[0]])
    best, scores, labels, left_out, convergence = {}, {}, {}, [], []
    for size in batch_sizes:
        folder = out / f"batch{size}"
        chosen, run_scores, notes = OutFolder(folder).best_epochs(settings.epochs, lambda key: key[1] in seeds)
        left_out += notes
        rows_by_run = {key: rows for key, rows in OutFolder(folder).finished_runs(settings.epochs)[0].items()
                       if key[1] in seeds}
        convergence += [f"batch {size}: {line}" for line in convergence_lines(
            capped_runs(rows_by_run, settings.epochs, settings.patience), settings.epochs, settings.patience)]
        for name, label in ((name, spec.label) for name, spec in tuned[size].items()):
            if label in chosen:
                labels[name, size] = label
                best[name, size], scores[f"{name} @ {size}"] = chosen[label], run_scores[label]
    header = ["loss", "batch", "steps per epoch", "tuned setting", "seeds", "test MAP@R", "test P@1",
              *(f"Δ{SHORT_NAMES[m]} vs batch {batch_sizes[0]} [95 % CI], p"
                for m in QUERY_METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sentences = []
    for name in losses:
        for size in batch_sizes:
            if (name, size) not in best:
                continue
            steps = samples_per_epoch(dataclasses.replace(settings, batch_size=size), train_size) // size
            cells = [name, str(size), str(steps), f"`{labels[name, size]}`",
                     str(len(best[name, size])), mean_std_text(best[name, size], PRIMARY_METRIC),
                     mean_std_text(best[name, size], "precision_at_1")]
            smallest = f"{name} @ {batch_sizes[0]}"
            if size != batch_sizes[0] and smallest in scores:
                comparisons = compare_losses(scores, f"{name} @ {size}", smallest)
                cells += [difference_text(comparisons[m]) for m in QUERY_METRICS]
                sentences.append(verdict(f"{name} at batch {size}", f"{name} at batch {batch_sizes[0]}",
                                         comparisons[PRIMARY_METRIC]))
            else:
                cells += ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
    first = losses[0]
    for size in batch_sizes:
        for other in losses[1:]:
            a, b = f"{other} @ {size}", f"{first} @ {size}"
            if a in scores and b in scores:
                sentences.append(f"At batch {size}: " + verdict(other, first, compare_losses(scores, a, b)[PRIMARY_METRIC]))
    if settings.patience is None:
        sentences = ["Not trained to convergence (a fixed budget): no verdict is drawn from these differences."]
    parts = [f"# Batch size: {', '.join(losses)}", "", f"Command: `{command}`", "",
             f"- dataset {settings.dataset}, model {settings.model}, epochs {settings.epochs}, each "
             f"{settings.passes_per_epoch} pass(es) over {train_size} training images, {settings.m_per_class} "
             f"per class, lr {settings.lr}; "
             f"batches above {cache_chunk} through gradient caching in chunks of {cache_chunk}",
             *(f"- {line}" for line in convergence),
             "- each loss tuned at each batch size on validation MAP@R with the same number of trials; "
             "test metrics at each run's best validation epoch, in %, mean ± std over seeds",
             "- Δ: the seed-paired test (training runs and test queries; a seed fixes the initial weights, the "
             "batches differ between batch sizes), no multiplicity correction", "", *lines, "",
             *(f"- {sentence}" for sentence in sentences), *(f"- left out: {note}" for note in left_out), ""]
    text = "\n".join(parts)
    atomic_write_text(out / "batch_sizes.md", text)
    return text


def sized(settings: Settings, size: int, cache_chunk: int, out: Path) -> Settings:
    """The settings of one batch size: gradient caching in chunks of ``cache_chunk`` above it."""
    return dataclasses.replace(settings, batch_size=size, cache_chunk=cache_chunk if size > cache_chunk else None,
                               out=str(out / f"batch{size}"))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python -m benchmarks.batch_sizes " + " ".join(shlex.quote(a) for a in argv)
    args, run_argv = build_parser().parse_known_args(argv)
    quiet_known_warnings()
    try:
        check_run_options(run_argv)
        losses = parse_loss_names(args.losses)
        if args.trials < 1 or args.cache_chunk < 1:
            raise UsageError(f"--trials and --cache-chunk must be at least 1, got {args.trials} and {args.cache_chunk}")
        seeds = SeedList()("seeds", args.seeds)
        settings = resolve(run_argv + ["--batch-size", str(args.batch_sizes[0])])
        out = Path(args.out or default_out(settings.dataset, "batch-sizes"))
        check_out_folder(str(out))
        data = prepare_data(settings, 1)
        for size in args.batch_sizes:  # refuse a batch the data cannot fill before anything trains
            check_batches(sized(settings, size, args.cache_chunk, out), data, 1)
    except USER_ERRORS as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    tuned = {}
    for size in args.batch_sizes:
        batch = sized(settings, size, args.cache_chunk, out)
        print(f"batch {size}: tuning {', '.join(losses)}", flush=True)
        try:
            tuning = tune(batch, losses, args.trials, 1, Path(batch.out) / "tuning")
        except USER_ERRORS as error:
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return 2
        write_tuning(Path(batch.out) / "tuning", tuning, command)
        tuned[size] = tuning.best_specs()
        if tuned[size] is None:
            print(f"{PROG}: error: at batch {size} a loss has no completed trial to train", file=sys.stderr)
            return 1
        print(f"batch {size}: final runs", flush=True)
        final = dataclasses.replace(batch, losses=tuple(tuned[size].values()), seeds=seeds, quiet=True)
        status = run_experiment(final, PROG, publish_summary)
        if status:
            return status
    print("\n" + write_report(out, settings, args.batch_sizes, tuned, seeds, command, args.cache_chunk,
                              len(data.train)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
