"""The last step of every path's forward: per-pair losses from the per-anchor
log-sum-exp over the negatives."""

import torch


def save_and_finish(ctx, anchors, pos_logits, row_max, row_sum, *saved):
    """``l_ij = softplus(LSE_i - Z_ij)`` with ``LSE_i = row_max_i + log(row_sum_i)``.

    Saves for backward ``(*saved, lse, row_sum, 1 - p)`` with ``1 - p =
    sigmoid(LSE_i - Z_ij)``; ``anchors`` gives each pair's row.
    """
    lse = row_max + torch.log(row_sum)
    margin = lse[anchors] - pos_logits
    ctx.save_for_backward(*saved, lse, row_sum, torch.sigmoid(margin))
    return torch.logaddexp(margin, torch.zeros_like(margin))
