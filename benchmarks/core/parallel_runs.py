"""Runs of one command trained side by side (``--jobs N``): N worker processes, each training
one (loss, seed) run at a time with ``threads_per_run`` of torch's threads.

A worker trains a run exactly as the command's own process would (the same seed, data and
thread count per run, hence the same bytes) and sends its rows after every evaluation and
its result at the end; the command publishes them (results.csv, the console) as it does for
a run of its own.
"""

import concurrent.futures
import dataclasses
import multiprocessing
import queue
import time
from pathlib import Path
from typing import Iterator, List, Optional

import torch

from .console import quiet_known_warnings
from .loss_specs import LossSpec
from .models import fresh_models
from .run_store import RunStore
from .training import Run, RunResult

_WORKER: dict = {}  # a worker process's settings, data, feature size and message queue


def threads_per_run(jobs: int) -> int:
    """torch's threads of one run when ``jobs`` runs share this process's threads."""
    return max(1, torch.get_num_threads() // jobs)


@dataclasses.dataclass
class Message:
    """From a worker: the rows of a run after an evaluation, or (``rows`` None) its result."""

    spec: LossSpec
    seed: int
    rows: Optional[List[dict]] = None
    result: Optional[RunResult] = None
    seconds: float = 0.0


def _start_worker(settings, data, feature_size, messages, threads) -> None:
    torch.set_num_threads(threads)
    quiet_known_warnings()
    _WORKER.update(settings=settings, data=data, feature_size=feature_size, messages=messages)


def _train(spec: LossSpec, seed: int, folder: Path) -> None:
    settings, messages = _WORKER["settings"], _WORKER["messages"]
    store = RunStore(folder)
    started = time.time()
    trunk, embedder = fresh_models(settings, _WORKER["feature_size"], seed)
    result = Run(_WORKER["data"], trunk, embedder, spec, seed, settings, store, store.load(settings.epochs),
                 on_rows=lambda rows: messages.put(Message(spec, seed, rows=list(rows)))).execute()
    messages.put(Message(spec, seed, result=result, seconds=time.time() - started))


class ParallelRuns:
    """A pool of ``settings.jobs`` workers (a context manager): ``submit`` runs, then iterate
    ``messages`` until every run has sent its result. A worker's exception is raised there."""

    def __init__(self, settings, data, feature_size: Optional[int]):
        context = multiprocessing.get_context("spawn")
        self.queue = context.Queue()
        self.pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=settings.jobs, mp_context=context, initializer=_start_worker,
            initargs=(settings, data, feature_size, self.queue, threads_per_run(settings.jobs)))
        self.futures: List[concurrent.futures.Future] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, spec: LossSpec, seed: int, folder: Path) -> None:
        self.futures.append(self.pool.submit(_train, spec, seed, folder))

    def messages(self) -> Iterator[Message]:
        finished = 0
        while finished < len(self.futures):
            try:
                message = self.queue.get(timeout=1)
            except queue.Empty:
                for future in self.futures:
                    if future.done() and future.exception() is not None:
                        raise future.exception()
                continue
            finished += message.rows is None
            yield message
