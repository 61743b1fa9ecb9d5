"""ICE's per-pair losses in square tiles when the references are the batch itself (the
``symmetric_tiles`` path).

With labels, the batch as its own reference set and inner-product logits, ``Z = c Q Q^T``
is symmetric and so is the mask of negatives. Each tile ``(I, J)`` with ``I <= J`` is
computed once and serves the rows of ``I`` (along its rows) and of ``J`` (along its
columns):

- forward: a running log-sum-exp over the negatives of every row, updated from both
  sides of each tile (half of one matrix product in all);
- backward: with ``E_ij = c_i exp(Z_ij - LSE_i)`` on negatives, the tile's gradient is
  ``H = E_IJ + E_JI^T``, and ``dQ_I += c H Q_J``, ``dQ_J += c H^T Q_I`` (one recomputed
  tile and two products per tile pair: one and a half matrix products).

Two matrix products in all, against three for the similarity product and its backward
alone, with memory linear in the batch (one tile at a time). Positive pairs need no
tile: their logits and gradients are row-wise dot products and scatters.
"""

import torch

from .logits import accumulation_dtype, add_matmul
from .pair_terms import pair_terms, save_pair_terms
from .plan import chunk_ranges
from .twice_differentiable import graph_of_gradient


def tile_pairs(num_rows, side):
    """``((i0, i1), (j0, j1))`` for every tile on or above the diagonal."""
    ranges = chunk_ranges(num_rows, side)
    return [(rows, cols) for k, rows in enumerate(ranges) for cols in ranges[k:]]


def negative_logits(queries, labels, kernel, rows, cols, acc_dtype):
    """``Z`` of a tile with every non-negative (same label, the diagonal included) at -inf."""
    (i0, i1), (j0, j1) = rows, cols
    logits = kernel.logits(
        queries[i0:i1], queries[j0:j1], queries.new_empty(i1 - i0, j1 - j0, dtype=acc_dtype)
    )
    return logits.masked_fill_(labels[i0:i1, None] == labels[None, j0:j1], float("-inf"))


def update_lse(running_max, total, start, end, logits, dim):
    """Fold a tile's logits along ``dim`` into the running ``max + log(total)`` of rows
    ``start:end``; a row that has met no negative yet keeps ``max = -inf, total = 0``."""
    new_max = torch.maximum(running_max[start:end], torch.amax(logits, dim=dim))
    finite_max = new_max.nan_to_num(neginf=0.0)
    broadcast = finite_max[:, None] if dim == 1 else finite_max[None, :]
    total[start:end] = total[start:end] * torch.exp(running_max[start:end] - finite_max) + torch.sum(
        torch.exp(logits - broadcast), dim=dim
    )
    running_max[start:end] = new_max


class ICESymmetricTiles(torch.autograd.Function):
    """``softplus(LSE_i - Z_ij)`` for ``positives = (anchors, refs)`` of the batch against
    itself, ``LSE_i`` over the references with another label. ``kernel`` is an
    ``InnerProductLogits``."""

    @staticmethod
    def forward(queries, kernel, labels, positives, side):
        with torch.autocast(queries.device.type, enabled=False):
            acc_dtype = accumulation_dtype(queries.dtype)
            num_rows = len(queries)
            running_max = queries.new_full((num_rows,), float("-inf"), dtype=acc_dtype)
            total = queries.new_zeros(num_rows, dtype=acc_dtype)
            for rows, cols in tile_pairs(num_rows, side):
                logits = negative_logits(queries, labels, kernel, rows, cols, acc_dtype)
                update_lse(running_max, total, *rows, logits, dim=1)
                if rows != cols:
                    update_lse(running_max, total, *cols, logits, dim=0)
            anchors, refs = positives
            pair_queries = queries.to(acc_dtype)
            pos_logits = kernel.coef * torch.sum(pair_queries[anchors] * pair_queries[refs], dim=1)
            return pair_terms(anchors, pos_logits, running_max, total)

    @staticmethod
    def setup_context(ctx, inputs, output):
        queries, kernel, labels, (anchors, refs), side = inputs
        ctx.kernel, ctx.side = kernel, side
        save_pair_terms(ctx, (queries, labels, anchors, refs), output)

    @staticmethod
    def backward(ctx, grad_losses, *_):
        with torch.autocast(grad_losses.device.type, enabled=False):
            queries, labels, anchors, refs, lse, _, one_minus_p = ctx.saved_tensors
            kernel, acc_dtype = ctx.kernel, lse.dtype
            if torch.is_grad_enabled():  # create_graph: a differentiable gradient
                negative = labels[:, None] != labels[None, :]
                grad = graph_of_gradient(
                    kernel, queries, queries, negative, (anchors, refs), grad_losses, False
                )[0]
                return grad, None, None, None, None
            pos_grad = grad_losses.to(acc_dtype) * one_minus_p
            neg_coef = torch.zeros_like(lse).index_add_(0, anchors, pos_grad)
            # c_i exp(Z - LSE_i) = sign(c_i) exp(Z - (LSE_i - log|c_i|)); rows with c_i = 0
            # (no loss term, or no negative at all) contribute nothing
            exp_shift = torch.where(neg_coef == 0, float("inf"), lse - torch.log(neg_coef.abs()))
            sign = torch.sign(neg_coef) if bool((neg_coef < 0).any()) else None
            grad = torch.zeros(queries.shape, dtype=acc_dtype, device=queries.device)
            for rows, cols in tile_pairs(len(queries), ctx.side):
                (i0, i1), (j0, j1) = rows, cols
                logits = negative_logits(queries, labels, kernel, rows, cols, acc_dtype)
                tile_grad = tile_gradient(logits, exp_shift, sign, rows, cols)
                add_matmul(grad[i0:i1], tile_grad, queries[j0:j1], kernel.coef)
                if rows != cols:
                    add_matmul(grad[j0:j1], tile_grad.T, queries[i0:i1], kernel.coef)
            pair_queries = queries.to(acc_dtype)
            pair_grad = -kernel.coef * pos_grad[:, None]
            grad.index_add_(0, anchors, pair_queries[refs] * pair_grad)
            grad.index_add_(0, refs, pair_queries[anchors] * pair_grad)
            return grad.to(queries.dtype), None, None, None, None


def tile_gradient(logits, exp_shift, sign, rows, cols):
    """``H = E_IJ + E_JI^T`` of a tile (``E + E^T`` on the diagonal); uses up ``logits``."""
    (i0, i1), (j0, j1) = rows, cols
    row_part = signed_exp(logits - exp_shift[i0:i1, None], sign, i0, i1, dim=1)
    if rows == cols:
        return row_part + row_part.T
    column_part = signed_exp(logits.sub_(exp_shift[None, j0:j1]), sign, j0, j1, dim=0)
    return row_part.add_(column_part)


def signed_exp(shifted, sign, start, end, dim):
    """``exp`` in place, times the rows' (``dim=1``) or columns' (``dim=0``) sign if any."""
    exp = shifted.exp_()
    if sign is None:
        return exp
    return exp.mul_(sign[start:end, None] if dim == 1 else sign[None, start:end])
