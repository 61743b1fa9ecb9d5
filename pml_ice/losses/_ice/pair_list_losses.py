"""ICE's per-pair losses from sorted pair lists (a miner's, or labels' when the logits
are recomputed), as one autograd function computed in chunks of anchor rows: the
``pair_lists_whole`` and ``pair_lists_in_chunks`` paths. Its backward also serves the
``label_mask`` path.

For anchor ``i`` with logits ``Z_i.`` the forward pass needs only the log-sum-exp of
``Z`` over the anchor's negatives and the logits of its positives:

    l_ij = softplus(LSE_i - Z_ij)

With ``g_ij`` the incoming gradient of ``l_ij`` and ``q_ij = 1 - p_ij = sigmoid(LSE_i - Z_ij)``:

    dZ_ij = -g_ij q_ij                                       (positives)
    dZ_ik = c_i exp(Z_ik - LSE_i),  c_i = sum_j g_ij q_ij    (negatives)

The exponentials ``exp(Z - max_i Z)`` are either kept from the forward pass
(``save_exp``), and backward is two matrix products with them, or recomputed chunk by
chunk (one extra product, one sub and one exp), so that no (anchors x references)
matrix is held whole. Under ``create_graph=True`` backward builds a differentiable
graph of the gradient instead (``twice_differentiable``).
"""

from functools import partial

import torch

from .logits import accumulation_dtype
from .pair_terms import pair_terms, save_pair_terms
from .plan import chunk_ranges
from .twice_differentiable import dense_mask, graph_of_gradient


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


class ChunkedICEPairs:
    """ICEPairs of ``num_rows`` anchors and ``num_refs`` references as ICEPairLosses
    reads them, chunk by chunk; ``negative_mask()`` is the dense mask of negatives
    for a backward under ``create_graph``."""

    def __init__(self, pairs, num_rows, num_refs):
        self.positives = ChunkedPairs(pairs.positives, num_refs)
        self.masked = ChunkedPairs(pairs.masked, num_refs)
        self.masked_are_negatives = pairs.masked_are_negatives
        self.negative_mask = partial(
            dense_mask, pairs.masked, num_rows, num_refs, pairs.masked_are_negatives
        )


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
    """Per-pair ICE losses ``softplus(LSE_i - Z_ij)`` for the positive pairs of ``pairs``
    (a ChunkedICEPairs), and what backward needs: the exponentials (empty unless
    ``save_exp``), ``LSE``, the row sums and ``1 - p``.

    Every anchor row of ``queries`` must have at least one negative. Forward and
    setup_context are separate, so torch.func transforms (``torch.func.grad``) apply.
    """

    @staticmethod
    def forward(queries, refs, kernel, pairs, chunk_rows, save_exp):
        with torch.autocast(queries.device.type, enabled=False):
            return ICEPairLosses.run_forward(queries, refs, kernel, pairs, chunk_rows, save_exp)

    @staticmethod
    def setup_context(ctx, inputs, output):
        queries, refs, kernel, pairs, chunk_rows, save_exp = inputs
        ctx.kernel, ctx.pairs, ctx.chunk_rows, ctx.exp_saved = kernel, pairs, chunk_rows, save_exp
        ctx.refs_are_queries = refs is queries
        save_pair_terms(ctx, (queries, refs), output)

    @staticmethod
    def backward(ctx, grad_losses, *_):
        with torch.autocast(grad_losses.device.type, enabled=False):
            return ICEPairLosses.run_backward(ctx, grad_losses)

    @staticmethod
    def run_forward(queries, refs, kernel, pairs, chunk_rows, save_exp):
        """Dtypes are explicit here: autocast is off."""
        acc_dtype = accumulation_dtype(queries.dtype)
        num_rows, num_refs = len(queries), len(refs)
        positives, masked = pairs.positives, pairs.masked
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
        saved_exp = buffer if save_exp else buffer.new_empty(0)
        return pair_terms(positives.anchors, pos_logits, row_max, row_sum, saved_exp)

    @staticmethod
    def run_backward(ctx, grad_losses):
        queries, refs, saved_exp, lse, row_sum, one_minus_p = ctx.saved_tensors
        positives = ctx.pairs.positives
        if ctx.refs_are_queries:
            refs = queries
        if torch.is_grad_enabled():  # create_graph: a gradient that is itself differentiable
            grads = graph_of_gradient(
                ctx.kernel, queries, refs, ctx.pairs.negative_mask(),
                (positives.anchors, positives.refs), grad_losses, ctx.needs_input_grad[1],
            )
            return grads + (None,) * 4
        pos_grad = grad_losses.to(lse.dtype) * one_minus_p
        neg_coef = torch.zeros_like(lse).index_add_(0, positives.anchors, pos_grad)
        grad_queries = torch.zeros(queries.shape, dtype=lse.dtype, device=queries.device)
        if ctx.refs_are_queries:  # one tensor, one gradient buffer for both roles
            grad_refs = grad_queries
        elif ctx.needs_input_grad[1]:
            grad_refs = torch.zeros(refs.shape, dtype=lse.dtype, device=refs.device)
        else:
            grad_refs = None
        if not ctx.exp_saved:
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
        positives, masked = ctx.pairs.positives, ctx.pairs.masked
        num_rows, num_refs = len(queries), len(refs)
        shift = lse - torch.log(neg_coef.abs())
        row_sign = torch.sign(neg_coef)[:, None] if bool((neg_coef < 0).any()) else None
        buffer = lse.new_empty(min(ctx.chunk_rows, num_rows), num_refs)
        for start, end in chunk_ranges(num_rows, ctx.chunk_rows):
            grad_logits = ctx.kernel.logits(queries[start:end], refs, buffer[: end - start])
            restrict_to_negatives(grad_logits, masked, ctx.pairs.masked_are_negatives, start, end)
            grad_logits.sub_(shift[start:end, None]).exp_()
            if row_sign is not None:
                grad_logits.mul_(row_sign[start:end])
            p0, p1 = positives.span(start, end)
            flat = positives.flat_positions(start, end)
            grad_logits.put_(flat, grad_logits.take(flat) - pos_grad[p0:p1])
            ctx.kernel.add_grads(
                queries[start:end], refs, grad_logits, grad_queries[start:end], grad_refs
            )
