"""The loop over (loss, seed): skip finished runs, resume partial ones, record failures and
publish results.csv after every evaluated epoch, then summary.md and the plots.

Runs of earlier commands in the same --out folder (other losses or seeds) are read once
at the start and kept in every publication.
"""

import dataclasses
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..data.splits import BenchmarkData, split_sizes
from . import loss_specs
from .console import Console
from .models import FROM_SCRATCH_MODELS, fresh_models
from .out_folder import OutFolder
from .parallel_runs import ParallelRuns
from .run_store import RunKey, RunStore, StoredRun
from .settings import Settings
from .training import Run, RunResult


def settings_lines(settings: Settings, data: BenchmarkData, processes: int, labels: List[str]) -> List[str]:
    """The settings block of summary.md and of the console."""
    pretrained = " (pretrained)" if settings.pretrained and settings.model not in FROM_SCRATCH_MODELS else ""
    lines = [
        f"- dataset: {settings.dataset} ({'; '.join(split_sizes(data))})",
        f"- model: {settings.model}{pretrained}{', trunk frozen' if settings.freeze_trunk else ''}, "
        f"embedding {settings.embedding_size}",
        f"- training: up to {settings.epochs} epochs, patience {settings.patience}, batch {settings.batch_size} "
        f"({settings.m_per_class} per class), Adam lr {settings.lr}, {processes} process(es), device "
        f"{settings.device}{', autocast ' + settings.amp if settings.amp else ''}"
        f"{f', gradient caching in chunks of {settings.cache_chunk}' if settings.cache_chunk else ''}",
        f"- seeds: {', '.join(str(s) for s in settings.seeds)}",
    ]
    return lines + [f"- `{label}`: {_loss_values(label)}" for label in labels]


def _loss_values(label: str) -> str:
    try:
        spec = loss_specs.parse_loss_spec(label)
    except loss_specs.LossSpecError:
        return "(no longer a registered loss)"
    return ", ".join(f"{k}={v!r}" for k, v in spec.describe_values().items())


@dataclasses.dataclass(frozen=True)
class Finished:
    """What an experiment leaves for its summary: the folder, the rows of every run in it
    (``rows_by_run``, earlier commands' runs included; ``run_folders`` their folders), the
    failed runs with their errors, notes on runs left out, and the settings lines."""

    settings: Settings
    folder: OutFolder
    console: Console
    labels: List[str]
    header: List[str]
    rows_by_run: Dict[RunKey, List[dict]]
    failures: Dict[RunKey, str]
    run_folders: Dict[RunKey, Path]
    left_out: List[str]


class Experiment:
    """Every (loss, seed) run of one command in one --out folder."""

    def __init__(self, settings: Settings, data: BenchmarkData, folder: OutFolder, console: Console,
                 rank: int, processes: int, feature_size: Optional[int]):
        self.settings, self.data, self.folder, self.console = settings, data, folder, console
        self.rank, self.processes, self.feature_size = rank, processes, feature_size
        self.runs = [(spec, seed) for spec in settings.losses for seed in settings.seeds]
        self.stores = {(spec.label, seed): folder.run_store(spec.folder_name, seed) for spec, seed in self.runs}
        self.run_folders = {key: store.folder for key, store in self.stores.items()}
        self.stored: Dict[RunKey, StoredRun] = {key: store.load(settings.epochs) for key, store in self.stores.items()}
        self.rows_by_run = {key: stored.rows for key, stored in self.stored.items()}
        self.failures = {key: stored.error for key, stored in self.stored.items() if stored.error}
        self.labels = [spec.label for spec in settings.losses]
        self.left_out: List[str] = []  # notes on earlier runs whose files cannot be read
        if rank == 0:
            self._add_earlier_runs(folder.other_run_stores(list(self.stores.values())))

    def _add_earlier_runs(self, stores: List[RunStore]) -> None:
        """Rows and failures of run folders that this command does not run."""
        for store in stores:
            stored = store.load(self.settings.epochs, restart_broken=False)
            if stored.note:
                self.console.say(f"earlier run: {stored.note}")
                self.left_out.append(stored.note)
            if not stored.rows:
                continue
            key = stored.key
            if stored.status == "partial":
                self.console.say(f"earlier run {key[0]} seed {key[1]}: trained {stored.checkpoint['epoch']} of "
                                 f"{self.settings.epochs} epochs, published as it is; add it to --losses and --seeds "
                                 "to finish it")
            self.rows_by_run[key] = stored.rows
            self.run_folders[key] = store.folder
            if stored.error:
                self.failures[key] = stored.error
            if key[0] not in self.labels:
                self.labels.append(key[0])

    def epochs_to_evaluate(self) -> int:
        """Evaluations left in this command (epoch 0 of new runs included), for the progress bar."""
        total = 0
        for stored in self.stored.values():
            if stored.status == "new":
                total += self.settings.epochs + 1
            elif stored.status == "partial":
                total += self.settings.epochs - stored.checkpoint["epoch"]
        return total

    def publish(self, key: RunKey, rows: List[dict]) -> None:
        """After each evaluation: remember the run's rows and rewrite results.csv."""
        new_rows = rows[len(self.rows_by_run.get(key, [])):]
        self.rows_by_run[key] = list(rows)
        self.folder.publish_rows(self.rows_by_run, self.labels)
        for row in new_rows:
            self.console.epoch(row)
            self.console.advance()

    def to_train(self, spec, seed: int) -> bool:
        """Whether the run still trains; says so when it is failed, done or restarted."""
        stored = self.stored[(spec.label, seed)]
        if stored.note:
            self.console.say(f"{spec.label} seed {seed}: {stored.note}")
        if stored.status == "failed":
            self.console.say(f"failed before: {spec.label} seed {seed}: {stored.error}")
        elif stored.status == "finished":
            self.console.run_done(spec.label, seed, stored.rows, None, " (already done)")
        return stored.status in ("new", "partial")

    def finish(self, spec, seed: int, result: RunResult, seconds: float) -> None:
        """A run's result: its rows, failure and line; the progress bar skips the epochs it did not need."""
        key, stored = (spec.label, seed), self.stored[(spec.label, seed)]
        self.rows_by_run[key] = result.rows
        evaluated = len(result.rows) - len(stored.rows)
        remaining = (self.settings.epochs + 1 if stored.status == "new" else self.settings.epochs - stored.checkpoint["epoch"])
        self.console.advance(remaining - evaluated)  # epochs skipped by early stopping or a failure
        if result.error:
            self.failures[key] = result.error
            self.console.say(f"{spec.label} seed {seed}: run failed: {result.error}")
        else:
            self.console.run_done(spec.label, seed, result.rows, seconds)

    def run_one(self, spec, seed: int) -> None:
        key = (spec.label, seed)
        started = time.time()
        trunk, embedder = fresh_models(self.settings, self.feature_size, seed, self.rank)
        result = Run(self.data, trunk, embedder, spec, seed, self.settings, self.stores[key], self.stored[key],
                     on_rows=lambda rows: self.publish(key, rows)).execute()
        self.finish(spec, seed, result, time.time() - started)

    def run_in_parallel(self, runs) -> None:
        """``settings.jobs`` runs at a time, each in a process of its own (``parallel_runs``); the rows
        they send after each evaluation are published here."""
        with ParallelRuns(self.settings, self.data, self.feature_size) as pool:
            for spec, seed in runs:
                pool.submit(spec, seed, self.stores[(spec.label, seed)].folder)
            for message in pool.messages():
                if message.rows is not None:
                    self.publish((message.spec.label, message.seed), message.rows)
                else:
                    self.finish(message.spec, message.seed, message.result, message.seconds)

    def run(self, publish: Callable[["Finished"], None]) -> None:
        """Every run (in turn, or ``--jobs`` at a time), then ``publish`` of what they left (rank 0)."""
        started = time.time()
        self.console.start(self.epochs_to_evaluate())
        runs = [(spec, seed) for spec, seed in self.runs if self.to_train(spec, seed)]
        if self.settings.jobs > 1 and self.processes == 1:
            self.run_in_parallel(runs)
        else:
            for spec, seed in runs:
                self.run_one(spec, seed)
        self.console.stop()
        if self.rank == 0:
            publish(self.finished(time.time() - started))

    def finished(self, seconds: float) -> Finished:
        """What the runs left, for the summary; ``seconds``: the wall time of this command."""
        header = settings_lines(self.settings, self.data, self.processes, self.labels)
        header.append(f"- wall time of this invocation: {seconds:.0f} s")
        return Finished(self.settings, self.folder, self.console, self.labels, header, self.rows_by_run,
                        self.failures, self.run_folders, self.left_out)
