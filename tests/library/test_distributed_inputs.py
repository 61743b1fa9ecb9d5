"""Bad inputs to the distributed wrappers with 2 gloo processes: every process raises
the same clear error before any data is gathered (none is left waiting in a
collective, and the group stays usable), the wrappers refuse each other's tuples, and
without a process group the wrapper returns the local loss.

One spawn runs every case in order; each rank records what each case returned or
raised, and the tests read the records."""

import os
import re
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning import miners
from pytorch_metric_learning.regularizers import LpRegularizer
from pytorch_metric_learning.utils import distributed as pml_distributed

from pml_ice import losses
from pml_ice.utils.distributed import (
    DistributedLossWrapper,
    DistributedMinerWrapper,
    ShardedIndicesTuple,
)
from gloo import free_port, join_gloo

BATCH, WIDTH = 8, 4


def local_batch(rank, n=BATCH, width=WIDTH):
    generator = torch.Generator().manual_seed(10 + rank)
    embeddings = torch.randn(n, width, generator=generator, dtype=torch.float64)
    return embeddings.requires_grad_(), torch.arange(n) % 3


def sharded_ice():
    return DistributedLossWrapper(losses.ICELoss(scale=10.0), efficient=True)


def sharded_memory():
    memory = losses.CrossBatchMemory(losses.ICELoss(scale=10.0), WIDTH, memory_size=64)
    return DistributedLossWrapper(memory, efficient=True)


def our_miner(efficient=True):
    return DistributedMinerWrapper(miners.MultiSimilarityMiner(epsilon=0.3), efficient=efficient)


def nan_labels(rank):
    x, y = local_batch(rank)
    y = y.double()
    if rank == 1:
        y[0] = float("nan")
    return sharded_ice()(x, y)


def integer_embeddings(rank):
    x, y = local_batch(rank)
    return sharded_ice()((10 * x).long() if rank == 1 else x, y)


def index_beyond_global_batch(rank):
    """Rank 1 points a positive at 2 * BATCH, one past the gathered batch."""
    x, y = local_batch(rank)
    anchors, positives, negatives = torch.tensor([0]), torch.tensor([BATCH + 1]), torch.tensor([2])
    if rank == 1:
        positives = torch.tensor([2 * BATCH])
    return sharded_ice()(x, y, ShardedIndicesTuple((anchors, positives, negatives)))


def index_into_other_rank(rank):
    """Indices past the local batch but inside the gathered one are valid."""
    x, y = local_batch(rank)
    indices = (torch.tensor([0]), torch.tensor([BATCH + 3]), torch.tensor([2 * BATCH - 1]))
    return sharded_ice()(x, y, ShardedIndicesTuple(indices))


def ref_emb_of_other_width(rank):
    x, y = local_batch(rank)
    ref_emb = torch.randn(BATCH, WIDTH - 1 if rank == 1 else WIDTH, dtype=torch.float64)
    return sharded_ice()(x, y, ref_emb=ref_emb, ref_labels=y)


def ref_emb_without_ref_labels(rank):
    x, y = local_batch(rank)
    return sharded_ice()(x, y, ref_emb=x.detach().clone())


def memory_nan_labels(rank):
    """The memory must be left as it was: queue_idx 0 after the refusal."""
    x, y = local_batch(rank)
    y = y.double()
    if rank == 1:
        y[0] = float("nan")
    wrapper = sharded_memory()
    try:
        return wrapper(x, y)
    finally:
        assert wrapper.loss.queue_idx == 0 and not wrapper.loss.has_been_filled


def memory_integer_embeddings(rank):
    x, y = local_batch(rank)
    return sharded_memory()((10 * x).long() if rank == 1 else x, y)


def memory_of_other_width(rank):
    x, y = local_batch(rank, width=WIDTH + 1)
    return sharded_memory()(x, y)


def pml_efficient_miner_to_our_efficient_loss(rank):
    x, y = local_batch(rank)
    miner = pml_distributed.DistributedMinerWrapper(
        miners.MultiSimilarityMiner(epsilon=0.3), efficient=True
    )
    return sharded_ice()(x, y, miner(x, y))


def our_efficient_miner_to_our_gathering_loss(rank):
    x, y = local_batch(rank)
    loss_func = DistributedLossWrapper(losses.ICELoss(scale=10.0), efficient=False)
    return loss_func(x, y, our_miner()(x, y))


def our_efficient_miner_and_loss(rank):
    x, y = local_batch(rank)
    return sharded_ice()(x, y, our_miner()(x, y))


def pml_gathering_miner_to_our_gathering_loss(rank):
    x, y = local_batch(rank)
    miner = pml_distributed.DistributedMinerWrapper(miners.MultiSimilarityMiner(epsilon=0.3))
    loss_func = DistributedLossWrapper(losses.ICELoss(scale=10.0), efficient=False)
    return loss_func(x, y, miner(x, y)) / 2


def pml_gathering_miner_to_pml_gathering_loss(rank):
    x, y = local_batch(rank)
    miner = pml_distributed.DistributedMinerWrapper(miners.MultiSimilarityMiner(epsilon=0.3))
    loss_func = pml_distributed.DistributedLossWrapper(losses.ICELoss(scale=10.0))
    return loss_func(x, y, miner(x, y)) / 2


def widths_differ(rank):
    x, y = local_batch(rank, width=WIDTH + rank)
    return sharded_ice()(x, y)


def embedding_dtypes_differ(rank):
    x, y = local_batch(rank)
    return sharded_ice()(x.float() if rank == 1 else x, y)


def label_dtypes_differ_int32(rank):
    x, y = local_batch(rank)
    return sharded_ice()(x, y.int() if rank == 1 else y)


def label_dtypes_differ_float32(rank):
    x, y = local_batch(rank)
    return sharded_ice()(x, y.float() if rank == 1 else y)


def labels_on_one_rank_only(rank):
    """Rank 0 pairs by labels, rank 1 by mined indices alone."""
    x, y = local_batch(rank)
    if rank == 0:
        return sharded_ice()(x, y)
    indices = (torch.tensor([0]), torch.tensor([3]), torch.tensor([1]))
    return sharded_ice()(x, None, ShardedIndicesTuple(indices))


def memory_dtypes_differ(rank):
    x, y = local_batch(rank)
    return sharded_memory()(x.float() if rank == 1 else x, y)


def miner_widths_differ(rank):
    x, y = local_batch(rank, width=WIDTH + rank)
    return our_miner()(x, y)[0].sum()


def gathering_loss_with_unequal_batches(rank):
    x, y = local_batch(rank, n=BATCH - 2 * rank)
    return DistributedLossWrapper(losses.ICELoss(scale=10.0), efficient=False)(x, y)


def sharded_loss_with_unequal_batches(rank):
    x, y = local_batch(rank, n=BATCH - 2 * rank)
    return sharded_ice()(x, y)


CASES = [
    nan_labels, integer_embeddings, index_beyond_global_batch, index_into_other_rank,
    ref_emb_of_other_width, ref_emb_without_ref_labels, memory_nan_labels,
    memory_integer_embeddings, memory_of_other_width,
    pml_efficient_miner_to_our_efficient_loss, our_efficient_miner_to_our_gathering_loss,
    our_efficient_miner_and_loss, pml_gathering_miner_to_our_gathering_loss,
    pml_gathering_miner_to_pml_gathering_loss, widths_differ, embedding_dtypes_differ,
    label_dtypes_differ_int32, label_dtypes_differ_float32, labels_on_one_rank_only,
    memory_dtypes_differ, miner_widths_differ, gathering_loss_with_unequal_batches,
    sharded_loss_with_unequal_batches,
]


def outcome(case, rank):
    """("value", loss) or ("error", type name, message)."""
    try:
        return ("value", float(case(rank)))
    except (ValueError, TypeError) as error:
        return ("error", type(error).__name__, str(error))


def worker(rank, world_size, port, out_dir):
    join_gloo(rank, world_size, port)
    warnings.simplefilter("ignore")
    try:
        results = {case.__name__: outcome(case, rank) for case in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{case: [outcome of rank 0, outcome of rank 1]}."""
    out_dir = tmp_path_factory.mktemp("inputs")
    mp.spawn(worker, args=(2, free_port(), str(out_dir)), nprocs=2)
    ranks = [torch.load(out_dir / f"rank{rank}.pt") for rank in range(2)]
    return {case.__name__: [ranks[0][case.__name__], ranks[1][case.__name__]] for case in CASES}


def same_error(outcomes, case, error_type, pattern):
    """Both ranks raised one error of ``error_type``, whose message matches ``pattern``."""
    first, second = outcomes[case]
    assert first == second, (first, second)
    assert first[:2] == ("error", error_type), first
    assert re.search(pattern, first[2]), first[2]
    return first[2]


ICE_CHECKS = [
    ("nan_labels", "ValueError", r"^process 1: ICELoss: labels contain NaN"),
    ("integer_embeddings", "TypeError", r"^process 1: ICELoss: embeddings must be floating point"),
    ("index_beyond_global_batch", "ValueError",
     r"^process 1: ICELoss: indices_tuple\[1\] has indices outside \[0, 16\)"),
    ("ref_emb_of_other_width", "ValueError",
     r"^process 1: ICELoss: ref_emb has embedding size 3 but embeddings have 4"),
    ("ref_emb_without_ref_labels", "ValueError",
     r"^processes 0, 1: ICELoss: ref_labels are required with ref_emb"),
    ("memory_nan_labels", "ValueError", r"^process 1: CrossBatchMemory: labels contain NaN"),
    ("memory_integer_embeddings", "TypeError",
     r"^process 1: CrossBatchMemory: embeddings must be floating point"),
    ("memory_of_other_width", "ValueError",
     r"^processes 0, 1: CrossBatchMemory: embeddings have size 5 but embedding_size is 4"),
]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case, error_type, pattern", ICE_CHECKS, ids=[c[0] for c in ICE_CHECKS])
def test_sharded_loss_runs_ice_checks_on_every_rank(outcomes, case, error_type, pattern):
    """ICELoss's (and CrossBatchMemory's) own checks, the same error on both ranks."""
    same_error(outcomes, case, error_type, pattern)


@pytest.mark.timeout(300)
def test_indices_within_the_gathered_batch_are_accepted(outcomes):
    first, second = outcomes["index_into_other_rank"]
    assert first[0] == "value" and first == second


WRONG_PAIRS = [
    ("pml_efficient_miner_to_our_efficient_loss",
     r"DistributedLossWrapper\(efficient=True\) needs the indices_tuple of pml_ice's "
     r"DistributedMinerWrapper\(miner, efficient=True\).*PML's DistributedMinerWrapper"),
    ("our_efficient_miner_to_our_gathering_loss",
     r"DistributedLossWrapper\(efficient=False\).*DistributedMinerWrapper\(efficient=True\).*"
     r"efficient=True for both wrappers \(ICELoss\) or efficient=False for both"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case, pattern", WRONG_PAIRS, ids=[c[0] for c in WRONG_PAIRS])
def test_wrappers_that_do_not_belong_together_are_refused(outcomes, case, pattern):
    same_error(outcomes, case, "ValueError", pattern)


@pytest.mark.timeout(300)
def test_wrappers_that_belong_together_agree(outcomes):
    """Ours with ours (efficient=True), PML's gathering miner with either gathering
    loss wrapper: the loss of the global batch with the tuples mined on it, on both
    ranks (PML's gathering orders the batch per rank: equal to rounding)."""
    cases = [
        "our_efficient_miner_and_loss",
        "pml_gathering_miner_to_our_gathering_loss",
        "pml_gathering_miner_to_pml_gathering_loss",
    ]
    values = []
    for case in cases:
        for result in outcomes[case]:
            assert result[0] == "value", (case, result)
            values.append(result[1])
    assert values[0] > 0
    assert values == pytest.approx([values[0]] * len(values), rel=1e-12)


DISAGREEMENTS = [
    ("widths_differ", r"the embedding width \(process 0: 4, process 1: 5\)"),
    ("embedding_dtypes_differ",
     r"the embeddings' dtype \(process 0: torch.float64, process 1: torch.float32\)"),
    ("label_dtypes_differ_int32",
     r"the labels' dtype \(process 0: torch.int64, process 1: torch.int32\)"),
    ("label_dtypes_differ_float32",
     r"the labels' dtype \(process 0: torch.int64, process 1: torch.float32\)"),
    ("labels_on_one_rank_only",
     r"the labels' dtype \(process 0: torch.int64, process 1: not given\)"),
    ("memory_dtypes_differ", r"the embeddings' dtype"),
    ("miner_widths_differ", r"^DistributedMinerWrapper: .*the embedding width"),
    ("gathering_loss_with_unequal_batches",
     r"the batch size \(process 0: 8, process 1: 6\).*efficient=True, which allows unequal"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case, pattern", DISAGREEMENTS, ids=[c[0] for c in DISAGREEMENTS])
def test_ranks_that_disagree_get_one_clear_error(outcomes, case, pattern):
    """Before the fix gloo aborted the processes ("Received data size doesn't match")."""
    message = same_error(outcomes, case, "ValueError", pattern)
    assert "the processes disagree on" in message


@pytest.mark.timeout(300)
def test_the_group_stays_usable_after_the_errors(outcomes):
    """The last case, after every refusal, runs (unequal batches are fine sharded)."""
    first, second = outcomes["sharded_loss_with_unequal_batches"]
    assert first[0] == "value" and first == second


@pytest.mark.parametrize("efficient", [True, False])
def test_memory_without_a_process_group_is_the_local_loss(efficient):
    """Before the fix: TypeError about positional arguments."""
    x, y = local_batch(0)
    expected = losses.CrossBatchMemory(losses.ICELoss(scale=10.0), WIDTH, memory_size=64)(x, y)
    memory = losses.CrossBatchMemory(losses.ICELoss(scale=10.0), WIDTH, memory_size=64)
    with pytest.warns(UserWarning, match="torch.distributed is not initialised"):
        loss = DistributedLossWrapper(memory, efficient=efficient)(x, y)
    assert torch.equal(loss, expected)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="neither ref_emb"):
        DistributedLossWrapper(memory, efficient=efficient)(x, y, ref_emb=x)


def test_embedding_regularizer_is_named():
    """It used to blame MultipleReducers, the reducer PML builds around it."""
    loss = losses.ICELoss(embedding_regularizer=LpRegularizer())
    with pytest.raises(ValueError, match=r"has an embedding regularizer \(LpRegularizer\)"):
        DistributedLossWrapper(loss, efficient=True)
