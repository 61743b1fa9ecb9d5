"""The ICE per-pair losses as one autograd function, computed in chunks of anchors.

For anchor ``i`` with logits ``Z_i.`` the forward pass needs only the log-sum-exp of
``Z`` over the anchor's negatives and the logits of its positives:

    l_ij = softplus(LSE_i - Z_ij)

With ``g_ij`` the incoming gradient of ``l_ij`` and ``q_ij = 1 - p_ij = sigmoid(LSE_i - Z_ij)``:

    dZ_ij = -g_ij q_ij                                 (positives)
    dZ_ik = (sum_j g_ij q_ij) * exp(Z_ik - LSE_i)      (negatives)

so the backward pass of a chunk is ``exp(Z - m) * row factor`` times the embeddings: a
matrix product. ``exp(Z - m)`` is either kept from the forward pass (``save_exp``) or
recomputed chunk by chunk, so that no (anchors x references) matrix is held whole.
"""

import torch


def default_chunk_rows(num_refs, device):
    """Rows per chunk: about 2**20 logits on a CPU (cache sized), 2**25 on a GPU."""
    target = 2**20 if device.type == "cpu" else 2**25
    return max(1, target // max(num_refs, 1))


def accumulation_dtype(dtype):
    """The log-sum-exp runs in at least float32."""
    return torch.promote_types(dtype, torch.float32)


def matmul(a, b, out_dtype):
    """``a @ b`` in ``b``'s dtype (tensor cores for half inputs), returned in ``out_dtype``."""
    return torch.mm(a.to(b.dtype), b).to(out_dtype)


class InnerProductLogits:
    """``Z = coef * q @ r.T`` for embeddings that are already normalised (or not meant to be)."""

    def __init__(self, coef):
        self.coef = coef

    def logits(self, queries, refs, out):
        if queries.dtype == out.dtype:
            return torch.mm(queries * self.coef, refs.T, out=out)
        return out.copy_(torch.mm(queries, refs.T)).mul_(self.coef)

    def chunk_grads(self, queries, refs, neg_weights, row_factor, pos_rows, pos_cols, pos_grad):
        """Gradients of ``sum(dZ * Z)`` where ``dZ = row_factor * neg_weights`` on
        negatives and ``-pos_grad`` at ``(pos_rows, pos_cols)``."""
        acc_dtype = row_factor.dtype
        grad_queries = matmul(neg_weights, refs, acc_dtype).mul_(row_factor[:, None])
        grad_queries.index_add_(
            0, pos_rows, refs[pos_cols].to(acc_dtype) * -pos_grad[:, None]
        )
        scaled_queries = queries.to(acc_dtype) * row_factor[:, None]
        grad_refs = matmul(neg_weights.T, scaled_queries.to(refs.dtype), acc_dtype)
        grad_refs.index_add_(
            0, pos_cols, queries[pos_rows].to(acc_dtype) * -pos_grad[:, None]
        )
        return grad_queries.mul_(self.coef), grad_refs.mul_(self.coef)


class DistanceLogits:
    """``Z = coef * distance(q, r)`` for any PML distance; its backward goes through autograd."""

    def __init__(self, distance, coef):
        self.distance = distance
        self.coef = coef

    def logits(self, queries, refs, out):
        with torch.no_grad():
            return out.copy_(self.distance(queries, refs)).mul_(self.coef)

    def chunk_grads(self, queries, refs, neg_weights, row_factor, pos_rows, pos_cols, pos_grad):
        grad_logits = neg_weights * row_factor[:, None]
        grad_logits.index_put_((pos_rows, pos_cols), -pos_grad, accumulate=True)
        queries = queries.detach().requires_grad_(True)
        refs = refs.detach().requires_grad_(True)
        with torch.enable_grad():
            mat = self.distance(queries, refs)
            grad_queries, grad_refs = torch.autograd.grad(
                mat, (queries, refs), (grad_logits * self.coef).to(mat.dtype)
            )
        return grad_queries, grad_refs


def chunk_bounds(num_rows, chunk_rows):
    return [(i, min(i + chunk_rows, num_rows)) for i in range(0, num_rows, chunk_rows)]


def logits_buffer(queries, refs, rows):
    return queries.new_empty(rows, len(refs), dtype=accumulation_dtype(queries.dtype))


class MaskedLogits:
    """Sets every logit of a chunk that is not a negative to -inf, in place."""

    def __init__(self, pairs):
        self.masked = pairs.masked
        self.masked_are_negatives = pairs.masked_are_negatives
        self.row_ptr = self.masked.row_ptr.tolist()

    def restrict_to_negatives(self, logits, start, end):
        m0, m1 = self.row_ptr[start], self.row_ptr[end]
        rows = self.masked.anchors[m0:m1] - start
        cols = self.masked.refs[m0:m1]
        if self.masked_are_negatives:
            negative_logits = logits[rows, cols]
            logits.fill_(float("-inf"))
            logits[rows, cols] = negative_logits
        else:
            logits[rows, cols] = float("-inf")


class ICEPairLosses(torch.autograd.Function):
    """Per-pair ICE losses ``softplus(LSE_i - Z_ij)`` for the positive pairs of ``pairs``.

    Every anchor row of ``queries`` must have at least one negative.
    """

    @staticmethod
    def forward(ctx, queries, refs, kernel, pairs, chunk_rows, save_exp):
        acc_dtype = accumulation_dtype(queries.dtype)
        num_rows = len(queries)
        chunks = chunk_bounds(num_rows, chunk_rows)
        positives = pairs.positives
        pos_ptr = positives.row_ptr.tolist()
        pos_logits = queries.new_empty(len(positives.anchors), dtype=acc_dtype)
        row_max = queries.new_empty(num_rows, dtype=acc_dtype)
        row_sum = queries.new_empty(num_rows, dtype=acc_dtype)
        buffer = logits_buffer(queries, refs, num_rows if save_exp else chunk_rows)
        masked_logits = MaskedLogits(pairs)
        for start, end in chunks:
            out = buffer[start:end] if save_exp else buffer[: end - start]
            logits = kernel.logits(queries[start:end], refs, out)
            p0, p1 = pos_ptr[start], pos_ptr[end]
            pos_logits[p0:p1] = logits[
                positives.anchors[p0:p1] - start, positives.refs[p0:p1]
            ]
            masked_logits.restrict_to_negatives(logits, start, end)
            chunk_max = torch.amax(logits, dim=1)
            neg_weights = logits.sub_(chunk_max[:, None]).exp_()
            row_max[start:end] = chunk_max
            torch.sum(neg_weights, dim=1, out=row_sum[start:end])
        lse = row_max + torch.log(row_sum)
        margin = lse[positives.anchors] - pos_logits
        losses = torch.logaddexp(margin, torch.zeros_like(margin))
        ctx.kernel, ctx.pairs, ctx.chunk_rows = kernel, pairs, chunk_rows
        ctx.save_for_backward(
            queries,
            refs,
            row_max,
            row_sum,
            torch.sigmoid(margin),
            buffer if save_exp else None,
        )
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        queries, refs, row_max, row_sum, one_minus_p, saved_exp = ctx.saved_tensors
        kernel, positives = ctx.kernel, ctx.pairs.positives
        pos_grad = grad_losses.to(row_sum.dtype) * one_minus_p
        row_factor = torch.zeros_like(row_sum).index_add_(0, positives.anchors, pos_grad)
        row_factor.div_(row_sum)
        grad_queries = torch.empty_like(queries)
        grad_refs = torch.zeros(refs.shape, dtype=row_sum.dtype, device=refs.device)
        if saved_exp is None:
            chunks = chunk_bounds(len(queries), ctx.chunk_rows)
            buffer = logits_buffer(queries, refs, ctx.chunk_rows)
            masked_logits = MaskedLogits(ctx.pairs)
        else:
            chunks = [(0, len(queries))]
        pos_ptr = positives.row_ptr.tolist()
        for start, end in chunks:
            if saved_exp is None:
                logits = kernel.logits(queries[start:end], refs, buffer[: end - start])
                masked_logits.restrict_to_negatives(logits, start, end)
                neg_weights = logits.sub_(row_max[start:end, None]).exp_()
            else:
                neg_weights = saved_exp
            p0, p1 = pos_ptr[start], pos_ptr[end]
            chunk_grad_queries, chunk_grad_refs = kernel.chunk_grads(
                queries[start:end],
                refs,
                neg_weights,
                row_factor[start:end],
                positives.anchors[p0:p1] - start,
                positives.refs[p0:p1],
                pos_grad[p0:p1],
            )
            grad_queries[start:end] = chunk_grad_queries
            grad_refs += chunk_grad_refs
        return grad_queries, grad_refs.to(refs.dtype), None, None, None, None
