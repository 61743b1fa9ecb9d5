"""ICE's per-pair losses when the pairs come from labels and the logits are held whole
(the ``label_mask`` path).

Negatives are found by comparing labels, an (anchors x references) boolean mask beside
the logits, so no pair list is sorted or built and the only host synchronisation is
the count of positive pairs. Backward is ``ICEPairLosses``'s with the exponentials kept.
"""

from types import SimpleNamespace

import torch

from .logits import accumulation_dtype
from .pair_list_losses import ICEPairLosses
from .pair_terms import pair_terms, save_pair_terms


def label_positives(same_label, ref_is_batch):
    """Positive pairs ``(anchors, refs)`` sorted by anchor: same label, the anchor itself
    excluded when the references are the batch, and only for anchors with a negative."""
    has_negative = ~same_label.all(dim=1)
    positive = same_label & has_negative[:, None]
    if ref_is_batch:
        positive.fill_diagonal_(False)
    return torch.nonzero(positive, as_tuple=True)


class ICELabelLosses(ICEPairLosses):
    """``softplus(LSE_i - Z_ij)`` for ``positives = (anchors, refs)``, where ``LSE_i`` runs
    over the references whose label differs (``same_label[i, k]`` False).
    ``negative_mask()`` rebuilds ``~same_label`` for a backward under ``create_graph``,
    so that the mask is not held until backward."""

    @staticmethod
    def forward(queries, refs, kernel, same_label, positives, negative_mask):
        with torch.autocast(queries.device.type, enabled=False):
            acc_dtype = accumulation_dtype(queries.dtype)
            logits = queries.new_empty(len(queries), len(refs), dtype=acc_dtype)
            kernel.logits(queries, refs, logits)
            pos_logits = logits[positives]
            logits.masked_fill_(same_label, float("-inf"))
            # a row without negatives has no positive pair; keep its numbers finite
            row_max = torch.amax(logits, dim=1).nan_to_num_(neginf=0.0)
            exp_logits = logits.sub_(row_max[:, None]).exp_()
            row_sum = exp_logits.sum(dim=1).clamp_min_(torch.finfo(acc_dtype).tiny)
            return pair_terms(positives[0], pos_logits, row_max, row_sum, exp_logits)

    @staticmethod
    def setup_context(ctx, inputs, output):
        queries, refs, kernel, _, positives, negative_mask = inputs
        ctx.kernel, ctx.exp_saved, ctx.refs_are_queries = kernel, True, refs is queries
        ctx.pairs = SimpleNamespace(
            positives=SimpleNamespace(anchors=positives[0], refs=positives[1]),
            negative_mask=negative_mask,
        )
        save_pair_terms(ctx, (queries, refs), output)

    @staticmethod
    def backward(ctx, grad_losses, *_):
        grad_queries, grad_refs = ICEPairLosses.backward(ctx, grad_losses)[:2]
        return grad_queries, grad_refs, None, None, None, None
