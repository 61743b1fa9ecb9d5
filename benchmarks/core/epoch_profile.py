"""Where an epoch's wall time goes: data, forward, loss, backward, optimizer, evaluation and
bookkeeping, measured on the harness's own training run.

A ``ProfiledRun`` is a ``training.Run`` whose trainer and tester methods are timed in place:

- data: ``get_batch`` (sampler, dataset, collation, device transfer of the labels);
- forward: ``compute_embeddings`` (trunk and embedder; with gradient caching also the
  re-forward of each chunk in backward);
- loss: the miner and the loss (``maybe_mine_embeddings``, ``maybe_get_metric_loss``);
- backward: ``backward`` less the forward passes nested in it;
- optimizer: ``zero_grad`` and ``step_optimizers``;
- evaluation: the tester's ``test`` (embedding the validation split, k-NN, metrics);
- bookkeeping: the rest of the epoch (record-keeper and tensorboard logs, checkpoints,
  the trainer's own loop).

A nested phase is charged to itself, not to the phase around it.
"""

import collections
import contextlib
import dataclasses
import functools
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from ..data.splits import BenchmarkData
from .loss_specs import LossSpec
from .models import fresh_models
from .run_store import RunStore, StoredRun
from .settings import Settings
from .training import Run

PHASES = ("data", "forward", "loss", "backward", "optimizer", "evaluation", "bookkeeping")
TRAINER_PHASES = {
    "get_batch": "data",
    "compute_embeddings": "forward",
    "maybe_mine_embeddings": "loss",
    "maybe_get_metric_loss": "loss",
    "backward": "backward",
    "zero_grad": "optimizer",
    "step_optimizers": "optimizer",
}


class PhaseClock:
    """Wall seconds per phase; time inside a nested phase is charged to that phase only."""

    def __init__(self):
        self.seconds: Dict[str, float] = collections.defaultdict(float)
        self.open: List[list] = []  # [phase, start of its current stretch]

    @contextlib.contextmanager
    def phase(self, name: str):
        now = time.perf_counter()
        if self.open:
            outer = self.open[-1]
            self.seconds[outer[0]] += now - outer[1]
        self.open.append([name, now])
        try:
            yield
        finally:
            end = time.perf_counter()
            phase, start = self.open.pop()
            self.seconds[phase] += end - start
            if self.open:
                self.open[-1][1] = end

    def timed(self, name: str, method):
        @functools.wraps(method)
        def run_timed(*args, **kwargs):
            with self.phase(name):
                return method(*args, **kwargs)

        return run_timed

    def reading(self) -> Dict[str, float]:
        return dict(self.seconds, wall=time.perf_counter())


@dataclasses.dataclass(frozen=True)
class EpochCost:
    """Seconds per phase of one epoch (``PHASES``) and their total."""

    seconds: Dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def epoch_costs(readings: List[Dict[str, float]]) -> List[EpochCost]:
    """The cost of each epoch between consecutive clock readings; bookkeeping is the wall time
    that no timed phase took."""
    costs = []
    for before, after in zip(readings, readings[1:]):
        spent = {phase: after.get(phase, 0.0) - before.get(phase, 0.0) for phase in PHASES[:-1]}
        spent["bookkeeping"] = after["wall"] - before["wall"] - sum(spent.values())
        costs.append(EpochCost(spent))
    return costs


class ProfiledRun(Run):
    """A training run whose trainer and tester report to a ``PhaseClock``; ``readings`` holds
    the clock at the start of training and at the end of each epoch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock = PhaseClock()
        self.readings: List[Dict[str, float]] = []
        self.tester.test = self.clock.timed("evaluation", self.tester.test)

    def trainer(self):
        trainer = super().trainer()
        for method, phase in TRAINER_PHASES.items():
            setattr(trainer, method, self.clock.timed(phase, getattr(trainer, method)))
        end_of_epoch = trainer.end_of_epoch_hook

        def read_clock_after(trainer_):
            keep_going = end_of_epoch(trainer_)
            self.readings.append(self.clock.reading())
            return keep_going

        trainer.end_of_epoch_hook = read_clock_after
        self.readings.append(self.clock.reading())
        return trainer


def profile_epochs(settings: Settings, data: BenchmarkData, spec: LossSpec, seed: int = 0) -> List[EpochCost]:
    """Train ``spec`` for ``settings.epochs`` epochs (no early stop) in a temporary folder and
    return the cost of each epoch. ``data`` needs no test split."""
    settings = dataclasses.replace(settings, patience=None)
    feature_size = data.train.images.shape[1] if settings.freeze_trunk else None
    trunk, embedder = fresh_models(settings, feature_size, seed)
    with tempfile.TemporaryDirectory(prefix="epoch-profile-") as folder:
        run = ProfiledRun(data, trunk, embedder, spec, seed, settings, RunStore(Path(folder)), StoredRun("new", []),
                          on_rows=lambda rows: None)
        run.execute()
    return epoch_costs(run.readings)
