"""The gradient of ICE's per-pair losses as a differentiable graph, for the paths'
backward when a graph of the gradient is requested (``create_graph=True``: gradient
penalties, higher-order derivatives). It recomputes the losses with ordinary autograd
operations, holding the (anchors x references) logits whole:

    l_ij = softplus(LSE_i - Z_ij),   LSE_i = logsumexp_{k : negative[i, k]} Z_ik
"""

import torch

from .logits import accumulation_dtype


def graph_of_gradient(kernel, queries, refs, negative, positives, grad_losses, refs_need_grad):
    """``d(sum_ij g_ij l_ij) / d(queries[, refs])`` as a differentiable graph, where
    ``g = grad_losses``, ``positives = (anchors, refs)`` and ``negative`` is the
    (anchors x references) mask of negatives; ``refs`` may be ``queries`` itself.
    ``torch.func.vjp`` builds it, so it is differentiable by autograd (create_graph)
    and by torch.func transforms alike."""
    acc_dtype = accumulation_dtype(queries.dtype)
    # rows without a negative have no pair; zeros keep their (unused) numbers finite
    has_negative = negative.any(dim=1, keepdim=True)
    anchors, pos_refs = positives

    def pair_losses(queries, refs):
        logits = kernel.differentiable_logits(queries, refs, acc_dtype)
        negative_logits = torch.where(
            has_negative, logits.masked_fill(~negative, float("-inf")), torch.zeros_like(logits)
        )
        lse = torch.logsumexp(negative_logits, dim=1)
        margin = lse[anchors] - logits[anchors, pos_refs]
        return torch.logaddexp(margin, torch.zeros_like(margin))

    if refs is queries or not refs_need_grad:
        _, vjp = torch.func.vjp(lambda q: pair_losses(q, q if refs is queries else refs), queries)
    else:
        _, vjp = torch.func.vjp(pair_losses, queries, refs)
    grads = vjp(grad_losses.to(acc_dtype))
    return grads + (None,) * (2 - len(grads))


def dense_mask(pair_list, num_rows, num_refs, value):
    """An (anchors x references) boolean mask, ``value`` on the pairs and not elsewhere."""
    mask = torch.full(
        (num_rows, num_refs), not value, dtype=torch.bool, device=pair_list.anchors.device
    )
    mask[pair_list.anchors, pair_list.refs] = value
    return mask
