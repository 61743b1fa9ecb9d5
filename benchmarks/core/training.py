"""One benchmark run (one loss, one seed) with PML's trainer, tester and logging hooks.

A run evaluates the untrained model (epoch 0) on the validation and test splits, then
trains with ``MetricLossOnly`` (``CachedMetricLossOnly`` with ``--cache-chunk``) and an
``MPerClassSampler``, evaluating the validation split after every epoch through
``logging_presets.HookContainer`` (record-keeper + tensorboard, early stopping by patience
on validation MAP@R). Across processes ICE is sharded exactly, PML's losses go through PML's
DistributedLossWrapper. The test split is evaluated
once more, when training ends, at the best validation epoch (the epoch every table
reports), from the weights kept when that epoch was reached. After each evaluation its
``RunStore`` writes a checkpoint holding the models (and the best epoch's), optimizers,
loss parameters, random states and the result rows, so a rerun resumes where it stopped
and never duplicates a row. Each test evaluation stores the split's per-query scores
(``report.query_scores``). Evaluations leave the random state as they found it, so what
is evaluated never changes what is trained. Data without a test split (tuning) are
evaluated on validation only.
"""

import contextlib
import copy
import dataclasses
import random
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from pytorch_metric_learning import samplers, trainers
from pytorch_metric_learning.utils import distributed as pml_dist
from pytorch_metric_learning.utils import logging_presets
from pytorch_metric_learning.utils.inference import FaissKMeans

from pml_ice.trainers import CachedMetricLossOnly
from pml_ice.utils import distributed as ice_dist

from .convergence import warming_up
from .metrics import METRICS, PRIMARY_METRIC, RecallAccuracyCalculator
from .query_scores import KeepEmbeddingsTester, save_test_scores
from .record_logs import drop_records_after
from .results import best_row
from .loss_specs import LossSpec, has_trainable_parameters
from .run_store import RunStore, StoredRun
from .settings import Settings

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class RunResult:
    rows: List[dict]
    error: Optional[str] = None


def world() -> tuple:
    """(rank, number of processes)."""
    if pml_dist.is_distributed():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class BenchmarkTrainer(CachedMetricLossOnly):
    """MetricLossOnly that stops on a non-finite loss, averages the gradients of a PML-wrapped
    loss's own parameters across ranks, optionally autocasts the forward pass and the loss
    (``amp``: 'bf16' or 'fp16'; fp16 needs a ``scaler``, a GradScaler), and with a
    ``chunk_size`` caches gradients (CachedMetricLossOnly; None: one forward of the batch)."""

    def __init__(self, *args, loss_label: str = "loss", amp: Optional[str] = None,
                 scaler: Optional[torch.amp.GradScaler] = None, chunk_size: Optional[int] = None, **kwargs):
        self.loss_label = loss_label
        self.amp_dtype = AMP_DTYPES.get(amp)
        self.scaler = scaler
        super().__init__(*args, chunk_size=chunk_size, **kwargs)
        if self.amp_dtype is not None:
            keep_parameters_float32(self.loss_funcs["metric_loss"])

    def autocast(self):
        return torch.autocast(self.data_device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def calculate_loss(self, curr_batch):
        with self.autocast():
            if self.chunk_size is None:
                trainers.MetricLossOnly.calculate_loss(self, curr_batch)
            else:
                super().calculate_loss(curr_batch)

    def backward(self):
        total = self.losses["total_loss"]
        if not torch.isfinite(torch.as_tensor(total)).all():
            raise NonFiniteLossError(
                f"loss '{self.loss_label}' is {float(total)} at epoch {self.epoch}, iteration {self.iteration}"
            )
        (total if self.scaler is None else self.scaler.scale(total)).backward()
        if self.gradient_cache is not None:
            with self.autocast():  # the re-forward casts as the forward did
                self.gradient_cache.backward()
            self.gradient_cache = None
        self._average_loss_gradients()

    def step_optimizers(self):
        if self.scaler is None:
            return super().step_optimizers()
        for optimizer in self.optimizers.values():
            self.scaler.step(optimizer)
        self.scaler.update()

    def _average_loss_gradients(self):
        # PML's DistributedLossWrapper: every rank computes the loss on the gathered batch,
        # scaled by the world size, so the loss's own parameters get world x the gradient.
        _, size = world()
        if size > 1 and not getattr(self.loss_funcs["metric_loss"], "efficient", False):
            for p in self.loss_funcs["metric_loss"].parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= size * size


def keep_parameters_float32(loss: torch.nn.Module) -> None:
    """Under autocast, keep a loss's own parameters (proxies, class weights) float32, as
    PyTorch's AMP recipe expects. PML's losses cast them to the embeddings' dtype in
    ``cast_types`` unless ``torch.is_autocast_enabled()``, which sees CUDA's autocast only:
    under CPU autocast they would turn bf16 or fp16 for good. Here ``cast_types`` moves them
    to the embeddings' device only, as under CUDA autocast; autocast picks each op's dtype."""
    for module in loss.modules():
        if hasattr(type(module), "cast_types"):
            module.cast_types = lambda dtype, device, module=module: type(module).cast_types(module, None, device)


@contextlib.contextmanager
def random_state_kept():
    """Run the block (an evaluation) without changing the Python, NumPy and torch random
    states, so that what is evaluated never changes what is trained."""
    python, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)


def _rng_state(sampler) -> dict:
    """Random states, plus the sampler's class order, which it shuffles in place every epoch,
    in the plain types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
        "sampler_labels": [label.item() if hasattr(label, "item") else label for label in sampler.labels],
    }


def _set_rng_state(state: dict, sampler) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
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


def build_optimizers(trunk, embedder, loss, settings: Settings, loss_lr: Optional[float] = None
                     ) -> Dict[str, torch.optim.Optimizer]:
    """Adam for a trainable trunk, the embedder and a loss with parameters (at ``loss_lr``,
    the spec's own, else --loss-lr)."""
    optimizers = {}
    if any(p.requires_grad for p in trunk.parameters()):
        optimizers["trunk_optimizer"] = torch.optim.Adam(trunk.parameters(), lr=settings.lr,
                                                         weight_decay=settings.weight_decay)
    optimizers["embedder_optimizer"] = torch.optim.Adam(embedder.parameters(), lr=settings.lr,
                                                        weight_decay=settings.weight_decay)
    if has_trainable_parameters(loss):
        optimizers["metric_loss_optimizer"] = torch.optim.Adam(loss.parameters(), lr=loss_lr or settings.loss_lr)
    return optimizers


def build_lr_schedulers(optimizers: Dict[str, torch.optim.Optimizer], settings: Settings) -> dict:
    """With ``--lr-decay F``: every optimizer's learning rate times F once validation MAP@R has not
    improved for more than ``--lr-patience`` evaluations (stepped by ``Run`` after each validation,
    on every process)."""
    if settings.lr_decay is None:
        return {}
    return {
        name: torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=settings.lr_decay, patience=settings.lr_patience)
        for name, optimizer in optimizers.items()
    }


def build_tester(hooks, settings: Settings, device: torch.device):
    """PML's GlobalEmbeddingSpaceTester with the faiss AccuracyCalculator extended by Recall@K,
    keeping the embeddings of its last test (significance: per-query test scores)."""
    kmeans = FaissKMeans(niter=20, gpu=device.type == "cuda", min_points_per_centroid=1)
    return KeepEmbeddingsTester(
        end_of_testing_hook=hooks.end_of_testing_hook,
        accuracy_calculator=RecallAccuracyCalculator(device=device, kmeans_func=kmeans),
        batch_size=settings.eval_batch_size,
        dataloader_num_workers=settings.num_workers,
        data_device=device,
    )


def build_hooks(store: RunStore, resumed_epoch: Optional[int], iterations_per_epoch: int):
    """record-keeper + tensorboard logging; a resumed run first drops what was logged after its checkpoint."""
    if resumed_epoch is not None:
        drop_records_after(store.logs, resumed_epoch, iterations_per_epoch)
    record_keeper, _, _ = logging_presets.get_record_keeper(
        str(store.logs), str(store.tensorboard), is_new_experiment=resumed_epoch is None
    )
    return logging_presets.get_hook_container(
        record_keeper, primary_metric=PRIMARY_METRIC, validation_split_name="val", save_models=False, log_freq=10,
    )


def distributed_loss_and_miner(loss, miner):
    """The loss and miner across processes: ICE sharded exactly (each process its own anchors
    against the gathered batch, gradients to every process's embeddings); any other loss
    through PML's wrapper, which computes the whole gathered batch's loss in every process."""
    if ice_dist.why_not_exactly_shardable(loss) is None:
        wrapped_miner = ice_dist.DistributedMinerWrapper(miner, efficient=True) if miner is not None else None
        return ice_dist.DistributedLossWrapper(loss, efficient=True), wrapped_miner
    wrapped_miner = pml_dist.DistributedMinerWrapper(miner) if miner is not None else None
    return pml_dist.DistributedLossWrapper(loss), wrapped_miner


def parallel_models(trunk, embedder, loss, miner, optimizers):
    """Models, loss and miner as the trainer sees them: wrapped for DistributedDataParallel
    when several processes run (buffers stay rank-local: rank 0 evaluates alone)."""
    if world()[1] == 1:
        return {"trunk": trunk, "embedder": embedder}, loss, miner

    def wrap(module):
        return torch.nn.parallel.DistributedDataParallel(module, broadcast_buffers=False)

    models = {"trunk": wrap(trunk) if "trunk_optimizer" in optimizers else trunk, "embedder": wrap(embedder)}
    return (models, *distributed_loss_and_miner(loss, miner))


def samples_per_epoch(settings: Settings, train_size: int, world: int = 1) -> int:
    """What one process's sampler draws in an epoch: its share of ``passes_per_epoch`` passes over
    the training set, at least one batch; the sampler trims it to whole batches."""
    return max(settings.batch_size // world, settings.passes_per_epoch * train_size // world)


class Run:
    """One (loss, seed) run: built from fresh models, resumed from its stored checkpoint if any."""

    def __init__(self, data, trunk, embedder, spec: LossSpec, seed: int, settings: Settings, store: RunStore,
                 stored: StoredRun, on_rows: Callable[[List[dict]], None]):
        self.rank, self.world = world()
        self.data, self.spec, self.seed, self.settings, self.store = data, spec, seed, settings, store
        self.on_rows = on_rows
        self.device = torch.device(settings.device)
        loss, self.miner = spec.build(num_classes=data.num_train_classes, embedding_size=embedder.out_features,
                                      collect_stats=True)
        self.trunk, self.embedder, self.loss = trunk.to(self.device), embedder.to(self.device), loss.to(self.device)
        self.optimizers = build_optimizers(self.trunk, self.embedder, self.loss, settings, spec.loss_lr)
        self.lr_schedulers = build_lr_schedulers(self.optimizers, settings)
        labels = np.asarray(data.train.labels)
        self.per_rank_batch = settings.batch_size // self.world
        self.sampler = samplers.MPerClassSampler(
            labels, settings.m_per_class, batch_size=self.per_rank_batch,
            length_before_new_iter=samples_per_epoch(settings, len(labels), self.world),
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if settings.amp == "fp16" else None
        self.checkpoint = stored.checkpoint
        self.rows = list(stored.rows) if self.checkpoint else []
        self.best = self.checkpoint.get("best") if self.checkpoint else None  # {"epoch", "models"} of the best epoch
        self.tested = self.checkpoint.get("tested", True) if self.checkpoint else data.test is None
        self.last_saved = (self.checkpoint["epoch"], self.checkpoint["stopped_early"]) if self.checkpoint else None
        self.hooks = self.tester = None
        if self.rank == 0:
            resumed_epoch = self.checkpoint["epoch"] if self.checkpoint else None
            self.hooks = build_hooks(store, resumed_epoch, len(self.sampler) // self.per_rank_batch)
            self.tester = build_tester(self.hooks, settings, self.device)

    def restore(self) -> int:
        """Load the stored state; return the first epoch to train."""
        if self.checkpoint is None:
            return 1
        self.trunk.load_state_dict(self.checkpoint["models"]["trunk"])
        self.embedder.load_state_dict(self.checkpoint["models"]["embedder"])
        self.loss.load_state_dict(self.checkpoint["loss"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(self.checkpoint["optimizers"][name])
        for name, scheduler in self.lr_schedulers.items():
            scheduler.load_state_dict(self.checkpoint["lr_schedulers"][name])
        if self.scaler is not None:
            self.scaler.load_state_dict(self.checkpoint["scaler"])
        _set_rng_state(self.checkpoint["rng"][self.rank], self.sampler)
        return self.checkpoint["epoch"] + 1

    def _models_state(self) -> dict:
        return {"trunk": self.trunk.state_dict(), "embedder": self.embedder.state_dict()}

    def save(self, epoch: int, stopped_early: bool) -> None:
        """Checkpoint after an evaluation (rank 0 writes every rank's random state)."""
        self.last_saved = (epoch, stopped_early)
        rng_states = [None] * self.world
        if self.world > 1:
            torch.distributed.all_gather_object(rng_states, _rng_state(self.sampler))
        else:
            rng_states = [_rng_state(self.sampler)]
        if self.rank == 0:
            self.store.save_checkpoint({
                "epoch": epoch,
                "stopped_early": stopped_early,
                "rows": self.rows,
                "models": self._models_state(),
                "best": self.best,
                "tested": self.tested,
                "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
                "lr_schedulers": {k: v.state_dict() for k, v in self.lr_schedulers.items()},
                "loss": self.loss.state_dict(),
                "rng": rng_states,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            })
            self.on_rows(self.rows)

    def record(self, epoch: int) -> None:
        """The row of the validation evaluation just made; the weights of a new best epoch."""
        self.rows.append(accuracy_row(self.tester, self.spec.label, self.seed, epoch))
        if epoch > 0:
            self.tested = self.data.test is None
            if best_row(self.rows) is self.rows[-1]:
                self.best = {"epoch": epoch, "models": copy.deepcopy(self._models_state())}

    def evaluate_untrained(self) -> None:
        if self.rank == 0:
            self.store.save_identity(self.spec.label, self.seed)
            splits = {"val": self.data.val} if self.data.test is None else {"val": self.data.val, "test": self.data.test}
            with random_state_kept():
                self.tester.test(splits, 0, self.trunk, self.embedder)
            self.record(0)
            save_test_scores(self.store.folder, self.tester, 0)
            self.hooks.record_keeper.save_records()
        self.save(0, stopped_early=False)

    def evaluate_test_at_best_epoch(self) -> None:
        """Test the best validation epoch's weights once, into that epoch's row (the only trained
        row that holds test metrics), and store its per-query scores; then checkpoint."""
        if self.rank == 0:
            chosen = best_row(self.rows)
            for row in self.rows:  # a run extended by a later command may have a new best epoch
                if row["epoch"] > 0 and row is not chosen:
                    for metric in METRICS:
                        row.pop(metric, None)
            if chosen["epoch"] > 0 and PRIMARY_METRIC not in chosen:  # a best epoch not tested yet
                trunk, embedder = copy.deepcopy(self.trunk), copy.deepcopy(self.embedder)
                trunk.load_state_dict(self.best["models"]["trunk"])
                embedder.load_state_dict(self.best["models"]["embedder"])
                with random_state_kept():
                    self.tester.test({"test": self.data.test}, chosen["epoch"], trunk, embedder)
                chosen.update(accuracy_row(self.tester, self.spec.label, self.seed, chosen["epoch"]))
                save_test_scores(self.store.folder, self.tester, chosen["epoch"])
                self.hooks.record_keeper.save_records()
        self.tested = True
        self.save(*self.last_saved)

    def end_of_epoch_hook(self):
        """PML's end-of-epoch hook (validation, logging, patience) plus a row and a checkpoint."""
        pml_hook = self.hooks.end_of_epoch_hook(
            self.tester, {"val": self.data.val}, str(self.store.folder / "models"),
            test_interval=1, patience=self.settings.patience,
        ) if self.rank == 0 else None

        def end_of_epoch(trainer):
            outcome = [None, None, None]  # continue training?, validation MAP@R, warming up?
            if self.rank == 0:
                with random_state_kept():
                    outcome[0] = pml_hook(trainer) is not False
                self.record(trainer.epoch)
                outcome[1] = self.rows[-1]["val_" + PRIMARY_METRIC]
                outcome[2] = warming_up(self.rows)
                outcome[0] = outcome[0] or outcome[2]
            if self.world > 1:
                torch.distributed.broadcast_object_list(outcome, src=0)
            if not outcome[2]:
                for scheduler in self.lr_schedulers.values():
                    scheduler.step(outcome[1])
            self.save(trainer.epoch, stopped_early=not outcome[0])
            return outcome[0]

        return end_of_epoch

    def trainer(self) -> BenchmarkTrainer:
        models, loss, miner = parallel_models(self.trunk, self.embedder, self.loss, self.miner, self.optimizers)
        return BenchmarkTrainer(
            models=models,
            optimizers=self.optimizers,
            batch_size=self.per_rank_batch,
            loss_funcs={"metric_loss": loss},
            mining_funcs={"tuple_miner": miner} if miner is not None else {},
            dataset=self.data.train,
            sampler=self.sampler,
            data_device=self.device,
            dataloader_num_workers=self.settings.num_workers,
            dataset_labels=np.asarray(self.data.train.labels),
            set_min_label_to_zero=True,
            end_of_iteration_hook=self.hooks.end_of_iteration_hook if self.hooks else None,
            end_of_epoch_hook=self.end_of_epoch_hook(),
            loss_label=self.spec.label,
            amp=self.settings.amp,
            scaler=self.scaler,
            chunk_size=self.settings.cache_chunk,
        )

    def execute(self) -> RunResult:
        """Evaluate the untrained model (new runs), train, then test the best validation epoch;
        a non-finite loss fails the run."""
        start_epoch = self.restore()
        if self.checkpoint is None:
            self.evaluate_untrained()
        stopped_early = self.checkpoint is not None and self.checkpoint["stopped_early"]
        if start_epoch <= self.settings.epochs and not stopped_early:
            try:
                self.trainer().train(start_epoch=start_epoch, num_epochs=self.settings.epochs)
            except NonFiniteLossError as error:
                if self.rank == 0:
                    self.store.save_failure(str(error), self.rows)
                    self.on_rows(self.rows)
                return RunResult(rows=self.rows, error=str(error))
        if not self.tested:
            self.evaluate_test_at_best_epoch()
        return RunResult(rows=self.rows)
