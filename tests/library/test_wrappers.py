"""ICE inside PML's wrappers: CrossBatchMemory, SelfSupervisedLoss, MultipleLosses
and DistributedLossWrapper with two real processes."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning import miners
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

from pml_ice import losses, reducers
from gloo import free_port, join_gloo
from reference import ice_reference, per_pair_losses, reduce_pair_losses

SCALE = 16.0
LAM = 1.0


def make_ice(normalize="batch", scale=SCALE, lam=LAM):
    return losses.ICELoss(
        scale=scale, reducer=reducers.ICEReweightReducer(lam=lam, normalize=normalize)
    )


def ring_buffer_contents(batches, memory_size):
    """Simulates a FIFO memory of memory_size slots fed with the batches; returns the
    filled slots' embeddings and labels and, for the last batch, each sample's slot."""
    dim = batches[0][0].shape[1]
    memory = torch.zeros(memory_size, dim, dtype=torch.float64)
    memory_labels = torch.zeros(memory_size, dtype=torch.long)
    position, last_slots = 0, []
    for embeddings, labels in batches:
        last_slots = []
        for embedding, label in zip(embeddings, labels):
            slot = position % memory_size
            memory[slot], memory_labels[slot] = embedding, label
            last_slots.append(slot)
            position += 1
    filled = min(position, memory_size)
    return memory[:filled], memory_labels[:filled], last_slots


@pytest.mark.parametrize("normalize", ["batch", "anchor"])
@pytest.mark.parametrize("memory_size", [20, 30])
def test_cross_batch_memory_equals_reference_on_memory(
    agreement, make_batch, memory_size, normalize
):
    """Two batches of 12 through a memory of 30 (not full) or 20 (wrapped around):
    the second loss is ICE of the second batch against the memory, without the
    anchor's own slot."""
    first = make_batch(n=12, n_classes=4, seed=31, dtype=torch.float64)
    second = make_batch(n=12, n_classes=4, seed=32, dtype=torch.float64)
    loss_func = losses.CrossBatchMemory(
        make_ice(normalize), embedding_size=8, memory_size=memory_size
    )
    loss_func(*first)
    anchors = second[0].clone().requires_grad_()
    loss = loss_func(anchors, second[1])
    loss.backward()

    cpu_batches = [(e.cpu(), l.cpu()) for e, l in (first, second)]
    memory, memory_labels, own_slots = ring_buffer_contents(cpu_batches, memory_size)
    positives, negatives = {}, {}
    for i, label in enumerate(second[1].tolist()):
        for j, memory_label in enumerate(memory_labels.tolist()):
            if j == own_slots[i]:
                continue
            target = positives if memory_label == label else negatives
            target.setdefault(i, set()).add(j)
    reference_anchors = second[0].cpu().clone().requires_grad_()
    expected = reduce_pair_losses(
        per_pair_losses(reference_anchors, memory, positives, negatives, SCALE),
        LAM,
        normalize,
    )
    expected.backward()
    agreement.check("CrossBatchMemory loss float64", loss, expected, 1e-9)
    agreement.check(
        "CrossBatchMemory grad float64", anchors.grad, reference_anchors.grad, 1e-8
    )


@pytest.mark.parametrize("symmetric", [True, False])
def test_self_supervised_loss_matches_reference(agreement, make_batch, symmetric):
    embeddings, _ = make_batch(n=8, seed=33, dtype=torch.float64)
    augmented = embeddings + 0.3 * make_batch(n=8, seed=34, dtype=torch.float64)[0]
    loss = losses.SelfSupervisedLoss(make_ice(), symmetric=symmetric)(
        embeddings, augmented
    )
    ids = torch.arange(8)
    if symmetric:
        expected = ice_reference(
            torch.cat([embeddings, augmented]).cpu(),
            torch.cat([ids, ids]),
            scale=SCALE,
            lam=LAM,
        )
    else:
        expected = ice_reference(
            embeddings.cpu(), ids, None, augmented.cpu(), ids, scale=SCALE, lam=LAM
        )
    agreement.check("SelfSupervisedLoss loss float64", loss, expected, 1e-9)


def test_multiple_losses_sums_weighted_references(agreement, make_batch):
    embeddings, labels = make_batch(n=12, n_classes=3, seed=35, dtype=torch.float64)
    miner = miners.MultiSimilarityMiner(epsilon=0.1)
    combined = losses.MultipleLosses(
        [make_ice("batch", 8.0, 1.0), make_ice("anchor", 16.0, 0.0)],
        miners=[None, miner],
        weights=[1.0, 0.5],
    )
    value = combined(embeddings, labels)
    indices_tuple = tuple(t.cpu() for t in miner(embeddings, labels))
    expected = ice_reference(
        embeddings.cpu(), labels.cpu(), scale=8.0, lam=1.0
    ) + 0.5 * ice_reference(
        embeddings.cpu(),
        labels.cpu(),
        indices_tuple,
        scale=16.0,
        lam=0.0,
        normalize="anchor",
    )
    agreement.check("MultipleLosses loss float64", value, expected, 1e-9)


def distributed_worker(rank, world_size, port, inputs, labels, weight, efficient, out_dir):
    """One rank: its slice of the inputs through a shared linear layer, ICE under
    DistributedLossWrapper, backward, then DDP's averaging of the layer gradient."""
    join_gloo(rank, world_size, port)
    try:
        local_inputs = inputs.chunk(world_size)[rank]
        local_labels = labels.chunk(world_size)[rank]
        layer_weight = weight.clone().requires_grad_()
        embeddings = local_inputs @ layer_weight
        embeddings.retain_grad()
        wrapper = DistributedLossWrapper(make_ice(), efficient=efficient)
        loss = wrapper(embeddings, local_labels)
        loss.backward()
        dist.all_reduce(layer_weight.grad)
        layer_weight.grad /= world_size
        torch.save(
            {
                "loss": loss.detach(),
                "embeddings": embeddings.detach(),
                "embedding_grad": embeddings.grad,
                "weight_grad": layer_weight.grad,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def run_two_ranks(inputs, labels, weight, efficient, tmp_path):
    mp.spawn(
        distributed_worker,
        args=(2, free_port(), inputs, labels, weight, efficient, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]


@pytest.fixture
def distributed_problem():
    generator = torch.Generator().manual_seed(36)
    inputs = torch.randn(16, 6, generator=generator, dtype=torch.float64)
    labels = (torch.arange(16) % 5)[torch.randperm(16, generator=generator)]
    weight = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    return inputs, labels, weight


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_distributed_wrapper_equals_one_process(agreement, distributed_problem, tmp_path):
    """DistributedLossWrapper returns world_size x the loss of the gathered batch, and
    its gradient flows to the local embeddings only; so each rank's loss / 2 and
    embedding gradient / 2 equal the one-process ones, and the DDP-averaged layer
    gradient equals the one-process layer gradient."""
    inputs, labels, weight = distributed_problem
    results = run_two_ranks(inputs, labels, weight, False, tmp_path)

    single_weight = weight.clone().requires_grad_()
    embeddings = inputs @ single_weight
    embeddings.retain_grad()
    single_loss = make_ice()(embeddings, labels)
    single_loss.backward()
    embedding_grads = embeddings.grad.chunk(2)
    reference = ice_reference(embeddings.detach(), labels, scale=SCALE, lam=LAM)
    agreement.check("one process vs reference loss float64", single_loss, reference, 1e-9)
    for rank, result in enumerate(results):
        agreement.check(
            "DistributedLossWrapper loss float64", result["loss"] / 2, single_loss, 1e-12
        )
        agreement.check(
            "DistributedLossWrapper embedding grad float64",
            result["embedding_grad"] / 2,
            embedding_grads[rank],
            1e-10,
        )
        agreement.check(
            "DistributedLossWrapper DDP-averaged weight grad float64",
            result["weight_grad"],
            single_weight.grad,
            1e-10,
        )


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_distributed_wrapper_efficient_mode(agreement, distributed_problem, tmp_path):
    """efficient=True: each rank's loss is world_size x ICE of its own anchors
    against the gathered batch (own samples first), without self pairs."""
    inputs, labels, weight = distributed_problem
    results = run_two_ranks(inputs, labels, weight, True, tmp_path)
    embeddings = (inputs @ weight).chunk(2)
    label_chunks = labels.chunk(2)
    for rank, result in enumerate(results):
        other = 1 - rank
        local = embeddings[rank].clone().requires_grad_()
        gathered = torch.cat([local, embeddings[other]])
        gathered_labels = torch.cat([label_chunks[rank], label_chunks[other]])
        positives, negatives = {}, {}
        for i, label in enumerate(label_chunks[rank].tolist()):
            for j, ref_label in enumerate(gathered_labels.tolist()):
                if i != j:
                    target = positives if ref_label == label else negatives
                    target.setdefault(i, set()).add(j)
        expected = 2 * reduce_pair_losses(
            per_pair_losses(local, gathered, positives, negatives, SCALE), LAM
        )
        expected.backward()
        agreement.check(
            "DistributedLossWrapper(efficient) loss float64", result["loss"], expected, 1e-9
        )
        agreement.check(
            "DistributedLossWrapper(efficient) embedding grad float64",
            result["embedding_grad"],
            local.grad,
            1e-8,
        )


def test_losses_namespace_is_a_drop_in_for_pml():
    """Every PML loss is available from pml_ice.losses; the two wrappers that check
    class names are subclasses that also accept ICELoss."""
    import pytorch_metric_learning.losses as pml_losses

    wrappers = {"CrossBatchMemory", "SelfSupervisedLoss"}
    for name in dir(pml_losses):
        attribute = getattr(pml_losses, name)
        if name.startswith("_") or not isinstance(attribute, type):
            continue
        if name in wrappers:
            assert issubclass(getattr(losses, name), attribute), name
        else:
            assert getattr(losses, name) is attribute, name
    losses.CrossBatchMemory(losses.ContrastiveLoss(), embedding_size=8)
    losses.SelfSupervisedLoss(losses.NTXentLoss())
