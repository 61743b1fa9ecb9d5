"""ICE's relative weight analysis on a batch of embeddings.

For every positive pair ``(i, j)`` of the batch ICE gives a matching probability ``p_ij``
(``l_ij = -log p_ij``, from ``ICELoss`` with a ``DoNothingReducer``). For a reweighting
strength ``lam``, with ``w_ij`` the weight ``ICEReweightReducer(lam)`` gives ``l_ij``:

    pull    u_ij     = w_ij (1 - p_ij)
    share   s_ij     = u_ij / sum_kl u_kl

``s_ij`` is the pair's share of the gradient with respect to the positive logits
(``|dL/dZ_ij|`` under batch normalisation), so ``lam = 0`` weights pairs by ``1 - p``
alone and a larger ``lam`` moves the gradient towards badly matched pairs. The hardest
10 % of pairs are the 10 % with the lowest ``p``.
"""

from dataclasses import dataclass

import torch

from pml_ice import losses, reducers

HARDEST_FRACTION = 0.1


@dataclass
class PairWeights:
    """Per-pair matching probabilities, and weights and gradient shares per ``lam``."""

    match_prob: torch.Tensor
    weights: dict
    shares: dict

    def hardest_share(self, lam, fraction=HARDEST_FRACTION):
        """Share of the gradient carried by the ``fraction`` of pairs with the lowest ``p``."""
        count = max(1, round(fraction * len(self.match_prob)))
        hardest = torch.argsort(self.match_prob)[:count]
        return float(self.shares[lam][hardest].sum())


def weights_and_pulls(pair_losses, lam):
    """ICEReweightReducer(lam)'s weight ``w`` of each per-pair loss, and the pair's pull
    ``w (1 - p)`` on its positive logit."""
    weights = reducers.ICEReweightReducer(lam=lam).weights(pair_losses)
    return weights, weights * -torch.expm1(-pair_losses)


def pair_weights(embeddings, labels, scale, lams):
    """:class:`PairWeights` of the positive pairs of a batch (float64, no gradient)."""
    loss_func = losses.ICELoss(scale=scale, reducer=reducers.DoNothingReducer())
    with torch.no_grad():
        pair_losses = loss_func(embeddings.double(), labels)["loss"]["losses"]
    if not torch.is_tensor(pair_losses) or len(pair_losses) == 0:
        raise ValueError("the batch has no positive pair with a negative: nothing to analyse")
    weights, shares = {}, {}
    for lam in lams:
        weights[lam], pulls = weights_and_pulls(pair_losses, lam)
        shares[lam] = pulls / pulls.sum()
    return PairWeights(torch.exp(-pair_losses), weights, shares)
