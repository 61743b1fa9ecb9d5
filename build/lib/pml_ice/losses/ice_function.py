"""The ICE per-pair losses as one autograd function, computed in chunks of anchors.

For anchor ``i`` with logits ``Z_i.`` the forward pass needs only the log-sum-exp of
``Z`` over the anchor's negatives and the logits of its positives:

    l_ij = softplus(LSE_i - Z_ij)

With ``g_ij`` the incoming gradient of ``l_ij`` and ``q_ij = 1 - p_ij = sigmoid(LSE_i - Z_ij)``:

    dZ_ij = -g_ij q_ij                                       (positives)
    dZ_ik = c_i exp(Z_ik - LSE_i),  c_i = sum_j g_ij q_ij    (negatives)

The exponentials ``exp(Z - max_i Z)`` are either kept from the forward pass
(``save_exp``), and backward is two matrix products with them, or recomputed chunk by
chunk (one extra product, one sub and one exp), so that no (anchors x references)
matrix is held whole.
"""

import math
from dataclasses import dataclass

import torch

# Anchor x reference logits held whole (the dense path, exponentials kept for backward)
# up to this many, and logits per chunk on the chunked path. A GPU has room for larger
# buffers than a CPU's RAM, and its products need them: measured with benchmarks/speed.py
# on an H200 at D = 512, batch 16384 was 1.91x the floor when chunked (2**26 dense
# limit, 2**25-logit chunks); on 2 CPU cores, 128-row chunks at batch 8192 cost 2.7x the
# floor and 1024-row chunks 1.3x.
DENSE_LOGITS_LIMIT = {"cpu": 2**26, "accelerator": 2**28}
CHUNK_LOGITS = {"cpu": 2**24, "accelerator": 2**27}
# Symmetric tiles (two matrix products instead of four, more elementwise passes) for
# labels within the batch on the chunked path. On 2 CPU cores they were slower than row
# chunks (batch 16384, D = 128: 11.8 s against 7.7 s), so a CPU keeps the row chunks.
SYMMETRIC_TILES = {"cpu": False, "accelerator": True}


@dataclass(frozen=True)
class ComputationPlan:
    """How ICE computes its logits: whole (``memory_efficient=False``, memory
    ``anchors x references``) or, recomputed in backward, in chunks of ``chunk_rows``
    anchors or, with ``symmetric_tiles`` and labels within the batch, in
    ``tile_rows`` x ``tile_rows`` tiles."""

    memory_efficient: bool
    chunk_rows: int
    symmetric_tiles: bool
    tile_rows: int


def plan_computation(num_anchors, num_refs, device, memory_efficient=None, chunk_size=None):
    """The one place that chooses ICE's path and chunk size (``ICELoss`` and
    ``benchmarks/speed.py`` both ask it). ``memory_efficient=None`` chunks above the
    device's ``DENSE_LOGITS_LIMIT``; ``chunk_size`` overrides the rows per chunk and
    per tile side."""
    kind = "cpu" if torch.device(device).type == "cpu" else "accelerator"
    if memory_efficient is None:
        memory_efficient = num_anchors * num_refs > DENSE_LOGITS_LIMIT[kind]
    chunk_rows = chunk_size or max(1, CHUNK_LOGITS[kind] // max(num_refs, 1))
    tile_rows = chunk_size or math.isqrt(CHUNK_LOGITS[kind])
    return ComputationPlan(memory_efficient, chunk_rows, SYMMETRIC_TILES[kind], tile_rows)


def sparse_positives_pay_off(device):
    """Whether backward should put the positives into a sparse matrix (a CPU) rather
    than into the dense gradient of the logits (a GPU); see ``add_grads_from_exp``."""
    return device.type == "cpu"


def accumulation_dtype(dtype):
    """Logits, log-sum-exp and the gradient of the logits are at least float32."""
    return torch.promote_types(dtype, torch.float32)


def add_matmul(out, a, b, alpha):
    """``out += alpha * a @ b`` with the product in ``b``'s dtype (tensor cores for
    half inputs) and the sum in ``out``'s dtype."""
    a = a.to(b.dtype)
    if out.dtype == b.dtype:
        return out.addmm_(a, b, alpha=alpha)
    return out.add_(torch.mm(a, b), alpha=alpha)


class LogitsKernel:
    """How a chunk of logits and the gradients through it are computed."""

    def add_grads_from_exp(
        self, queries, refs, exp_logits, exp_factor, positives, pos_grad, grad_queries, grad_refs
    ):
        """Add the gradients for ``dZ = exp_factor * exp_logits`` on negatives and
        ``-pos_grad`` on the positive pairs ``positives = (rows, cols)``.
        ``grad_refs`` is None when the references need no gradient (a memory bank)."""
        grad_logits = exp_logits * exp_factor[:, None]
        # pairs are unique, so a gather-subtract-scatter suffices (an accumulating
        # index_put sorts its indices: 0.5 ms of host time per step on an H200)
        grad_logits[positives] -= pos_grad
        self.add_grads(queries, refs, grad_logits, grad_queries, grad_refs)


class InnerProductLogits(LogitsKernel):
    """``Z = coef * q @ r.T`` for embeddings that are already normalised (or not meant to be)."""

    def __init__(self, coef):
        self.coef = coef

    def logits(self, queries, refs, out):
        if queries.dtype == out.dtype:
            return torch.mm(queries * self.coef, refs.T, out=out)
        return out.copy_(torch.mm(queries, refs.T)).mul_(self.coef)

    def add_grads(self, queries, refs, grad_logits, grad_queries, grad_refs):
        """Add the gradients of ``sum(grad_logits * Z)`` to ``grad_queries`` and ``grad_refs``.
        When the references are the queries (``Z = c Q Q^T``, one gradient buffer),
        ``dQ = c (G + G^T) Q``: one product instead of two."""
        if refs is queries and grad_refs is grad_queries:
            add_matmul(grad_queries, grad_logits + grad_logits.T, queries, self.coef)
            return
        add_matmul(grad_queries, grad_logits, refs, self.coef)
        if grad_refs is not None:
            add_matmul(grad_refs, grad_logits.T, queries, self.coef)

    def add_grads_from_exp(
        self, queries, refs, exp_logits, exp_factor, positives, pos_grad, grad_queries, grad_refs
    ):
        """On a CPU the row factor moves onto the embeddings and the positives form a
        sparse matrix, so no elementwise pass over ``exp_logits`` is needed: two products.
        On a GPU that pass is cheap and the sparse matrix's coalescing is not (0.6 ms of
        host time per step at batch 1024 on an H200), so the generic form is used."""
        if not sparse_positives_pay_off(exp_logits.device):
            return super().add_grads_from_exp(
                queries, refs, exp_logits, exp_factor, positives, pos_grad, grad_queries, grad_refs
            )
        acc_dtype = exp_logits.dtype
        queries, refs = queries.to(acc_dtype), refs.to(acc_dtype)
        pos_matrix = torch.sparse_coo_tensor(
            torch.stack(positives),
            -pos_grad,
            exp_logits.shape,
            is_coalesced=True,
            check_invariants=False,
        )
        grad_queries.add_(
            torch.mm(exp_logits, refs).mul_(exp_factor[:, None])
            + torch.sparse.mm(pos_matrix, refs),
            alpha=self.coef,
        )
        if grad_refs is None:
            return
        grad_refs.add_(
            torch.mm(exp_logits.T, queries * exp_factor[:, None])
            + torch.sparse.mm(pos_matrix.t(), queries),
            alpha=self.coef,
        )


class DistanceLogits(LogitsKernel):
    """``Z = coef * distance(q, r)`` for any PML distance, evaluated in at least
    float32 (``torch.cdist`` has no bfloat16 kernel); its backward goes through autograd."""

    def __init__(self, distance, coef):
        self.distance = distance
        self.coef = coef

    def logits(self, queries, refs, out):
        with torch.no_grad():
            mat = self.distance(queries.to(out.dtype), refs.to(out.dtype))
            return out.copy_(mat).mul_(self.coef)

    def add_grads(self, queries, refs, grad_logits, grad_queries, grad_refs):
        queries = queries.detach().to(grad_logits.dtype).requires_grad_(True)
        refs = refs.detach().to(grad_logits.dtype).requires_grad_(grad_refs is not None)
        inputs = (queries, refs) if grad_refs is not None else (queries,)
        with torch.enable_grad():
            mat = self.distance(queries, refs)
            grads = torch.autograd.grad(mat, inputs, grad_logits * self.coef)
        grad_queries.add_(grads[0])
        if grad_refs is not None:
            grad_refs.add_(grads[1])


def chunk_ranges(num_rows, chunk_rows):
    """``(start, end)`` of each chunk of anchor rows."""
    return [(start, min(start + chunk_rows, num_rows)) for start in range(0, num_rows, chunk_rows)]


class ChunkedPairs:
    """Flat (row-major) positions of a pair list inside a chunk of anchor rows."""

    def __init__(self, pair_list, num_refs):
        self.anchors, self.refs = pair_list.anchors, pair_list.refs
        self.row_ptr = pair_list.row_ptr.tolist()
        self.num_refs = num_refs

    def span(self, start, end):
        return self.row_ptr[start], self.row_ptr[end]

    def flat_positions(self, start, end):
        lo, hi = self.span(start, end)
        return (self.anchors[lo:hi] - start) * self.num_refs + self.refs[lo:hi]


def restrict_to_negatives(logits, masked, masked_are_negatives, start, end):
    """Set every logit of the chunk that is not a negative to -inf, in place."""
    positions = masked.flat_positions(start, end)
    if masked_are_negatives:
        negative_logits = logits.take(positions)
        logits.fill_(float("-inf"))
        logits.put_(positions, negative_logits)
    else:
        logits.view(-1).index_fill_(0, positions, float("-inf"))
    return logits


class ICEPairLosses(torch.autograd.Function):
    """Per-pair ICE losses ``softplus(LSE_i - Z_ij)`` for the positive pairs of ``pairs``.

    Every anchor row of ``queries`` must have at least one negative.
    """

    @staticmethod
    def forward(ctx, queries, refs, kernel, pairs, chunk_rows, save_exp):
        with torch.autocast(queries.device.type, enabled=False):
            return ICEPairLosses.run_forward(
                ctx, queries, refs, kernel, pairs, chunk_rows, save_exp
            )

    @staticmethod
    def backward(ctx, grad_losses):
        with torch.autocast(grad_losses.device.type, enabled=False):
            return ICEPairLosses.run_backward(ctx, grad_losses)

    @staticmethod
    def run_forward(ctx, queries, refs, kernel, pairs, chunk_rows, save_exp):
        """Dtypes are explicit here: autocast is off."""
        acc_dtype = accumulation_dtype(queries.dtype)
        num_rows, num_refs = len(queries), len(refs)
        positives = ChunkedPairs(pairs.positives, num_refs)
        masked = ChunkedPairs(pairs.masked, num_refs)
        pos_logits = queries.new_empty(len(positives.anchors), dtype=acc_dtype)
        row_max = queries.new_empty(num_rows, dtype=acc_dtype)
        row_sum = queries.new_empty(num_rows, dtype=acc_dtype)
        buffer = queries.new_empty(
            num_rows if save_exp else min(chunk_rows, num_rows), num_refs, dtype=acc_dtype
        )
        for start, end in chunk_ranges(num_rows, chunk_rows):
            out = buffer[start:end] if save_exp else buffer[: end - start]
            logits = kernel.logits(queries[start:end], refs, out)
            p0, p1 = positives.span(start, end)
            pos_logits[p0:p1] = logits.take(positives.flat_positions(start, end))
            restrict_to_negatives(logits, masked, pairs.masked_are_negatives, start, end)
            chunk_max = torch.amax(logits, dim=1)
            row_max[start:end] = chunk_max
            torch.sum(logits.sub_(chunk_max[:, None]).exp_(), dim=1, out=row_sum[start:end])
        lse = row_max + torch.log(row_sum)
        margin = lse[positives.anchors] - pos_logits
        ctx.kernel, ctx.chunk_rows, ctx.refs_are_queries = kernel, chunk_rows, refs is queries
        ctx.positives, ctx.masked = positives, masked
        ctx.masked_are_negatives = pairs.masked_are_negatives
        ctx.save_for_backward(
            queries, refs, lse, row_sum, torch.sigmoid(margin), buffer if save_exp else None
        )
        return torch.logaddexp(margin, torch.zeros_like(margin))

    @staticmethod
    def run_backward(ctx, grad_losses):
        queries, refs, lse, row_sum, one_minus_p, saved_exp = ctx.saved_tensors
        positives = ctx.positives
        pos_grad = grad_losses.to(lse.dtype) * one_minus_p
        neg_coef = torch.zeros_like(lse).index_add_(0, positives.anchors, pos_grad)
        grad_queries = torch.zeros(queries.shape, dtype=lse.dtype, device=queries.device)
        if ctx.refs_are_queries:  # one tensor, one gradient buffer for both roles
            refs, grad_refs = queries, grad_queries
        elif ctx.needs_input_grad[1]:
            grad_refs = torch.zeros(refs.shape, dtype=lse.dtype, device=refs.device)
        else:
            grad_refs = None
        if saved_exp is None:
            ICEPairLosses.add_recomputed_grads(
                ctx, queries, refs, lse, neg_coef, pos_grad, grad_queries, grad_refs
            )
        else:
            ctx.kernel.add_grads_from_exp(
                queries,
                refs,
                saved_exp,
                neg_coef / row_sum,
                (positives.anchors, positives.refs),
                pos_grad,
                grad_queries,
                grad_refs,
            )
        return (
            grad_queries.to(queries.dtype),
            None if grad_refs is None or ctx.refs_are_queries else grad_refs.to(refs.dtype),
            None,
            None,
            None,
            None,
        )

    @staticmethod
    def add_recomputed_grads(
        ctx, queries, refs, lse, neg_coef, pos_grad, grad_queries, grad_refs
    ):
        """Chunk by chunk: recompute the logits, then
        ``c_i exp(Z - LSE_i) = sign(c_i) exp(Z - (LSE_i - log|c_i|))`` (one sub, one exp;
        the sign pass only when some ``c_i`` is negative, decided once, not per chunk)."""
        positives, masked = ctx.positives, ctx.masked
        num_rows, num_refs = len(queries), len(refs)
        shift = lse - torch.log(neg_coef.abs())
        row_sign = torch.sign(neg_coef)[:, None] if bool((neg_coef < 0).any()) else None
        buffer = lse.new_empty(min(ctx.chunk_rows, num_rows), num_refs)
        for start, end in chunk_ranges(num_rows, ctx.chunk_rows):
            grad_logits = ctx.kernel.logits(queries[start:end], refs, buffer[: end - start])
            restrict_to_negatives(grad_logits, masked, ctx.masked_are_negatives, start, end)
            grad_logits.sub_(shift[start:end, None]).exp_()
            if row_sign is not None:
                grad_logits.mul_(row_sign[start:end])
            p0, p1 = positives.span(start, end)
            flat = positives.flat_positions(start, end)
            grad_logits.put_(flat, grad_logits.take(flat) - pos_grad[p0:p1])
            ctx.kernel.add_grads(
                queries[start:end], refs, grad_logits, grad_queries[start:end], grad_refs
            )
