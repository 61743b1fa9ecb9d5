"""PML's DistributedLossWrapper and DistributedMinerWrapper, with an exact sharded
mode for ICE (``efficient=True``).

Notation: ``R`` processes, process ``r`` holds ``n_r`` samples, the global batch is
their concatenation in rank order (``N = sum n_r``), and ``L`` is the loss of one
process on the global batch.
"""

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import distributed as pml_distributed
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ..losses import ICELoss
from ..reducers import ICEReweightReducer


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
    processes, so they equal those of ``L`` on the global batch. Miners must come
    from :class:`DistributedMinerWrapper` with ``efficient=True`` (anchors local,
    other indices into the global batch); with ``ref_emb`` the reference set is the
    gathered ``ref_emb``. Batch sizes may differ between processes. Under
    CrossBatchMemory every process enqueues the whole gathered batch, so the bank is
    the same everywhere, and computes its own anchors against it; ``indices_tuple``
    and ``enqueue_mask`` are then not accepted.
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
        if not (self.efficient and is_sharded()):
            return super().forward(
                embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask
            )
        if isinstance(self.loss, pml_losses.CrossBatchMemory):
            return self.forward_sharded_memory(
                embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask
            )
        return self.forward_sharded(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def forward_sharded(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        check_batch(embeddings, labels, indices_tuple)
        labels = None if labels is None else c_f.to_device(labels, embeddings)
        shards = Shards(embeddings)
        if ref_emb is None:
            refs = shards.gather(embeddings, with_grad=True)
            ref_labels = None if labels is None else shards.gather(labels)
        else:
            c_f.check_shapes(ref_emb, ref_labels)
            ref_shards = Shards(ref_emb)
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
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("CrossBatchMemory is not compatible with ref_emb and ref_labels")
        if indices_tuple is not None or enqueue_mask is not None:
            raise ValueError(
                "DistributedLossWrapper(CrossBatchMemory, efficient=True) accepts neither "
                "indices_tuple nor enqueue_mask; use efficient=False for them"
            )
        check_batch(embeddings, labels, None)
        labels = c_f.to_device(labels, embeddings)
        shards = Shards(embeddings)
        all_emb, all_labels = shards.gather(embeddings.detach()), shards.gather(labels)
        if len(all_emb) > memory.memory_size:
            raise ValueError(
                f"DistributedLossWrapper: the gathered batch ({len(all_emb)}) is larger "
                f"than CrossBatchMemory's memory_size ({memory.memory_size})"
            )
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
    process. It returns the tuples whose anchor is local: anchors numbered within the
    local batch, the other indices pointing into the gathered batch. ``efficient=False``
    is PML's.
    """

    def forward(self, emb, labels, ref_emb=None, ref_labels=None):
        if not (self.efficient and is_sharded()):
            return super().forward(emb, labels, ref_emb, ref_labels)
        labels = c_f.to_device(labels, emb)
        shards = Shards(emb)
        all_emb, all_labels = shards.gather(emb.detach()), shards.gather(labels)
        if ref_emb is None:
            return shards.local_tuples(self.miner(all_emb, all_labels))
        ref_shards = Shards(ref_emb)
        all_ref_emb = ref_shards.gather(ref_emb.detach())
        all_ref_labels = ref_shards.gather(c_f.to_device(ref_labels, ref_emb))
        return shards.local_tuples(self.miner(all_emb, all_labels, all_ref_emb, all_ref_labels))


class Shards:
    """The sizes of a tensor's shards on all processes; ``offset`` is where this
    process's shard starts in their concatenation (rank order)."""

    def __init__(self, local):
        size = torch.tensor([len(local)], device=local.device)
        sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, size)
        self.sizes = [int(s) for s in sizes]
        self.offset = sum(self.sizes[: dist.get_rank()])
        self.local_size = len(local)

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
    DistributedLossWrapper): the value ``L``, with the gradient of ``R * S_r / W``.
    Every process takes part in the collectives, also one without a pair;
    ``graph_input`` keeps the zero loss of such a process in the autograd graph."""
    has_pairs = torch.is_tensor(losses) and len(losses) > 0
    anchors = indices[0] if has_pairs else None
    dtype = torch.promote_types(graph_input.dtype, torch.float32)
    largest = None
    if reducer.normalize == "batch":
        largest = (
            reducer.log_weights(losses).max()
            if has_pairs
            else torch.tensor(float("-inf"), dtype=dtype, device=graph_input.device)
        )
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    if has_pairs:
        total, count = reducer.reweighted_sums(losses, anchors, largest)
    else:
        total, count = torch.sum(graph_input * 0).to(dtype), graph_input.new_zeros((), dtype=dtype)
    sums = torch.stack([total.detach(), count])
    dist.all_reduce(sums)
    if sums[1] == 0:
        return torch.sum(graph_input * 0)
    world_size = dist.get_world_size()
    share = world_size * total / sums[1]
    return share + (sums[0] / sums[1] - share).detach()


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


def check_batch(embeddings, labels, indices_tuple):
    if not torch.is_tensor(embeddings) or embeddings.ndim != 2:
        raise ValueError(
            "DistributedLossWrapper: embeddings must be a 2-D tensor (batch_size, "
            f"embedding_size), got {type(embeddings).__name__} "
            f"{tuple(getattr(embeddings, 'shape', ()))}"
        )
    if labels is None and indices_tuple is None:
        raise ValueError("DistributedLossWrapper: labels and indices_tuple cannot both be None")
    c_f.check_shapes(embeddings, labels)


def why_not_exactly_shardable(loss):
    """Why ``efficient=True`` cannot shard ``loss`` exactly (it needs the global
    normalisers of ICEReweightReducer), or None when it can."""
    inner = loss.loss if isinstance(loss, pml_losses.CrossBatchMemory) else loss
    if not isinstance(inner, ICELoss):
        return f"the loss is {type(inner).__name__}, not ICELoss"
    if not isinstance(inner.reducer, ICEReweightReducer):
        return f"its reducer is {type(inner.reducer).__name__}, not ICEReweightReducer"
    if inner.sub_loss_names() != ["loss"]:
        return "it has an embedding regularizer"
    return None


def check_exactly_shardable(loss):
    problem = why_not_exactly_shardable(loss)
    if problem is not None:
        raise ValueError(
            "DistributedLossWrapper(efficient=True) is exact only for ICELoss with "
            f"ICEReweightReducer and no embedding regularizer, but {problem}; use "
            "efficient=False (PML's gathering, exact for any loss)"
        )
