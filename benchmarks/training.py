"""One benchmark run (one loss, one seed) with PML's trainer, tester and logging hooks.

A run evaluates the untrained model (epoch 0), then trains with ``MetricLossOnly`` and an
``MPerClassSampler``, evaluating the validation and test splits after every epoch through
``logging_presets.HookContainer`` (record-keeper + tensorboard, early stopping by
patience on validation MAP@R). After each evaluation a checkpoint holding the models,
optimizers, loss parameters, random states and the result rows is written atomically,
so a rerun resumes after the last finished epoch and never duplicates a row.
"""

import dataclasses
import random
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
from pytorch_metric_learning import samplers, trainers
from pytorch_metric_learning.utils import logging_presets
from pytorch_metric_learning.utils import distributed as pml_dist
from pytorch_metric_learning.utils.inference import FaissKMeans

from .files import atomic_torch_save, atomic_write_json, read_json
from .loss_specs import LossSpec, has_trainable_parameters
from .metrics import METRICS, PRIMARY_METRIC, RecallAccuracyCalculator
from .significance import KeepEmbeddingsTester, keep_best_test_scores

CHECKPOINT = "checkpoint.pth"
FAILED = "failed.json"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class TrainSettings:
    """Everything a run needs besides its dataset, loss and seed."""

    epochs: int
    patience: Optional[int]
    batch_size: int
    m_per_class: int
    lr: float
    loss_lr: float
    weight_decay: float
    eval_batch_size: int
    device: str
    num_workers: int


@dataclasses.dataclass
class RunResult:
    rows: List[dict]
    error: Optional[str] = None


@dataclasses.dataclass
class StoredRun:
    """What ``run_dir`` holds: status 'new', 'partial', 'finished' or 'failed', the rows so far,
    the error of a failed run and the checkpoint of a partial or finished one."""

    status: str
    rows: List[dict]
    error: Optional[str] = None
    checkpoint: Optional[dict] = None


def _world():
    if pml_dist.is_distributed():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class BenchmarkTrainer(trainers.MetricLossOnly):
    """MetricLossOnly that stops on a non-finite loss and averages proxy gradients across ranks."""

    loss_label = "loss"

    def backward(self):
        total = self.losses["total_loss"]
        if not torch.isfinite(torch.as_tensor(total)).all():
            raise NonFiniteLossError(
                f"loss '{self.loss_label}' is {float(total)} at epoch {self.epoch}, "
                f"iteration {self.iteration}"
            )
        super().backward()
        _, world = _world()
        if world > 1:
            # Every rank computes the loss on the gathered batch, scaled by the world size
            # (DistributedLossWrapper): the loss's own parameters get world x the gradient.
            for p in self.loss_funcs["metric_loss"].parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world * world


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy (per rank, for the sampler) and torch (shared, for the weights)."""
    random.seed(seed)
    np.random.seed(seed * 1000 + rank)
    torch.manual_seed(seed)


def _rng_state(sampler):
    """Random states, plus the sampler's class order, which it shuffles in place every epoch."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "sampler_labels": list(sampler.labels),
    }


def _set_rng_state(state, sampler):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    sampler.labels = list(state["sampler_labels"])


def accuracy_row(tester, spec_label: str, seed: int, epoch: int) -> dict:
    """One results row: test metrics under their names, validation metrics prefixed ``val_``."""
    row = {"loss": spec_label, "seed": seed, "epoch": epoch}
    for split, prefix in (("test", ""), ("val", "val_")):
        if split not in tester.all_accuracies:  # significance/tuning: no test split while tuning
            continue
        accuracies = tester.all_accuracies[split]
        for metric in METRICS:
            row[prefix + metric] = float(accuracies[tester.accuracies_keyname(metric, label_hierarchy_level=0)])
    return row


def load_run(run_dir: Path, epochs: int) -> StoredRun:
    """The run stored in ``run_dir``; it is finished once stopped early or trained ``epochs`` epochs."""
    failure = read_json(run_dir / FAILED)
    if failure is not None:
        return StoredRun("failed", failure["rows"], error=failure["error"])
    if not (run_dir / CHECKPOINT).is_file():
        return StoredRun("new", [])
    checkpoint = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)
    finished = checkpoint["stopped_early"] or checkpoint["epoch"] >= epochs
    return StoredRun("finished" if finished else "partial", checkpoint["rows"], checkpoint=checkpoint)


def train_one(
    data,
    trunk: torch.nn.Module,
    embedder: torch.nn.Module,
    spec: LossSpec,
    seed: int,
    settings: TrainSettings,
    run_dir: Path,
    checkpoint: Optional[dict] = None,
    on_rows: Callable[[List[dict]], None] = lambda rows: None,
) -> RunResult:
    """Train and evaluate one new (loss, seed) run in ``run_dir``, or resume it from ``checkpoint``.

    ``trunk`` and ``embedder`` must be freshly built after ``seed_everything(seed)``; the
    global batch size must split evenly across processes into multiples of m_per_class.
    ``on_rows`` receives every row so far after each evaluation (rank 0 only).
    """
    rank, world = _world()
    run_dir = Path(run_dir)
    device = torch.device(settings.device)
    per_rank_batch = settings.batch_size // world
    loss, miner = spec.build(num_classes=data.num_train_classes, embedding_size=embedder.out_features)
    trunk, embedder, loss = trunk.to(device), embedder.to(device), loss.to(device)

    optimizers = {}
    if any(p.requires_grad for p in trunk.parameters()):
        optimizers["trunk_optimizer"] = torch.optim.Adam(trunk.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    optimizers["embedder_optimizer"] = torch.optim.Adam(embedder.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    if has_trainable_parameters(loss):
        optimizers["metric_loss_optimizer"] = torch.optim.Adam(loss.parameters(), lr=settings.loss_lr)

    rows = []
    start_epoch = 1
    if checkpoint is not None:
        trunk.load_state_dict(checkpoint["models"]["trunk"])
        embedder.load_state_dict(checkpoint["models"]["embedder"])
        loss.load_state_dict(checkpoint["loss"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(checkpoint["optimizers"][name])
        rows = list(checkpoint["rows"])
        start_epoch = checkpoint["epoch"] + 1

    if world > 1:
        # Buffers (BatchNorm statistics) stay rank-local: rank 0 evaluates alone, without a collective.
        def wrap(module):
            return torch.nn.parallel.DistributedDataParallel(module, broadcast_buffers=False)

        models = {"trunk": wrap(trunk) if "trunk_optimizer" in optimizers else trunk, "embedder": wrap(embedder)}
        train_loss = pml_dist.DistributedLossWrapper(loss)
        train_miner = pml_dist.DistributedMinerWrapper(miner) if miner is not None else None
    else:
        models = {"trunk": trunk, "embedder": embedder}
        train_loss, train_miner = loss, miner

    train_labels = np.asarray(data.train.labels)
    sampler = samplers.MPerClassSampler(
        train_labels, settings.m_per_class, batch_size=per_rank_batch,
        length_before_new_iter=max(per_rank_batch, len(train_labels) // world),
    )
    # significance/tuning: data.test is None while tuning, so only validation is evaluated.
    dataset_dict = {"val": data.val} if data.test is None else {"val": data.val, "test": data.test}
    hooks, tester = None, None
    if rank == 0:
        record_keeper, _, _ = logging_presets.get_record_keeper(
            str(run_dir / "logs"), str(run_dir / "tensorboard"), is_new_experiment=checkpoint is None
        )
        hooks = logging_presets.get_hook_container(
            record_keeper, primary_metric=PRIMARY_METRIC, validation_split_name="val",
            save_models=False, log_freq=10,
        )
        tester = KeepEmbeddingsTester(  # significance: PML's tester, keeping the test embeddings
            end_of_testing_hook=hooks.end_of_testing_hook,
            accuracy_calculator=RecallAccuracyCalculator(device=device, kmeans_func=FaissKMeans(niter=20, gpu=device.type == "cuda", min_points_per_centroid=1)),
            batch_size=settings.eval_batch_size,
            dataloader_num_workers=settings.num_workers,
            data_device=device,
        )

    def save_checkpoint(epoch: int, stopped_early: bool):
        rng_states = [None] * world
        if world > 1:
            torch.distributed.all_gather_object(rng_states, _rng_state(sampler))
        else:
            rng_states = [_rng_state(sampler)]
        if rank == 0:
            atomic_torch_save(run_dir / CHECKPOINT, {
                "epoch": epoch,
                "stopped_early": stopped_early,
                "rows": rows,
                "models": {"trunk": trunk.state_dict(), "embedder": embedder.state_dict()},
                "optimizers": {k: v.state_dict() for k, v in optimizers.items()},
                "loss": loss.state_dict(),
                "rng": rng_states,
            })
            on_rows(rows)

    def evaluate(epoch: int):
        tester.test(dataset_dict, epoch, trunk, embedder)
        rows.append(accuracy_row(tester, spec.label, seed, epoch))
        keep_best_test_scores(run_dir, tester, rows)  # significance: per-query scores at the best epoch

    if checkpoint is None:
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            evaluate(0)
            hooks.record_keeper.save_records()
        save_checkpoint(0, stopped_early=False)
        if settings.epochs == 0:
            return RunResult(rows=rows)
    else:
        _set_rng_state(checkpoint["rng"][rank], sampler)

    pml_hook = hooks.end_of_epoch_hook(
        tester, dataset_dict, str(run_dir / "models"), test_interval=1, patience=settings.patience
    ) if rank == 0 else None

    def end_of_epoch(trainer):
        keep_going = [None]
        if rank == 0:
            keep_going[0] = pml_hook(trainer) is not False
            rows.append(accuracy_row(tester, spec.label, seed, trainer.epoch))
            keep_best_test_scores(run_dir, tester, rows)  # significance: per-query scores at the best epoch
        if world > 1:
            torch.distributed.broadcast_object_list(keep_going, src=0)
        save_checkpoint(trainer.epoch, stopped_early=not keep_going[0])
        return keep_going[0]

    trainer = BenchmarkTrainer(
        models=models,
        optimizers=optimizers,
        batch_size=per_rank_batch,
        loss_funcs={"metric_loss": train_loss},
        mining_funcs={"tuple_miner": train_miner} if train_miner is not None else {},
        dataset=data.train,
        sampler=sampler,
        data_device=device,
        dataloader_num_workers=settings.num_workers,
        dataset_labels=train_labels,
        set_min_label_to_zero=True,
        end_of_iteration_hook=hooks.end_of_iteration_hook if hooks else None,
        end_of_epoch_hook=end_of_epoch,
    )
    trainer.loss_label = spec.label
    try:
        trainer.train(start_epoch=start_epoch, num_epochs=settings.epochs)
    except NonFiniteLossError as error:
        if rank == 0:
            atomic_write_json(run_dir / FAILED, {"error": str(error), "rows": rows})
            on_rows(rows)
        return RunResult(rows=rows, error=str(error))
    return RunResult(rows=rows)
