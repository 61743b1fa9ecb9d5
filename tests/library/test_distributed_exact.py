"""DistributedLossWrapper(efficient=True) and DistributedMinerWrapper(efficient=True)
with 2 and 4 gloo processes under DDP, against one process on the concatenated
global batch: the loss and the gradients of a linear model, float64 (and float32).

Each world size is spawned once; its workers run every case and save the results,
which the tests compare with the one-process computation."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning import miners
from pytorch_metric_learning.utils import distributed as pml_distributed

from pml_ice import losses, reducers
from pml_ice.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper
from gloo import free_port, join_gloo

IN_FEATURES, EMBEDDING_SIZE = 6, 8
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
CASES = [
    "labels", "anchor", "float32", "unequal", "no_positive", "cross_only",
    "ref_emb", "pair_miner", "triplet_miner", "memory", "memory_miner", "own_weights",
]
PML_CASES = ["pml_efficient", "ours_efficient", "ours_not_efficient"]


def local_sizes(name, world_size):
    if name == "unequal":
        return [3, 9, 5, 7][:world_size]
    if name in PML_CASES:
        return [64 // world_size] * world_size
    return [6] * world_size


def case_labels(name, sizes, step):
    """Labels of the global batch, in rank order."""
    total = sum(sizes)
    if name == "no_positive":  # rank 0's labels occur nowhere else
        rest = torch.arange(total - sizes[0]) % 3
        return torch.cat([100 + torch.arange(sizes[0]), rest])
    if name == "cross_only":  # distinct within a rank, shared across ranks
        return torch.cat([torch.arange(size) for size in sizes])
    generator = torch.Generator().manual_seed(10 * step + len(sizes))
    classes = 8 if name in PML_CASES else 4
    return (torch.arange(total) % classes)[torch.randperm(total, generator=generator)]


def case_inputs(name, world_size, step):
    sizes = local_sizes(name, world_size)
    generator = torch.Generator().manual_seed(100 + 10 * step + world_size)
    dtype = torch.float32 if name == "float32" else torch.float64
    inputs = torch.randn(sum(sizes), IN_FEATURES, generator=generator, dtype=torch.float64)
    return sizes, inputs.to(dtype), case_labels(name, sizes, step)


def num_steps(name):
    return 2 if name.startswith("memory") else 1


def make_model(dtype):
    torch.manual_seed(0)
    return torch.nn.Linear(IN_FEATURES, EMBEDDING_SIZE).to(dtype)


class SquaredReweightReducer(reducers.ICEReweightReducer):
    """Weights ``exp(lam (1 - p)^2)``: the sharded loss must weight as its reducer does."""

    def log_weights(self, losses):
        return super().log_weights(losses) ** 2 / self.lam


def make_loss(name):
    if name == "own_weights":
        return losses.ICELoss(scale=16.0, reducer=SquaredReweightReducer(lam=2.0))
    if name in PML_CASES:
        return losses.ICELoss(scale=10.0)
    normalize = "anchor" if name == "anchor" else "batch"
    ice = losses.ICELoss(
        scale=16.0, reducer=reducers.ICEReweightReducer(lam=1.0, normalize=normalize)
    )
    if name == "memory":
        return losses.CrossBatchMemory(ice, EMBEDDING_SIZE, memory_size=30)
    if name == "memory_miner":
        miner = miners.MultiSimilarityMiner(epsilon=0.3)
        return losses.CrossBatchMemory(ice, EMBEDDING_SIZE, memory_size=30, miner=miner)
    return ice


def make_miner(name):
    if name == "pair_miner":
        return miners.MultiSimilarityMiner(epsilon=0.3)
    if name == "triplet_miner":
        return miners.TripletMarginMiner(margin=0.5, type_of_triplets="semihard")
    return None


def split_ref(embeddings, labels):
    """The ref_emb case: every other sample is a reference."""
    return embeddings[0::2], labels[0::2], embeddings[1::2], labels[1::2]


def compute_loss(name, loss_func, miner, embeddings, labels):
    if name == "ref_emb":
        queries, query_labels, refs, ref_labels = split_ref(embeddings, labels)
        return loss_func(queries, query_labels, ref_emb=refs, ref_labels=ref_labels)
    indices_tuple = None if miner is None else miner(embeddings, labels)
    return loss_func(embeddings, labels, indices_tuple)


def result_of(loss, model, loss_func):
    result = {
        "loss": loss.detach().clone(),
        "weight_grad": model.weight.grad.clone(),
        "bias_grad": model.bias.grad.clone(),
    }
    wrapped = getattr(loss_func, "loss", None)
    memory = loss_func if isinstance(loss_func, losses.CrossBatchMemory) else wrapped
    if isinstance(memory, losses.CrossBatchMemory):
        result["bank"] = memory.embedding_memory.clone()
    return result


def run_sharded(name, world_size, rank):
    """One rank's results of a case, step by step."""
    model = make_model(torch.float32 if name == "float32" else torch.float64)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    if name == "pml_efficient":
        loss_func = pml_distributed.DistributedLossWrapper(make_loss(name), efficient=True)
    else:
        efficient = name != "ours_not_efficient"
        loss_func = DistributedLossWrapper(make_loss(name), efficient=efficient)
    miner = make_miner(name)
    miner = None if miner is None else DistributedMinerWrapper(miner, efficient=True)
    results = []
    for step in range(num_steps(name)):
        sizes, inputs, labels = case_inputs(name, world_size, step)
        start = sum(sizes[:rank])
        local = slice(start, start + sizes[rank])
        model.zero_grad()
        embeddings = ddp_model(inputs[local])
        if name == "ref_emb":  # each rank's references are its odd samples
            loss = loss_func(
                embeddings[0::2], labels[local][0::2],
                ref_emb=embeddings[1::2], ref_labels=labels[local][1::2],
            )
        else:
            indices_tuple = None if miner is None else miner(embeddings, labels[local])
            loss = loss_func(embeddings, labels[local], indices_tuple)
        loss.backward()
        if name == "ours_not_efficient":  # PML's convention: world_size x the loss
            loss = loss / world_size
        results.append(result_of(loss, model, loss_func))
    return results


def run_one_process(name, world_size):
    """The same case on one process: the global batch (for ref_emb: the
    concatenation of every rank's queries, and of every rank's references)."""
    model = make_model(torch.float32 if name == "float32" else torch.float64)
    loss_func, miner = make_loss(name), make_miner(name)
    results = []
    for step in range(num_steps(name)):
        sizes, inputs, labels = case_inputs(name, world_size, step)
        model.zero_grad()
        embeddings = model(inputs)
        if name == "ref_emb":
            parts = [
                split_ref(e, l) for e, l in zip(embeddings.split(sizes), labels.split(sizes))
            ]
            queries, query_labels, refs, ref_labels = (
                torch.cat([part[k] for part in parts]) for k in range(4)
            )
            loss = loss_func(queries, query_labels, ref_emb=refs, ref_labels=ref_labels)
        else:
            loss = compute_loss(name, loss_func, miner, embeddings, labels)
        loss.backward()
        results.append(result_of(loss, model, loss_func))
    return results


def worker(rank, world_size, port, names, out_dir):
    join_gloo(rank, world_size, port)
    try:
        results = {name: run_sharded(name, world_size, rank) for name in names}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(world_size, names, out_dir):
    mp.spawn(worker, args=(world_size, free_port(), names, str(out_dir)), nprocs=world_size)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world_size)]


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    """{world_size: [rank results]}, two spawns for the whole module."""
    return {
        2: spawn(2, CASES + PML_CASES, tmp_path_factory.mktemp("two")),
        4: spawn(4, CASES, tmp_path_factory.mktemp("four")),
    }


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def max_errors(per_rank, expected):
    """The largest relative error of each quantity, over ranks and steps."""
    errors = {}
    for rank_results in per_rank:
        for got, want in zip(rank_results, expected):
            for key, value in want.items():
                errors[key] = max(errors.get(key, 0.0), relative_error(got[key], value))
    return errors


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name", CASES)
def test_sharded_equals_one_process(sharded_results, world_size, name):
    """Loss, DDP-averaged weight and bias gradients (and the memory bank) of every
    rank equal those of one process on the global batch."""
    expected = run_one_process(name, world_size)
    per_rank = [rank_results[name] for rank_results in sharded_results[world_size]]
    tolerance = TOLERANCE[torch.float32 if name == "float32" else torch.float64]
    errors = max_errors(per_rank, expected)
    print(name, world_size, {key: f"{value:.2e}" for key, value in errors.items()})
    assert expected[-1]["loss"] > 0
    for key, error in errors.items():
        assert error <= tolerance, f"{name}, {world_size} processes: {key} error {error:.2e}"


@pytest.mark.timeout(300)
def test_pml_efficient_drops_gradient_ours_is_exact(sharded_results):
    """ICELoss(scale=10), 64 samples, 2 processes, float64: PML's efficient=True loses
    the gathered embeddings' gradient; ours is exact, and efficient=False is PML's
    (exact, returning world_size x the loss)."""
    expected = run_one_process("pml_efficient", 2)
    per_rank = {
        name: [rank_results[name] for rank_results in sharded_results[2]] for name in PML_CASES
    }
    pml_error = max_errors(per_rank["pml_efficient"], expected)["weight_grad"]
    ours = max_errors(per_rank["ours_efficient"], expected)
    print(f"weight gradient error: PML {pml_error:.2%}, ours {ours['weight_grad']:.2e}")
    assert pml_error > 0.1
    assert max(ours.values()) <= 1e-12
    assert max(max_errors(per_rank["ours_not_efficient"], expected).values()) <= 1e-12


def test_efficient_rejects_losses_it_cannot_shard_exactly():
    with pytest.raises(ValueError, match="not ICELoss"):
        DistributedLossWrapper(losses.ContrastiveLoss(), efficient=True)
    with pytest.raises(ValueError, match="MeanReducer, not ICEReweightReducer"):
        DistributedLossWrapper(losses.ICELoss(reducer=reducers.MeanReducer()), efficient=True)
    with pytest.raises(ValueError, match="not ICELoss"):
        DistributedLossWrapper(
            losses.CrossBatchMemory(losses.ContrastiveLoss(), 8), efficient=True
        )
    DistributedLossWrapper(losses.ContrastiveLoss(), efficient=False)
