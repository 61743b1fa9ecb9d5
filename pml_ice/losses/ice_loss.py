from functools import partial

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction

from ..checks import check_loss_inputs, check_positive_integer, check_positive_real
from ..reducers.ice_reweight_reducer import ICEReweightReducer
from ._ice.label_mask_losses import ICELabelLosses, label_positives
from ._ice.logits import is_inner_product, logits_kernel
from ._ice.pair_list_losses import ChunkedICEPairs, ICEPairLosses
from ._ice.pairs import keep_anchors_with_negatives, pairs_from_indices_tuple, pairs_from_labels
from ._ice.plan import ComputationPath, plan_computation
from ._ice.symmetric_tile_losses import ICESymmetricTiles


class ICELoss(BaseMetricLossFunction):
    """Instance Cross Entropy (Wang et al., arXiv 1911.09976).

    For an anchor ``i``, a positive ``j`` and the anchor's negatives ``N(i)``, with
    logits ``Z = scale * S`` (``-scale * d`` for a distance that is not a similarity):

        l_ij = -log( exp(Z_ij) / (exp(Z_ij) + sum_{k in N(i)} exp(Z_ik)) )
             = softplus( logsumexp_{k in N(i)} Z_ik - Z_ij )

    Returns one ``"pos_pair"`` sub-loss, so every PML reducer applies; the default
    reducer is :class:`~pml_ice.reducers.ICEReweightReducer` (ICE's sample reweighting).
    Anchors without a negative carry no information and are left out; a mined pair
    listed twice counts once.

    - Self-pairs ``(i, i)`` are removed only without ``ref_emb`` (the batch is its own
      reference set); a given ``ref_emb``, even the embeddings tensor itself, is a
      separate set and keeps them.
    - The reduced loss has the embeddings' dtype on every path; logits, log-sum-exp,
      per-pair losses and gradients are computed in at least float32.
    - With ``reducer=MeanReducer()`` it equals PML's ``NTXentLoss(temperature=1/scale)``
      exactly when no pair is listed twice and every anchor of a positive pair has a
      negative: always with labels within the batch, not in general for triplet miners
      (NTXent counts a repeated pair each time) or ``PairMarginMiner`` (NTXent keeps a
      positive whose anchor has no mined negative as a zero term of its mean).
    - It is twice differentiable: under ``create_graph=True`` backward builds the
      gradient from ordinary autograd operations (holding the logits whole); and
      ``torch.func.grad``, ``vjp`` and ``jacrev`` apply (not ``vmap`` or forward mode).

    Args:
        scale: the inverse temperature ``s > 0``. Where the default comes from, with
            the default reducer's ``lam``: the documentation's "Tuning" page, "The
            defaults".
        memory_efficient: ``None`` (default) holds the ``anchors x references`` logits
            whole up to the device's dense limit (a GPU's is larger than a CPU's) and
            above it recomputes them in backward, so that memory stays linear in the
            batch: in square tiles of the symmetric logits for labels within the batch
            with a cosine or dot-product similarity on a GPU outside half precision, in
            chunks of anchor rows otherwise. ``True`` always recomputes, ``False`` never.
        chunk_size: anchor rows per chunk, and rows per tile side, when the logits are
            recomputed (default: sized to the device). :meth:`computation_plan` tells the
            path and sizes of given inputs; the limits live in ``pml_ice/losses/_ice/plan.py``.
    """

    def __init__(self, scale=6.69, memory_efficient=None, chunk_size=None, **kwargs):
        super().__init__(**kwargs)
        check_positive_real("ICELoss", "scale", scale, strictly=True)
        if memory_efficient not in (None, True, False):
            raise ValueError(
                f"ICELoss: memory_efficient must be None, True or False, got {memory_efficient!r}"
            )
        if chunk_size is not None:
            check_positive_integer("ICELoss", "chunk_size", chunk_size)
        self.scale = float(scale)
        self.memory_efficient = memory_efficient
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.add_to_recordable_attributes(list_of_names=["scale"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["num_pos_pairs", "num_neg_pairs", "mean_pos_match_prob"],
            is_stat=True,
        )

    def forward(
        self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None
    ):
        check_loss_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if ref_emb is embeddings:
            # a given reference set is a set of its own, even the batch's own tensor:
            # only ref_emb=None (which PML turns into the batch itself) drops (i, i)
            ref_emb = ref_emb.view_as(ref_emb)
        loss = super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        # DoNothingReducer hands back the loss dict, per-pair losses in at least float32
        return loss.to(embeddings.dtype) if torch.is_tensor(loss) else loss

    def computation_plan(
        self, num_embeddings, num_ref_emb=None, mined_pairs=False, device="cpu", dtype=torch.float32
    ):
        """The path ``forward`` takes, and its sizes, for ``num_embeddings`` embeddings
        against a ``ref_emb`` of ``num_ref_emb`` (None: no ``ref_emb``, the batch is its own
        reference set), pairs from an ``indices_tuple`` (``mined_pairs=True``) or from
        labels, on ``device``, with the similarity product in ``dtype`` (the embeddings',
        or autocast's). Returns a ``ComputationPlan``: ``path`` (``"label_mask"``,
        ``"pair_lists_whole"``, ``"pair_lists_in_chunks"`` or ``"symmetric_tiles"``),
        ``chunk_rows``, ``tile_rows`` (None where the path has none) and
        ``peak_logits``, the logits it holds at once at its forward's peak."""
        return plan_computation(
            num_embeddings,
            num_embeddings if num_ref_emb is None else num_ref_emb,
            device,
            dtype,
            mined_pairs=mined_pairs,
            refs_are_batch=num_ref_emb is None,
            inner_product=is_inner_product(self.distance),
            memory_efficient=self.memory_efficient,
            chunk_size=self.chunk_size,
        )

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        queries, refs, kernel = logits_kernel(self.distance, self.scale, embeddings, ref_emb)
        ref_is_batch = ref_emb is embeddings
        plan = self.computation_plan(
            len(embeddings), None if ref_is_batch else len(ref_emb), indices_tuple is not None,
            queries.device, queries.dtype,
        )
        if plan.path is ComputationPath.LABEL_MASK:
            losses, indices = self.losses_from_label_mask(
                queries, refs, kernel, labels, ref_labels, ref_is_batch
            )
        elif plan.path is ComputationPath.SYMMETRIC_TILES:
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
        """The ``label_mask`` path: negatives by comparing labels (in their common dtype,
        so distinct labels never wrap onto each other)."""
        same_label = labels[:, None] == ref_labels[None, :]
        positives = label_positives(same_label, ref_is_batch)
        if self.collect_stats:
            has_positive = torch.zeros_like(labels, dtype=torch.bool)
            has_positive[positives[0]] = True
            self.num_neg_pairs = int((~same_label[has_positive]).sum())
        if len(positives[0]) == 0:
            return None, None
        negative_mask = partial(torch.ne, labels[:, None], ref_labels[None, :])
        losses = ICELabelLosses.apply(queries, refs, kernel, same_label, positives, negative_mask)[0]
        return losses, positives

    def losses_from_symmetric_tiles(self, queries, kernel, labels, plan):
        """The ``symmetric_tiles`` path, for labels within the batch: ``Z`` is symmetric,
        so square tiles serve two blocks of rows each (two matrix products in all)."""
        pairs = pairs_from_labels(labels, labels, ref_is_batch=True)
        positives = pairs.positives
        if self.collect_stats:
            has_positive = positives.counts() > 0
            self.num_neg_pairs = int(pairs.num_negatives[has_positive].sum())
        if len(positives.anchors) == 0:
            return None, None
        indices = (positives.anchors, positives.refs)
        losses = ICESymmetricTiles.apply(queries, kernel, labels, indices, plan.tile_rows)[0]
        return losses, indices

    def losses_from_pair_lists(
        self, queries, refs, kernel, plan, labels, indices_tuple, ref_labels, ref_is_batch
    ):
        """The ``pair_lists_whole`` and ``pair_lists_in_chunks`` paths: sorted pair lists
        (a miner's, or labels'); only the rows of anchors that have a negative are computed."""
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
        chunked_pairs = ChunkedICEPairs(pairs, len(queries), len(refs))
        holds_whole = plan.path is ComputationPath.PAIR_LISTS_WHOLE
        losses = ICEPairLosses.apply(
            queries, refs, kernel, chunked_pairs, plan.chunk_rows, holds_whole
        )[0]
        return losses, (anchors[pairs.positives.anchors], pairs.positives.refs)

    def get_default_reducer(self):
        return ICEReweightReducer()

    def get_default_distance(self):
        return CosineSimilarity()
