"""Slow, obviously-correct float64 reference of ICE, written from the project's
definition of the loss:

    l_ij = -log p_ij = softplus(LSE_i - Z_ij),   LSE_i = logsumexp_{k in N(i)} Z_ik
    w_ij = exp(lam * (1 - p_ij))  (without gradient)
    batch:  L = sum_ij w_ij l_ij / sum_ij w_ij
    anchor: L = mean_i (sum_j w_ij l_ij / sum_j w_ij)

with ``Z = s * S`` (``-s * d`` for a distance), positives ``P(i)`` the same-label
references (minus ``i`` itself without a reference set) or the mined positives
(duplicates counted once), negatives ``N(i)`` the others or the mined negatives, and
pairs whose anchor has no negative left out.

Everything is computed with plain Python loops over anchors and pairs, one pair at a
time, so that the reference shares no vectorised trick with the implementation under
test. The functions accept torch tensors and return float64 torch tensors, so that
``torch.autograd`` on the reference gives the reference gradients (the ICE weights are
detached, i.e. held constant, exactly as the spec prescribes).
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistanceSpec:
    """A distance described independently of PML's distance objects.

    kind: "cosine" (normalised dot product), "dot" (dot product) or "lp" (Lp distance).
    normalize: L_p-normalise the embeddings first ("cosine" always does).
    p: the norm used both for the normalisation and for the Lp distance.
    power: the distance/similarity is raised to this power.
    """

    kind: str
    normalize: bool = True
    p: float = 2.0
    power: float = 1.0

    @property
    def is_similarity(self):
        return self.kind in ("cosine", "dot")


COSINE = DistanceSpec("cosine")


def _lp_norm(vector, p):
    total = 0.0
    for value in vector:
        total = total + value.abs() ** p
    return total ** (1.0 / p)


def _prepare(vector, distance):
    if distance.kind == "cosine" or distance.normalize:
        return vector / _lp_norm(vector, distance.p)
    return vector


def pair_similarity(x, r, distance):
    """S(x, r) for one pair: the similarity, or minus the distance (spec: S = -d)."""
    x, r = _prepare(x, distance), _prepare(r, distance)
    if distance.is_similarity:
        value = 0.0
        for a, b in zip(x, r):
            value = value + a * b
        return value**distance.power if distance.power != 1 else value
    distance_value = _lp_norm(x - r, distance.p)
    if distance.power != 1:
        distance_value = distance_value**distance.power
    return -distance_value


def softplus(x):
    """log(1 + exp(x)), exactly (no large-input threshold), with gradient sigmoid(x)."""
    return torch.logaddexp(torch.zeros_like(x), x)


def pairs_from_labels(labels, ref_labels=None):
    """P(i) and N(i) from labels; without ref_labels the batch is its own reference
    and an element is never paired with itself."""
    labels = [int(v) for v in labels]
    has_ref = ref_labels is not None
    ref = [int(v) for v in ref_labels] if has_ref else labels
    positives, negatives = {}, {}
    for i, yi in enumerate(labels):
        for j, yj in enumerate(ref):
            if not has_ref and i == j:
                continue
            if yj == yi:
                positives.setdefault(i, set()).add(j)
            else:
                negatives.setdefault(i, set()).add(j)
    return positives, negatives


def pairs_from_indices_tuple(indices_tuple):
    """P(i) and N(i) exactly as mined: pairs (a1, p, a2, n) as given, triplets
    (a, p, n) converted to pairs; duplicated pairs count once (sets)."""
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        a1, a2 = a, a
    elif len(indices_tuple) == 4:
        a1, p, a2, n = indices_tuple
    else:
        raise ValueError("indices_tuple must have 3 or 4 elements")
    positives, negatives = {}, {}
    for i, j in zip(a1.tolist(), p.tolist()):
        positives.setdefault(i, set()).add(j)
    for i, k in zip(a2.tolist(), n.tolist()):
        negatives.setdefault(i, set()).add(k)
    return positives, negatives


def per_pair_losses(embeddings, ref_emb, positives, negatives, scale, distance=COSINE):
    """{(i, j): l_ij} with l_ij = softplus(LSE_i - Z_ij), Z = scale * S, LSE_i the
    logsumexp of Z over the anchor's negatives. Anchors without a negative are
    left out (their pairs are not pairs of the loss)."""
    embeddings = embeddings.to(torch.float64)
    ref_emb = ref_emb.to(torch.float64)
    losses = {}
    for i in sorted(positives):
        if not negatives.get(i):
            continue
        negative_logits = [
            scale * pair_similarity(embeddings[i], ref_emb[k], distance)
            for k in sorted(negatives[i])
        ]
        lse = torch.logsumexp(torch.stack(negative_logits), dim=0)
        for j in sorted(positives[i]):
            logit = scale * pair_similarity(embeddings[i], ref_emb[j], distance)
            losses[(i, j)] = softplus(lse - logit)
    return losses


def ice_weight(pair_loss, lam):
    """w_ij = exp(lam * (1 - p_ij)) with p_ij = exp(-l_ij), held constant."""
    p = math.exp(-float(pair_loss.detach()))
    return math.exp(lam * (1.0 - p))


def reduce_pair_losses(losses, lam, normalize="batch", zero_like=None):
    """Spec's batch or anchor normalisation of the reweighted pair losses."""
    if not losses:
        return torch.zeros((), dtype=torch.float64) if zero_like is None else zero_like
    if normalize == "batch":
        weighted, total_weight = 0.0, 0.0
        for loss in losses.values():
            w = ice_weight(loss, lam)
            weighted = weighted + w * loss
            total_weight += w
        return weighted / total_weight
    if normalize == "anchor":
        by_anchor = {}
        for (i, _), loss in losses.items():
            by_anchor.setdefault(i, []).append(loss)
        anchor_values = []
        for anchor_losses in by_anchor.values():
            weighted, total_weight = 0.0, 0.0
            for loss in anchor_losses:
                w = ice_weight(loss, lam)
                weighted = weighted + w * loss
                total_weight += w
            anchor_values.append(weighted / total_weight)
        total = 0.0
        for value in anchor_values:
            total = total + value
        return total / len(anchor_values)
    raise ValueError(f"unknown normalize {normalize!r}")


def pair_sets(labels=None, indices_tuple=None, ref_labels=None):
    """P(i), N(i) from an indices_tuple when given, otherwise from labels."""
    if indices_tuple is not None:
        return pairs_from_indices_tuple(indices_tuple)
    return pairs_from_labels(labels, ref_labels)


def ice_pair_losses(
    embeddings,
    labels=None,
    indices_tuple=None,
    ref_emb=None,
    ref_labels=None,
    scale=32.0,
    distance=COSINE,
):
    """Per-pair losses {(anchor, positive): l_ij} of ICE for a batch."""
    positives, negatives = pair_sets(labels, indices_tuple, ref_labels)
    reference_set = embeddings if ref_emb is None else ref_emb
    return per_pair_losses(
        embeddings, reference_set, positives, negatives, scale, distance
    )


def ice_reference(
    embeddings,
    labels=None,
    indices_tuple=None,
    ref_emb=None,
    ref_labels=None,
    scale=32.0,
    lam=0.0,
    normalize="batch",
    distance=COSINE,
):
    """The ICE loss of the spec, float64; differentiable w.r.t. float64 inputs."""
    losses = ice_pair_losses(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, scale, distance
    )
    zero = (embeddings.to(torch.float64) * 0).sum()
    return reduce_pair_losses(losses, lam, normalize, zero_like=zero)
