"""The last step of every path's forward: per-pair losses from the per-anchor
log-sum-exp over the negatives, and the common part of the paths' setup_context."""

import torch


def pair_terms(anchors, pos_logits, row_max, row_sum, *kept):
    """``l_ij = softplus(LSE_i - Z_ij)`` with ``LSE_i = row_max_i + log(row_sum_i)``.

    Returns ``(l, *kept, LSE, row_sum, 1 - p)`` with ``1 - p = sigmoid(LSE_i - Z_ij)``:
    the losses, then what backward needs; ``anchors`` gives each pair's row.
    """
    lse = row_max + torch.log(row_sum)
    margin = lse[anchors] - pos_logits
    losses = torch.logaddexp(margin, torch.zeros_like(margin))
    return (losses, *kept, lse, row_sum, torch.sigmoid(margin))


def save_pair_terms(ctx, inputs, output):
    """Saves ``inputs`` and the forward's outputs after the losses, which have no
    gradient, for backward."""
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*inputs, *output[1:])
