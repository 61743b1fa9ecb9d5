import torch
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import common_functions as c_f

from ..checks import check_positive_real
from ..reducers.ice_reweight_reducer import ICEReweightReducer
from .ice_function import DistanceLogits, ICEPairLosses, InnerProductLogits, plan_computation
from .ice_label_losses import ICELabelLosses, label_positives
from .ice_symmetric_tiles import ICESymmetricTiles
from .ice_pairs import ICEPairs, PairList, pairs_from_indices_tuple, pairs_from_labels


class ICELoss(BaseMetricLossFunction):
    """Instance Cross Entropy (Wang et al., arXiv 1911.09976).

    For an anchor ``i``, a positive ``j`` and the anchor's negatives ``N(i)``, with
    logits ``Z = scale * S`` (``-scale * d`` for a distance that is not a similarity):

        l_ij = -log( exp(Z_ij) / (exp(Z_ij) + sum_{k in N(i)} exp(Z_ik)) )
             = softplus( logsumexp_{k in N(i)} Z_ik - Z_ij )

    Returns one ``"pos_pair"`` sub-loss, so every PML reducer applies; the default
    reducer is :class:`~pml_ice.reducers.ICEReweightReducer` (ICE's sample reweighting).
    Anchors without a negative carry no information and are left out.

    Args:
        scale: the inverse temperature ``s > 0``. The default 113 (with the reducer's
            ``lam=1.53``) is the best batch-normalised trial of a validation-only
            tuning run on glyphs (``python -m benchmarks.tune --trials 8``, 1 seed;
            ``benchmarks/tuned/glyphs-tuning.md``): validation MAP@R 74.4, where all
            eight ICE trials scored 73.0 to 75.2, a spread close to seed noise; see
            the README's "Choosing scale and lam".
        memory_efficient: ``None`` (default) chunks the anchors and recomputes the
            logits in backward when ``anchors x references`` exceeds the device's
            ``DENSE_LOGITS_LIMIT`` (2**26 on a CPU, 2**28 on a GPU), so memory stays
            linear in the batch; ``True`` always does, ``False`` never does.
        chunk_size: anchors per chunk on the chunked path (default: about 2**24 logits
            on a CPU, 2**27 on a GPU). ``plan_computation`` makes both choices.
    """

    def __init__(self, scale=113.0, memory_efficient=None, chunk_size=None, **kwargs):
        super().__init__(**kwargs)
        check_positive_real("ICELoss", "scale", scale, strictly=True)
        if memory_efficient not in (None, True, False):
            raise ValueError(
                f"ICELoss: memory_efficient must be None, True or False, got {memory_efficient!r}"
            )
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(
                f"ICELoss: chunk_size must be a positive integer or None, got {chunk_size!r}"
            )
        self.scale = float(scale)
        self.memory_efficient = memory_efficient
        self.chunk_size = chunk_size
        self.add_to_recordable_attributes(list_of_names=["scale"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["num_pos_pairs", "num_neg_pairs", "mean_pos_match_prob"],
            is_stat=True,
        )

    def forward(
        self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None
    ):
        check_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        queries, refs, kernel = self.logits_kernel(embeddings, ref_emb)
        plan = plan_computation(
            len(embeddings), len(ref_emb), embeddings.device, self.memory_efficient,
            self.chunk_size, queries.dtype,
        )
        ref_is_batch = ref_emb is embeddings
        if indices_tuple is None and not plan.memory_efficient:
            losses, indices = self.losses_from_label_mask(
                queries, refs, kernel, labels, ref_labels, ref_is_batch
            )
        elif (
            indices_tuple is None
            and ref_is_batch
            and plan.symmetric_tiles
            and isinstance(kernel, InnerProductLogits)
        ):
            losses, indices = self.losses_from_symmetric_tiles(queries, kernel, labels, plan)
        else:
            losses, indices = self.losses_from_pair_lists(
                queries, refs, kernel, plan, labels, indices_tuple, ref_labels, ref_is_batch
            )
        if losses is None:
            return self.zero_losses()
        if self.collect_stats:
            self.num_pos_pairs = len(losses)
            self.mean_pos_match_prob = torch.exp(-losses.detach()).mean().item()
        return {"loss": {"losses": losses, "indices": indices, "reduction_type": "pos_pair"}}

    def losses_from_label_mask(self, queries, refs, kernel, labels, ref_labels, ref_is_batch):
        """The dense path for pairs from labels: negatives by comparing labels (in their
        common dtype, so distinct labels never wrap onto each other)."""
        same_label = labels[:, None] == ref_labels[None, :]
        positives = label_positives(same_label, ref_is_batch)
        if self.collect_stats:
            has_positive = torch.zeros_like(labels, dtype=torch.bool)
            has_positive[positives[0]] = True
            self.num_neg_pairs = int((~same_label[has_positive]).sum())
        if len(positives[0]) == 0:
            return None, None
        return ICELabelLosses.apply(queries, refs, kernel, same_label, positives), positives

    def losses_from_symmetric_tiles(self, queries, kernel, labels, plan):
        """The chunked path for pairs from labels within the batch: ``Z`` is symmetric,
        so square tiles serve two blocks of rows each (two matrix products in all)."""
        pairs = pairs_from_labels(labels, labels, ref_is_batch=True)
        positives = pairs.positives
        if self.collect_stats:
            has_positive = positives.counts() > 0
            self.num_neg_pairs = int(pairs.num_negatives[has_positive].sum())
        if len(positives.anchors) == 0:
            return None, None
        indices = (positives.anchors, positives.refs)
        losses = ICESymmetricTiles.apply(queries, kernel, labels, indices, plan.tile_rows)
        return losses, indices

    def losses_from_pair_lists(
        self, queries, refs, kernel, plan, labels, indices_tuple, ref_labels, ref_is_batch
    ):
        """Sorted pair lists (miners, or labels on the chunked path); only the rows of
        anchors that have a negative are computed."""
        if indices_tuple is None:
            pairs = pairs_from_labels(labels, ref_labels, ref_is_batch)
        else:
            pairs = pairs_from_indices_tuple(indices_tuple, len(queries), len(refs), queries.device)
        anchors, pairs = keep_anchors_with_negatives(pairs, len(queries))
        if self.collect_stats:
            self.num_neg_pairs = int(pairs.num_negatives[anchors].sum())
        if len(anchors) == 0:
            return None, None
        if len(anchors) < len(queries):
            queries = queries[anchors]
        losses = ICEPairLosses.apply(
            queries, refs, kernel, pairs, plan.chunk_rows, not plan.memory_efficient
        )
        return losses, (anchors[pairs.positives.anchors], pairs.positives.refs)

    def logits_kernel(self, embeddings, ref_emb):
        """Embeddings ready for the logits, and how to compute them.

        Cosine and dot-product similarities become a plain matrix product of the
        (normalised) embeddings, in the autocast dtype under ``torch.autocast``; any
        other distance is evaluated chunk by chunk in at least float32.
        """
        sign = 1.0 if self.distance.is_inverted else -1.0
        if is_inner_product(self.distance):
            queries = self.distance.maybe_normalize(embeddings)
            refs = (
                queries if ref_emb is embeddings else self.distance.maybe_normalize(ref_emb)
            )
            self.distance.set_default_stats(embeddings, ref_emb, queries, refs)
            device_type = embeddings.device.type
            if torch.is_autocast_enabled(device_type):
                autocast_dtype = torch.get_autocast_dtype(device_type)
                queries, refs = queries.to(autocast_dtype), refs.to(autocast_dtype)
            return queries, refs, InnerProductLogits(sign * self.scale)
        return embeddings, ref_emb, DistanceLogits(self.distance, sign * self.scale)

    def get_default_reducer(self):
        return ICEReweightReducer()

    def get_default_distance(self):
        return CosineSimilarity()


def is_inner_product(distance):
    """True when the distance matrix is exactly ``normalize(q) @ normalize(r).T``."""
    return (
        isinstance(distance, DotProductSimilarity)
        and type(distance).compute_mat is DotProductSimilarity.compute_mat
        and distance.power == 1
    )


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


def check_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """Clear errors for inputs ICE cannot use."""
    check_embeddings("embeddings", embeddings)
    if labels is None and indices_tuple is None:
        raise ValueError("ICELoss: labels and indices_tuple cannot both be None")
    check_labels("labels", labels, len(embeddings))
    if ref_emb is not None:
        check_embeddings("ref_emb", ref_emb)
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ICELoss: ref_emb has embedding size {ref_emb.shape[1]} but embeddings "
                f"have {embeddings.shape[1]}"
            )
        if ref_emb.dtype != embeddings.dtype:
            raise TypeError(
                f"ICELoss: ref_emb dtype {ref_emb.dtype} differs from embeddings dtype "
                f"{embeddings.dtype}"
            )
        if indices_tuple is None and ref_labels is None:
            raise ValueError(
                "ICELoss: ref_labels are required with ref_emb when pairs come from labels"
            )
        check_labels("ref_labels", ref_labels, len(ref_emb))
    elif ref_labels is not None:
        raise ValueError("ICELoss: ref_labels were given without ref_emb")
    if indices_tuple is not None:
        num_refs = len(embeddings) if ref_emb is None else len(ref_emb)
        check_indices_tuple(indices_tuple, len(embeddings), num_refs)


def describe(value):
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(type(value))


def check_embeddings(name, embeddings):
    if not torch.is_tensor(embeddings):
        raise TypeError(f"ICELoss: {name} must be a torch.Tensor, got {type(embeddings)}")
    if embeddings.ndim != 2:
        raise ValueError(
            f"ICELoss: {name} must be 2-D (batch_size, embedding_size), "
            f"got shape {tuple(embeddings.shape)}"
        )
    if not embeddings.is_floating_point():
        raise TypeError(f"ICELoss: {name} must be floating point, got {embeddings.dtype}")


def check_labels(name, labels, expected_length):
    if labels is None:
        return
    if not torch.is_tensor(labels):
        raise TypeError(f"ICELoss: {name} must be a torch.Tensor, got {type(labels)}")
    if labels.ndim != 1 or len(labels) != expected_length:
        raise ValueError(
            f"ICELoss: {name} must have shape ({expected_length},), "
            f"got {tuple(labels.shape)}"
        )


def check_indices_tuple(indices_tuple, num_anchors, num_refs):
    if not c_f.is_list_or_tuple(indices_tuple) or len(indices_tuple) not in (3, 4):
        raise ValueError(
            "ICELoss: indices_tuple must be (anchors, positives, negatives) or "
            "(anchors1, positives, anchors2, negatives)"
        )
    for position, index in enumerate(indices_tuple):
        if (
            not torch.is_tensor(index)
            or index.ndim != 1
            or index.is_floating_point()
            or index.is_complex()
            or index.dtype == torch.bool
        ):
            raise ValueError(
                f"ICELoss: indices_tuple[{position}] must be a 1-D integer tensor of "
                f"indices, got {describe(index)}"
            )
        is_anchor = position == 0 or (len(indices_tuple) == 4 and position == 2)
        bound = num_anchors if is_anchor else num_refs
        if len(index) > 0 and (index.min() < 0 or index.max() >= bound):
            raise ValueError(
                f"ICELoss: indices_tuple[{position}] has indices outside [0, {bound})"
            )
    groups = [indices_tuple] if len(indices_tuple) == 3 else [indices_tuple[:2], indices_tuple[2:]]
    for group in groups:
        if len({len(index) for index in group}) != 1:
            raise ValueError(
                "ICELoss: the tensors of indices_tuple that form tuples must have equal lengths"
            )
