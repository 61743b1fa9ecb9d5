"""PML's DistributedLossWrapper and DistributedMinerWrapper, with an exact sharded
mode for ICE (``efficient=True``).

Notation: ``R`` processes, process ``r`` holds ``n_r`` samples, the global batch is
their concatenation in rank order (``N = sum n_r``), and ``L`` is the loss of one
process on the global batch.
"""

import warnings
from functools import partial

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import distributed as pml_distributed
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ..checks import check_indices_tuple, check_loss_tensors
from ..losses import ICELoss
from ..reducers import ICEReweightReducer
from .agreement import agree_on_inputs, error_of, raise_together

LOSS_WRAPPER, MINER_WRAPPER = "DistributedLossWrapper", "DistributedMinerWrapper"


class DistributedLossWrapper(pml_distributed.DistributedLossWrapper):
    """PML's wrapper; ``efficient=True`` shards ICE exactly.

    ``efficient=False`` is PML's: every process computes the loss of the whole
    gathered batch (``N x N`` logits), with gradient to its own embeddings only.

    ``efficient=True`` (ICELoss with ICEReweightReducer and no embedding regularizer,
    alone or inside CrossBatchMemory; anything else raises ``ValueError``): process
    ``r`` computes the terms of its own anchors against the global batch (``n_r x N``
    logits), without an anchor's pair with its own gathered copy. The gathered
    embeddings carry their gradient back to the processes that made them. With the
    weights ``w`` constant in backward, the normalisers are global sums, all-reduced
    without gradient:

        normalize="batch":  L = sum_r S_r / W,  S_r = sum_{r's pairs} w l,  W = sum of all w
        normalize="anchor": L = sum_r S_r / A,  S_r = sum of r's per-anchor means,
                            A = the global number of anchors with a pair

    Every process returns the value ``L`` whose gradient is that of ``R * S_r / W``
    (or ``R * S_r / A``): DDP averages the parameter gradients over the ``R``
    processes, so they equal those of ``L`` on the global batch. An ``indices_tuple``
    must come from :class:`DistributedMinerWrapper` with ``efficient=True`` (anchors
    local, other indices into the global batch), and that wrapper's tuples are refused
    by ``efficient=False``; with ``ref_emb`` the reference set is the gathered
    ``ref_emb``. Batch sizes may differ between processes. Under CrossBatchMemory
    every process enqueues the whole gathered batch, so the bank is the same
    everywhere, and computes its own anchors against it; ``indices_tuple`` and
    ``enqueue_mask`` are then not accepted.

    Before any data is gathered, every process checks its inputs (with
    ``efficient=True`` ICELoss's own checks, the indices against the global batch) and
    the processes compare widths, dtypes and which optional inputs are given (with
    ``efficient=False`` also batch sizes): a failure raises the same error in every
    process. Without a process group the loss of the local batch is returned, with a
    warning.
    """

    def __init__(self, loss, efficient=False):
        super().__init__(loss, efficient=False)
        if efficient:
            check_exactly_shardable(loss)
        self.efficient = efficient

    def forward(
        self,
        embeddings,
        labels=None,
        indices_tuple=None,
        ref_emb=None,
        ref_labels=None,
        enqueue_mask=None,
    ):
        args = (embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask)
        if not is_sharded():
            return self.local_loss(*args)
        if not self.efficient:
            return self.forward_gathered(*args)
        if isinstance(self.loss, pml_losses.CrossBatchMemory):
            return self.forward_sharded_memory(*args)
        return self.forward_sharded(*args[:5])

    def local_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask):
        """One process: the wrapped loss of the local batch (with a warning when
        torch.distributed is not initialised)."""
        if not pml_distributed.is_distributed():
            warnings.warn(
                f"{LOSS_WRAPPER}: torch.distributed is not initialised; returning the loss "
                "of this process's batch"
            )
        if not isinstance(self.loss, pml_losses.CrossBatchMemory):
            return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        check_no_ref_emb(ref_emb, ref_labels)
        return self.loss(embeddings, labels, indices_tuple, enqueue_mask)

    def forward_gathered(
        self, embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask
    ):
        """``efficient=False``: PML's gathering, once the processes agree on the inputs."""
        agree_on_inputs(
            LOSS_WRAPPER, partial(check_tuple_origin, indices_tuple, efficient=False),
            embeddings, labels, indices_tuple is not None, ref_emb, ref_labels, enqueue_mask,
            equal_sizes=True,
        )
        return super().forward(
            embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask
        )

    def forward_sharded(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        def check():
            check_tuple_origin(indices_tuple, efficient=True)
            check_loss_tensors(embeddings, labels, indices_tuple is not None, ref_emb, ref_labels)

        sizes, ref_sizes = agree_on_inputs(
            LOSS_WRAPPER, check, embeddings, labels, indices_tuple is not None, ref_emb, ref_labels
        )
        shards = Shards(sizes)
        ref_shards = shards if ref_emb is None else Shards(ref_sizes)
        if indices_tuple is not None:  # then every process has one and takes part
            raise_together(
                error_of(
                    check_indices_tuple, indices_tuple, len(embeddings), sum(ref_shards.sizes)
                )
            )
        labels = None if labels is None else c_f.to_device(labels, embeddings)
        if ref_emb is None:
            refs = shards.gather(embeddings, with_grad=True)
            ref_labels = None if labels is None else shards.gather(labels)
        else:
            refs = ref_shards.gather(ref_emb, with_grad=True)
            ref_labels = (
                None
                if ref_labels is None
                else ref_shards.gather(c_f.to_device(ref_labels, ref_emb))
            )
        self.loss.reset_stats()
        info = self.loss.compute_loss(embeddings, labels, indices_tuple, refs, ref_labels)
        losses, indices = info["loss"]["losses"], info["loss"]["indices"]
        if torch.is_tensor(losses) and ref_emb is None and indices_tuple is None:
            not_self = indices[1] != indices[0] + shards.offset
            losses, indices = losses[not_self], (indices[0][not_self], indices[1][not_self])
        return sharded_reduction(self.loss.reducer, losses, indices, refs)

    def forward_sharded_memory(
        self, embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask
    ):
        memory = self.loss

        def check():
            check_no_ref_emb(ref_emb, ref_labels)
            if indices_tuple is not None or enqueue_mask is not None:
                raise ValueError(
                    f"{LOSS_WRAPPER}(CrossBatchMemory, efficient=True) accepts neither "
                    "indices_tuple nor enqueue_mask; use efficient=False for them"
                )
            memory.check_batch(embeddings, labels)

        sizes, _ = agree_on_inputs(
            LOSS_WRAPPER, check, embeddings, labels, indices_tuple is not None, ref_emb,
            ref_labels, enqueue_mask,
        )
        if sum(sizes) > memory.memory_size:
            raise ValueError(
                f"{LOSS_WRAPPER}: the gathered batch ({sum(sizes)}) is larger "
                f"than CrossBatchMemory's memory_size ({memory.memory_size})"
            )
        labels = c_f.to_device(labels, embeddings)
        shards = Shards(sizes)
        all_emb, all_labels = shards.gather(embeddings.detach()), shards.gather(labels)
        memory.reset_stats()
        memory.loss.reset_stats()
        memory.embedding_memory = c_f.to_device(
            memory.embedding_memory, embeddings, dtype=embeddings.dtype
        )
        memory.label_memory = c_f.to_device(memory.label_memory, labels, dtype=labels.dtype)
        memory.add_to_memory(all_emb, all_labels, len(all_emb))
        filled = memory.memory_size if memory.has_been_filled else memory.queue_idx
        bank, bank_labels = memory.embedding_memory[:filled], memory.label_memory[:filled]
        if memory.miner is None:
            indices_tuple = lmu.get_all_pairs_indices(labels, bank_labels)
        else:
            mined = memory.miner(all_emb, all_labels, bank, bank_labels)
            indices_tuple = shards.local_tuples(mined)
        own_slots = memory.curr_batch_idx[shards.offset : shards.offset + len(embeddings)]
        indices_tuple = without_self_pairs(indices_tuple, own_slots)
        info = memory.loss.compute_loss(embeddings, labels, indices_tuple, bank, bank_labels)
        losses, indices = info["loss"]["losses"], info["loss"]["indices"]
        return sharded_reduction(memory.loss.reducer, losses, indices, embeddings)


class DistributedMinerWrapper(pml_distributed.DistributedMinerWrapper):
    """PML's wrapper; ``efficient=True`` mines for DistributedLossWrapper's exact mode.

    With ``efficient=True`` every process runs the miner on the whole gathered batch
    (rank order; ``ref_emb`` gathered likewise), so any deterministic miner finds
    exactly its one-process tuples, at the cost of an ``N x N`` mining step on every
    process. It returns the tuples whose anchor is local as a
    :class:`ShardedIndicesTuple`: anchors numbered within the local batch, the other
    indices pointing into the gathered batch. ``efficient=False`` is PML's. Before
    anything is gathered the processes agree on their inputs, as in
    DistributedLossWrapper.
    """

    def forward(self, emb, labels, ref_emb=None, ref_labels=None):
        if not is_sharded():
            return super().forward(emb, labels, ref_emb, ref_labels)
        sizes, ref_sizes = agree_on_inputs(
            MINER_WRAPPER, partial(check_miner_labels, labels, ref_emb, ref_labels),
            emb, labels, False, ref_emb, ref_labels, equal_sizes=not self.efficient,
        )
        if not self.efficient:
            return super().forward(emb, labels, ref_emb, ref_labels)
        labels = c_f.to_device(labels, emb)
        shards = Shards(sizes)
        all_emb, all_labels = shards.gather(emb.detach()), shards.gather(labels)
        if ref_emb is None:
            mined = self.miner(all_emb, all_labels)
        else:
            ref_shards = Shards(ref_sizes)
            all_ref_emb = ref_shards.gather(ref_emb.detach())
            all_ref_labels = ref_shards.gather(c_f.to_device(ref_labels, ref_emb))
            mined = self.miner(all_emb, all_labels, all_ref_emb, all_ref_labels)
        return ShardedIndicesTuple(shards.local_tuples(mined))


class ShardedIndicesTuple(tuple):
    """Mined indices in the convention of ``DistributedLossWrapper(efficient=True)``:
    anchors numbered within the local batch, the other indices pointing into the
    gathered batch (rank order), as ``DistributedMinerWrapper(efficient=True)``
    returns them. PML's miner wrapper numbers the gathered batch otherwise (with
    ``efficient=True`` the local batch first; with ``efficient=False`` every index,
    anchors too, points into the gathered batch), and so does a miner run on the local
    batch alone, so the loss wrapper tells the conventions apart by this type."""


def check_tuple_origin(indices_tuple, efficient):
    """Tuples of the loss wrapper's convention: sharded ones for ``efficient=True``,
    any other for ``efficient=False``."""
    if indices_tuple is None or efficient == isinstance(indices_tuple, ShardedIndicesTuple):
        return
    if efficient:
        raise ValueError(
            f"{LOSS_WRAPPER}(efficient=True) needs the indices_tuple of pml_ice's "
            f"{MINER_WRAPPER}(miner, efficient=True): anchors numbered within the local "
            "batch, the other indices into the gathered batch in rank order. This one came "
            f"from elsewhere: PML's {MINER_WRAPPER} numbers the local batch first "
            "(efficient=True) or indexes the whole gathered batch (efficient=False), and a "
            "miner run on the local batch indexes only that. Wrap the miner in "
            f"pml_ice.utils.distributed.{MINER_WRAPPER}(miner, efficient=True)"
        )
    raise ValueError(
        f"{LOSS_WRAPPER}(efficient=False) computes the loss of the whole gathered batch and "
        f"needs tuples that index it, as {MINER_WRAPPER}(miner, efficient=False) returns "
        f"them, but these come from {MINER_WRAPPER}(efficient=True) (anchors numbered "
        "within the local batch); use efficient=True for both wrappers (ICELoss) or "
        "efficient=False for both"
    )


def check_no_ref_emb(ref_emb, ref_labels):
    if ref_emb is not None or ref_labels is not None:
        raise ValueError(f"{LOSS_WRAPPER}: CrossBatchMemory takes neither ref_emb nor ref_labels")


def check_miner_labels(labels, ref_emb, ref_labels):
    if labels is None:
        raise ValueError(f"{MINER_WRAPPER}: labels are required")
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError(f"{MINER_WRAPPER}: give ref_emb and ref_labels together")


class Shards:
    """The sizes of a tensor's shards on all processes (rank order, as
    ``agree_on_inputs`` returns them); ``offset`` is where this process's shard starts
    in their concatenation."""

    def __init__(self, sizes):
        self.sizes = sizes
        self.offset = sum(sizes[: dist.get_rank()])
        self.local_size = sizes[dist.get_rank()]

    def gather(self, local, with_grad=False):
        """All shards concatenated in rank order (padded to the largest for the
        collective). With ``with_grad`` the gradient of each part flows back to the
        process that made it (summed over processes, by all_gather's backward)."""
        largest = max(self.sizes)
        padded = torch.cat([local, local.new_zeros((largest - len(local), *local.shape[1:]))])
        if with_grad:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecated, still public
                parts = dist_autograd.all_gather(padded)
        else:
            parts = [torch.empty_like(padded) for _ in self.sizes]
            dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, self.sizes)])

    def local_tuples(self, indices_tuple):
        """The tuples (triplets, or both halves of pairs) whose anchor is in this
        process's shard, anchors renumbered from 0."""
        def local(anchors, *others):
            keep = (anchors >= self.offset) & (anchors < self.offset + self.local_size)
            return (anchors[keep] - self.offset, *(x[keep] for x in others))

        if len(indices_tuple) == 3:
            return local(*indices_tuple)
        a1, p, a2, n = indices_tuple
        return (*local(a1, p), *local(a2, n))


def sharded_reduction(reducer, losses, indices, graph_input):
    """ICEReweightReducer's loss over the union of all processes' pairs (see
    DistributedLossWrapper): the value ``L``, with the gradient of ``R * S_r / W``. The
    reducer gives each process's sums, with a weight shift common to all processes;
    they are all-reduced here. Every process takes part in the collectives, also one
    without a pair; ``graph_input`` keeps the zero loss of such a process in the
    autograd graph."""
    if torch.is_tensor(losses) and len(losses) > 0:
        anchors = indices[0]
    else:  # an empty slice of graph_input: zero sums that are part of the graph
        dtype = torch.promote_types(graph_input.dtype, torch.float32)
        losses = graph_input.reshape(-1)[:0].to(dtype)
        anchors = torch.zeros(0, dtype=torch.long, device=graph_input.device)
    total, count = reducer.reweighted_sums(losses, anchors, all_reduce_max)
    sums = torch.stack([total.detach(), count])
    dist.all_reduce(sums)
    if sums[1] == 0:
        return torch.sum(graph_input * 0)
    world_size = dist.get_world_size()
    share = world_size * total / sums[1]
    return share + (sums[0] / sums[1] - share).detach()


def all_reduce_max(tensor):
    """``tensor``, made the elementwise maximum over all processes (in place)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def without_self_pairs(indices_tuple, own_index):
    """Drops the positive pairs ``(a, own_index[a])`` of an anchor with itself."""
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        keep = p != own_index[a]
        return a[keep], p[keep], n[keep]
    a1, p, a2, n = indices_tuple
    keep = p != own_index[a1]
    return a1[keep], p[keep], a2, n


def is_sharded():
    return pml_distributed.is_distributed() and dist.get_world_size() > 1


def why_not_exactly_shardable(loss):
    """Why ``efficient=True`` cannot shard ``loss`` exactly (it needs the global
    normalisers of ICEReweightReducer), or None when it can."""
    inner = loss.loss if isinstance(loss, pml_losses.CrossBatchMemory) else loss
    if not isinstance(inner, ICELoss):
        return f"the loss is {type(inner).__name__}, not ICELoss"
    if inner.sub_loss_names() != ["loss"]:  # then PML wraps the reducer in MultipleReducers
        regularizer = type(inner.embedding_regularizer).__name__
        return f"it has an embedding regularizer ({regularizer})"
    if not isinstance(inner.reducer, ICEReweightReducer):
        return f"its reducer is {type(inner.reducer).__name__}, not ICEReweightReducer"
    return None


def check_exactly_shardable(loss):
    problem = why_not_exactly_shardable(loss)
    if problem is not None:
        raise ValueError(
            "DistributedLossWrapper(efficient=True) is exact only for ICELoss with "
            f"ICEReweightReducer and no embedding regularizer, but {problem}; use "
            "efficient=False (PML's gathering, exact for any loss)"
        )
