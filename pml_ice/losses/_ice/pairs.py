"""Positive and negative pairs of ICE, built without any (batch x reference) mask."""

from dataclasses import dataclass

import torch
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu


@dataclass
class PairList:
    """Pairs ``(anchors[k], refs[k])`` sorted by anchor.

    ``row_ptr`` has one entry per anchor plus one: the pairs of anchor ``i`` are
    ``row_ptr[i]:row_ptr[i + 1]`` (a CSR layout, so a chunk of anchors is a slice).
    """

    anchors: torch.Tensor
    refs: torch.Tensor
    row_ptr: torch.Tensor

    @classmethod
    def from_sorted(cls, anchors, refs, num_anchors):
        counts = torch.bincount(anchors, minlength=num_anchors)
        row_ptr = torch.zeros(num_anchors + 1, dtype=torch.long, device=anchors.device)
        torch.cumsum(counts, 0, out=row_ptr[1:])
        return cls(anchors, refs, row_ptr)

    def select(self, keep):
        return self.anchors[keep], self.refs[keep]

    def counts(self):
        return self.row_ptr[1:] - self.row_ptr[:-1]


@dataclass
class ICEPairs:
    """What ICE needs from labels or a miner.

    ``positives``: the loss terms. ``masked`` is a PairList of references that are
    *not* negatives (labels: every same-label reference, the anchor itself included)
    when ``masked_are_negatives`` is False, or the list of the negatives themselves
    (mined pairs) when it is True.
    """

    positives: PairList
    masked: PairList
    masked_are_negatives: bool
    num_negatives: torch.Tensor


def same_label_pairs(labels, ref_labels):
    """Every ``(i, j)`` with ``ref_labels[j] == labels[i]``, sorted by ``i``, for the
    anchors that have a negative (the others carry no loss), and every anchor's number
    of negatives: O(N log M + pairs). Labels are compared in their common dtype, so
    distinct labels never wrap onto each other."""
    dtype = torch.promote_types(labels.dtype, ref_labels.dtype)
    if dtype == torch.bool:
        dtype = torch.int64
    sorted_ref, order = torch.sort(ref_labels.to(dtype), stable=True)
    labels = labels.to(dtype)
    start = torch.searchsorted(sorted_ref, labels, right=False)
    counts = torch.searchsorted(sorted_ref, labels, right=True) - start
    num_negatives = len(ref_labels) - counts
    counts = torch.where(num_negatives > 0, counts, 0)
    anchors = torch.repeat_interleave(
        torch.arange(len(labels), device=labels.device), counts
    )
    first_of_anchor = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank_in_anchor = torch.arange(len(anchors), device=labels.device) - first_of_anchor
    refs = order[torch.repeat_interleave(start, counts) + rank_in_anchor]
    return PairList.from_sorted(anchors, refs, len(labels)), num_negatives


def pairs_from_labels(labels, ref_labels, ref_is_batch):
    """Positives are same-label references (the anchor itself excluded when the
    reference set is the batch); negatives are all other references."""
    same, num_negatives = same_label_pairs(labels, ref_labels)
    if ref_is_batch:
        keep = same.anchors != same.refs
        anchors, refs = same.select(keep)
        positives = PairList.from_sorted(anchors, refs, len(labels))
    else:
        positives = same
    return ICEPairs(positives, same, False, num_negatives)


def unique_pairs(anchors, refs, num_anchors, num_refs):
    """Sorted, de-duplicated pairs."""
    keys = torch.unique(anchors.long() * num_refs + refs.long())
    return PairList.from_sorted(
        torch.div(keys, num_refs, rounding_mode="floor"), keys % num_refs, num_anchors
    )


def pairs_from_indices_tuple(indices_tuple, num_anchors, num_refs, device):
    """Mined pairs (or triplets converted to pairs), each pair counted once."""
    a1, p, a2, n = (
        x.to(device) for x in lmu.convert_to_pairs(tuple(indices_tuple), None)
    )
    positives = unique_pairs(a1, p, num_anchors, num_refs)
    negatives = unique_pairs(a2, n, num_anchors, num_refs)
    return ICEPairs(positives, negatives, True, negatives.counts())


def keep_anchors_with_negatives(pairs, num_anchors):
    """Drop positive pairs whose anchor has no negative, and renumber the remaining
    anchors ``0..A-1`` so that only their rows are computed. Returns the kept
    anchors' original indices and the renumbered pairs."""
    positives, masked = pairs.positives, pairs.masked
    has_negative = pairs.num_negatives > 0
    valid = has_negative[positives.anchors]
    anchors = torch.unique(positives.anchors[valid])
    new_index = torch.full(
        (num_anchors,), -1, dtype=torch.long, device=positives.anchors.device
    )
    new_index[anchors] = torch.arange(len(anchors), device=anchors.device)

    def renumber(pair_list, keep):
        pair_anchors, refs = pair_list.select(keep)
        return PairList.from_sorted(new_index[pair_anchors], refs, len(anchors))

    return anchors, ICEPairs(
        renumber(positives, valid),
        renumber(masked, new_index[masked.anchors] >= 0),
        pairs.masked_are_negatives,
        pairs.num_negatives,
    )
