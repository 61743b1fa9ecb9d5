import torch
from pytorch_metric_learning.reducers import BaseReducer

from ..checks import check_positive_real

NORMALIZATIONS = ("batch", "anchor")


class ICEReweightReducer(BaseReducer):
    """ICE's sample reweighting of per-pair negative log-probabilities ``l``.

    The matching probability is recovered as ``p = exp(-l)``; each term gets the
    weight ``w = exp(lam * (1 - p))``, a constant in backward, so a badly matched
    pair pulls harder:

        normalize="batch":  L = sum w l / sum w
        normalize="anchor": L = mean over anchors a of (sum_{a} w l / sum_{a} w)

    ``lam = 0`` gives the plain mean (batch) or the mean of per-anchor means (anchor).
    With ``collect_stats=True`` it records ``max_weight_over_mean`` and
    ``effective_sample_size`` of the last call's weights.
    Pair and triplet losses are grouped by their anchor ``indices[0]``; ``"element"``
    losses are their own anchors.

    Args:
        lam: ``lam >= 0``. Where the default comes from, with ICELoss's default scale:
            the documentation's "Tuning" page, "The defaults".
        normalize: ``"anchor"`` (default) or ``"batch"``.
    """

    def __init__(self, lam=2.42, normalize="anchor", **kwargs):
        super().__init__(**kwargs)
        check_positive_real("ICEReweightReducer", "lam", lam, strictly=False)
        if normalize not in NORMALIZATIONS:
            raise ValueError(
                f"ICEReweightReducer: unknown normalize {normalize!r}; "
                f"expected one of {NORMALIZATIONS}"
            )
        self.lam = float(lam)
        self.normalize = normalize
        self.add_to_recordable_attributes(list_of_names=["lam"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["max_weight_over_mean", "effective_sample_size"], is_stat=True
        )

    def log_weights(self, losses):
        """``lam * (1 - p)`` with ``p = exp(-loss)``, in at least float32, without gradient."""
        with torch.no_grad():
            return self.lam * -torch.expm1(-losses.to(torch.promote_types(losses.dtype, torch.float32)))

    def weights(self, losses):
        """Each loss's weight ``w = exp(lam * (1 - p))``, before normalisation (up to
        ``exp(lam)``), in at least float32, without gradient."""
        return torch.exp(self.log_weights(losses))

    def reweighted_mean(self, losses, anchors, embeddings):
        """``total / count`` of :meth:`reweighted_sums`, in the losses' dtype."""
        if len(losses) == 0:
            return self.zero_loss(embeddings)
        total, count = self.reweighted_sums(losses, anchors)
        return (total / count).to(losses.dtype)

    def reweighted_sums(self, losses, anchors, all_reduce_max=None):
        """The loss as ``total / count``, in at least float32:

            normalize="batch":  total = sum w l, count = sum w
            normalize="anchor": total = sum of the anchors' weighted means,
                                count = number of anchors

        The weights are divided by their largest (per anchor for ``"anchor"``), which the
        normalised mean does not see: no overflow for any ``lam`` and no half-precision
        sums. For a batch whose anchors are sharded over processes, ``all_reduce_max``
        (an in-place maximum over them, which every process calls, with ``-inf`` where it
        has no loss) makes the largest of ``"batch"`` common, so that the processes' sums
        add up. No losses give zero sums."""
        if losses.numel() != len(anchors):
            raise ValueError(
                f"ICEReweightReducer: {losses.numel()} losses for {len(anchors)} indices"
            )
        losses = losses.reshape(-1)
        log_weights = self.log_weights(losses)
        acc_losses = losses.to(log_weights.dtype)
        if self.normalize == "batch":
            largest = (
                log_weights.max() if len(log_weights) else log_weights.new_tensor(float("-inf"))
            )
            if all_reduce_max is not None:
                largest = all_reduce_max(largest)
            weights = torch.exp(log_weights - largest)
            self.record_weight_stats(weights)
            return torch.sum(weights * acc_losses), torch.sum(weights)
        unique_anchors, groups = torch.unique(anchors, return_inverse=True)
        group_max = log_weights.new_full((len(unique_anchors),), float("-inf"))
        group_max.scatter_reduce_(0, groups, log_weights, "amax")
        weights = torch.exp(log_weights - group_max[groups])
        self.record_weight_stats(weights)
        weighted_sum = acc_losses.new_zeros(len(unique_anchors)).index_add(
            0, groups, weights * acc_losses
        )
        weight_sum = weights.new_zeros(len(unique_anchors)).index_add_(0, groups, weights)
        return torch.sum(weighted_sum / weight_sum), weights.new_tensor(len(unique_anchors))

    def record_weight_stats(self, weights):
        """With ``collect_stats``: the spread of the weights, ``max w / mean w``, and the
        effective sample size ``(sum w)^2 / (n sum w^2)`` (1 for equal weights)."""
        if self.collect_stats and len(weights) > 0:
            with torch.no_grad():
                self.max_weight_over_mean = (weights.max() / weights.mean()).item()
                self.effective_sample_size = (
                    weights.sum() ** 2 / (len(weights) * (weights**2).sum())
                ).item()

    def element_reduction(self, losses, loss_indices, embeddings, labels):
        return self.reweighted_mean(losses, loss_indices, embeddings)

    def tuple_reduction(self, losses, loss_indices, embeddings, labels):
        return self.reweighted_mean(losses, loss_indices[0], embeddings)

    pos_pair_reduction = tuple_reduction
    neg_pair_reduction = tuple_reduction
    triplet_reduction = tuple_reduction
