"""ICELoss against the float64 reference: labels, ref_emb, miners, indices_tuple
without labels, both normalisations, several lam/scale, every distance; gradients
with the weights held constant; NTXentLoss equivalence; collect_stats; degenerate
batches."""

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_ice import losses, reducers
from pml_ice.losses._ice import plan
from pml_ice.losses._ice.label_mask_losses import ICELabelLosses
from reference import (
    COSINE,
    DistanceSpec,
    ice_pair_losses,
    ice_reference,
    pairs_from_labels,
)

SCALE_AND_LAM = [(1.0, 0.0), (16.0, 1.0), (64.0, 4.0)]
NORMALIZATIONS = ["batch", "anchor"]

MINERS = {
    "multi_similarity": lambda: miners.MultiSimilarityMiner(epsilon=0.1),
    "pair_margin": lambda: miners.PairMarginMiner(pos_margin=0.2, neg_margin=1.4),
    "triplet_margin": lambda: miners.TripletMarginMiner(
        margin=0.2, type_of_triplets="all"
    ),
    "batch_hard": lambda: miners.BatchHardMiner(),
}


def make_ice(scale, lam, normalize, distance=None, **kwargs):
    return losses.ICELoss(
        scale=scale,
        reducer=reducers.ICEReweightReducer(lam=lam, normalize=normalize),
        distance=distance,
        **kwargs,
    )


def to_cpu(x):
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return tuple(t.cpu() for t in x)
    return x.detach().cpu()


def check_against_reference(
    agreement,
    loss_func,
    category,
    embeddings,
    labels=None,
    indices_tuple=None,
    ref_emb=None,
    ref_labels=None,
    *,
    scale,
    lam,
    normalize,
    distance=COSINE,
    float32_rtol=1e-4,
):
    """Loss and gradients (embeddings and ref_emb) of loss_func in float64 and in
    float32 against the reference; returns the float64 loss."""
    reference_inputs = [embeddings.detach().cpu().double().requires_grad_()]
    if ref_emb is not None:
        reference_inputs.append(ref_emb.detach().cpu().double().requires_grad_())
    expected = ice_reference(
        reference_inputs[0],
        to_cpu(labels),
        to_cpu(indices_tuple),
        reference_inputs[1] if ref_emb is not None else None,
        to_cpu(ref_labels),
        scale=scale,
        lam=lam,
        normalize=normalize,
        distance=distance,
    )
    expected.backward()
    expected_grads = [t.grad for t in reference_inputs]

    for dtype, loss_rtol, grad_rtol in (
        (torch.float64, 1e-9, 1e-8),
        (torch.float32, float32_rtol, 10 * float32_rtol),
    ):
        inputs = [embeddings.detach().to(dtype).requires_grad_()]
        if ref_emb is not None:
            inputs.append(ref_emb.detach().to(dtype).requires_grad_())
        actual = loss_func(
            inputs[0],
            labels,
            indices_tuple,
            inputs[1] if ref_emb is not None else None,
            ref_labels,
        )
        actual.backward()
        name = str(dtype).replace("torch.", "")
        agreement.check(f"{category} loss {name}", actual, expected, loss_rtol)
        for which, tensor, expected_grad in zip(
            ("embeddings", "ref_emb"), inputs, expected_grads
        ):
            agreement.check(
                f"{category} grad {which} {name}", tensor.grad, expected_grad, grad_rtol
            )
    return expected


def test_reference_matches_hand_computed_labels_case():
    """Three 2-D points, cosine, s = 1, lam = 1, batch normalisation, by hand.

    x0 = (1, 0), x1 = (0, 1), x2 = (-1, 0); labels 0, 0, 1.
    S01 = 0, S02 = -1, S12 = 0. Anchor 2 has no positive.
    l01 = log(1 + e^(S02 - S01)) = log(1 + e^-1);  l10 = log(1 + e^(S12 - S10)) = log 2.
    """
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    l01, l10 = math.log(1 + math.exp(-1)), math.log(2)
    w01, w10 = math.exp(1 - math.exp(-l01)), math.exp(1 - math.exp(-l10))
    expected = (w01 * l01 + w10 * l10) / (w01 + w10)

    pair_losses = ice_pair_losses(embeddings, labels, scale=1.0)
    assert set(pair_losses) == {(0, 1), (1, 0)}
    assert pair_losses[(0, 1)].item() == pytest.approx(l01, rel=1e-12)
    assert pair_losses[(1, 0)].item() == pytest.approx(l10, rel=1e-12)
    loss = ice_reference(embeddings, labels, scale=1.0, lam=1.0, normalize="batch")
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    unweighted = ice_reference(embeddings, labels, scale=1.0, lam=0.0)
    assert unweighted.item() == pytest.approx((l01 + l10) / 2, rel=1e-12)


def test_reference_matches_hand_computed_indices_case():
    """Four 2-D points, Euclidean distance, s = 2, pairs given as an indices_tuple
    with a duplicated positive pair and an anchor (2) that has no negative.

    x0 = (0, 0), x1 = (1, 0), x2 = (0, 2), x3 = (3, 0).
    Positives (0,1) (0,2) (0,1) (1,3) (2,0); negatives (0,3) (1,2).
    d01 = 1, d02 = 2, d03 = 3, d13 = 2, d12 = sqrt(5); Z = -2 d.
    l01 = log(1 + e^(-6 + 2)), l02 = log(1 + e^(-6 + 4)), l13 = log(1 + e^(-2 sqrt5 + 4)).
    """
    embeddings = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    indices_tuple = (
        torch.tensor([0, 0, 0, 1, 2]),
        torch.tensor([1, 2, 1, 3, 0]),
        torch.tensor([0, 1]),
        torch.tensor([3, 2]),
    )
    euclidean = DistanceSpec("lp", normalize=False)
    l01 = math.log(1 + math.exp(-4))
    l02 = math.log(1 + math.exp(-2))
    l13 = math.log(1 + math.exp(4 - 2 * math.sqrt(5)))

    pair_losses = ice_pair_losses(
        embeddings, indices_tuple=indices_tuple, scale=2.0, distance=euclidean
    )
    assert set(pair_losses) == {(0, 1), (0, 2), (1, 3)}
    for key, value in ((0, 1), l01), ((0, 2), l02), ((1, 3), l13):
        assert pair_losses[key].item() == pytest.approx(value, rel=1e-12)

    def reference(lam, normalize):
        return ice_reference(
            embeddings,
            indices_tuple=indices_tuple,
            scale=2.0,
            lam=lam,
            normalize=normalize,
            distance=euclidean,
        ).item()

    assert reference(0.0, "anchor") == pytest.approx(
        ((l01 + l02) / 2 + l13) / 2, rel=1e-12
    )
    assert reference(0.0, "batch") == pytest.approx((l01 + l02 + l13) / 3, rel=1e-12)
    w = {k: math.exp(0.5 * (1 - math.exp(-v))) for k, v in (("01", l01), ("02", l02), ("13", l13))}
    anchor0 = (w["01"] * l01 + w["02"] * l02) / (w["01"] + w["02"])
    assert reference(0.5, "anchor") == pytest.approx((anchor0 + l13) / 2, rel=1e-12)


def test_reference_pair_sets_exclude_self_only_without_ref():
    labels = torch.tensor([0, 0, 1])
    positives, negatives = pairs_from_labels(labels)
    assert positives == {0: {1}, 1: {0}}
    assert negatives == {0: {2}, 1: {2}, 2: {0, 1}}
    positives, negatives = pairs_from_labels(labels, ref_labels=labels)
    assert positives == {0: {0, 1}, 1: {0, 1}, 2: {2}}


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_reference_agrees_with_pml_ntxent(make_batch, scale):
    """An independent check of the reference: lam = 0 is PML's NTXentLoss."""
    embeddings, labels = make_batch(n=10, n_classes=3, dtype=torch.float64)
    ntxent = pml_losses.NTXentLoss(temperature=1 / scale)(embeddings.cpu(), labels.cpu())
    reference = ice_reference(embeddings.cpu(), labels.cpu(), scale=scale, lam=0.0)
    assert reference.item() == pytest.approx(ntxent.item(), rel=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("scale,lam", SCALE_AND_LAM)
def test_labels_match_reference(
    agreement, make_batch, distance_case, seed, normalize, scale, lam
):
    spec, make_distance = distance_case
    embeddings, labels = make_batch(n=12, n_classes=4, seed=seed)
    loss_func = make_ice(scale, lam, normalize, make_distance())
    check_against_reference(
        agreement,
        loss_func,
        "labels",
        embeddings,
        labels,
        scale=scale,
        lam=lam,
        normalize=normalize,
        distance=spec,
    )


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_ref_emb_match_reference(agreement, make_batch, distance_case, normalize):
    spec, make_distance = distance_case
    embeddings, labels = make_batch(n=8, n_classes=3, seed=3)
    ref_emb, ref_labels = make_batch(n=14, n_classes=4, seed=4)
    loss_func = make_ice(16.0, 1.0, normalize, make_distance())
    check_against_reference(
        agreement,
        loss_func,
        "ref_emb",
        embeddings,
        labels,
        None,
        ref_emb,
        ref_labels,
        scale=16.0,
        lam=1.0,
        normalize=normalize,
        distance=spec,
    )


def mine(miner_name, embeddings, labels, ref_emb=None, ref_labels=None):
    indices_tuple = MINERS[miner_name]()(embeddings, labels, ref_emb, ref_labels)
    assert len(indices_tuple[0]) > 0, "the miner found nothing: the test is void"
    return indices_tuple


@pytest.mark.parametrize("pass_labels", [True, False])
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("miner_name", sorted(MINERS))
def test_miner_indices_match_reference(
    agreement, make_batch, miner_name, normalize, pass_labels
):
    embeddings, labels = make_batch(n=12, n_classes=3, seed=5)
    indices_tuple = mine(miner_name, embeddings, labels)
    loss_func = make_ice(16.0, 2.0, normalize)
    check_against_reference(
        agreement,
        loss_func,
        f"miner {len(indices_tuple)}-tuple",
        embeddings,
        labels if pass_labels else None,
        indices_tuple,
        scale=16.0,
        lam=2.0,
        normalize=normalize,
    )


@pytest.mark.parametrize("pass_labels", [True, False])
@pytest.mark.parametrize("miner_name", sorted(MINERS))
def test_miner_with_ref_emb_matches_reference(
    agreement, make_batch, miner_name, pass_labels
):
    """Without labels, ref_emb needs no ref_labels: the pairs are the mined ones."""
    embeddings, labels = make_batch(n=8, n_classes=3, seed=6)
    ref_emb, ref_labels = make_batch(n=13, n_classes=3, seed=7)
    indices_tuple = mine(miner_name, embeddings, labels, ref_emb, ref_labels)
    loss_func = make_ice(16.0, 1.0, "batch")
    check_against_reference(
        agreement,
        loss_func,
        "miner+ref_emb",
        embeddings,
        labels if pass_labels else None,
        indices_tuple,
        ref_emb,
        ref_labels if pass_labels else None,
        scale=16.0,
        lam=1.0,
        normalize="batch",
    )


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_duplicated_pairs_count_once(agreement, make_batch, device, normalize):
    """Pairs repeated in the indices_tuple give the same loss as the unique pairs."""
    embeddings, labels = make_batch(n=10, n_classes=3, seed=8)
    a1, p, a2, n = miners.MultiSimilarityMiner(epsilon=0.1)(embeddings, labels)
    duplicated = tuple(torch.cat([t, t.flip(0)[:5]]) for t in (a1, p, a2, n))
    loss_func = make_ice(16.0, 1.0, normalize)
    once = loss_func(embeddings, None, (a1, p, a2, n))
    repeated = loss_func(embeddings, None, duplicated)
    agreement.check("duplicated pairs loss float32", repeated, once, 1e-6)
    check_against_reference(
        agreement,
        loss_func,
        "duplicated pairs",
        embeddings,
        None,
        duplicated,
        scale=16.0,
        lam=1.0,
        normalize=normalize,
    )


def test_anchor_without_negative_is_dropped(agreement, device):
    """Anchor 2's positive pair (2, 0) has no negative, so it is not a pair of the
    loss: the result is the loss of the other pairs alone."""
    embeddings = torch.randn(5, 4, device=device, dtype=torch.float64)
    with_orphan = (
        torch.tensor([0, 1, 2], device=device),
        torch.tensor([1, 0, 0], device=device),
        torch.tensor([0, 1], device=device),
        torch.tensor([3, 4], device=device),
    )
    without_orphan = tuple(t[:2] for t in with_orphan[:2]) + with_orphan[2:]
    loss_func = make_ice(8.0, 1.0, "anchor")
    agreement.check(
        "orphan anchor loss float64",
        loss_func(embeddings, None, with_orphan),
        loss_func(embeddings, None, without_orphan),
        1e-12,
    )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scale", [1.0, 14.0, 50.0])
def test_mean_reducer_equals_ntxent(agreement, make_batch, seed, scale):
    embeddings, labels = make_batch(n=12, n_classes=4, seed=seed, dtype=torch.float64)
    ice_input = embeddings.clone().requires_grad_()
    ntxent_input = embeddings.clone().requires_grad_()
    ice = losses.ICELoss(scale=scale, reducer=reducers.MeanReducer())(ice_input, labels)
    ntxent = pml_losses.NTXentLoss(temperature=1 / scale)(ntxent_input, labels)
    ice.backward()
    ntxent.backward()
    agreement.check("NTXent equivalence loss float64", ice, ntxent, 1e-9)
    agreement.check(
        "NTXent equivalence grad float64", ice_input.grad, ntxent_input.grad, 1e-8
    )


def test_default_reducer_is_ice_reweighting(agreement, make_batch):
    loss_func = losses.ICELoss(scale=16.0)
    reducer = loss_func.reducer
    assert isinstance(reducer, reducers.ICEReweightReducer)
    assert reducer.lam >= 0
    embeddings, labels = make_batch(n=12, n_classes=4, seed=9)
    check_against_reference(
        agreement,
        loss_func,
        "default reducer",
        embeddings,
        labels,
        scale=16.0,
        lam=reducer.lam,
        normalize=reducer.normalize,
    )


def test_is_a_pml_loss_with_cosine_default():
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.losses import BaseMetricLossFunction

    loss_func = losses.ICELoss()
    assert isinstance(loss_func, BaseMetricLossFunction)
    assert type(loss_func.distance) is CosineSimilarity


def test_pos_pair_sub_loss(make_batch, pair_losses_of):
    """One "pos_pair" sub-loss whose indices are (anchor, positive) and whose values
    are the reference's per-pair losses."""
    embeddings, labels = make_batch(n=9, n_classes=3, seed=10, dtype=torch.float64)
    ref_emb, ref_labels = make_batch(n=11, n_classes=3, seed=11, dtype=torch.float64)
    loss_dict = losses.ICELoss(scale=10.0, reducer=reducers.DoNothingReducer())(
        embeddings, labels, ref_emb=ref_emb, ref_labels=ref_labels
    )
    assert list(loss_dict) == ["loss"]
    actual = pair_losses_of(loss_dict)
    expected = ice_pair_losses(
        embeddings.cpu(), labels.cpu(), None, ref_emb.cpu(), ref_labels.cpu(), 10.0
    )
    assert set(actual) == set(expected)
    for key in expected:
        assert actual[key].item() == pytest.approx(expected[key].item(), rel=1e-10)


@pytest.mark.parametrize("use_miner", [False, True])
def test_collect_stats(make_batch, use_miner):
    """Every anchor has positives and negatives, so the counts are unambiguous."""
    embeddings, labels = make_batch(n=12, n_classes=4, seed=12, dtype=torch.float64)
    indices_tuple = None
    if use_miner:
        indices_tuple = miners.MultiSimilarityMiner(epsilon=0.1)(embeddings, labels)
        positives = {(a, p) for a, p in zip(*(t.tolist() for t in indices_tuple[:2]))}
        negatives = {(a, n) for a, n in zip(*(t.tolist() for t in indices_tuple[2:]))}
        anchors_with_negative = {a for a, _ in negatives}
        positives = {(a, p) for a, p in positives if a in anchors_with_negative}
    else:
        positives, negatives = set(), set()
        for i in range(12):
            for j in range(12):
                if i != j:
                    (positives if labels[i] == labels[j] else negatives).add((i, j))
    loss_func = losses.ICELoss(scale=16.0, collect_stats=True)
    loss_func(embeddings, labels, indices_tuple)
    pair_losses = ice_pair_losses(embeddings.cpu(), labels.cpu(), to_cpu(indices_tuple), scale=16.0)
    assert set(pair_losses) == positives
    expected_prob = sum(math.exp(-float(v)) for v in pair_losses.values()) / len(pair_losses)
    negatives_of_loss_anchors = {(a, n) for a, n in negatives if a in dict(positives)}
    assert loss_func.num_pos_pairs == len(positives)
    assert loss_func.num_neg_pairs in (len(negatives), len(negatives_of_loss_anchors))
    assert float(loss_func.mean_pos_match_prob) == pytest.approx(expected_prob, rel=1e-6)


DEGENERATE_BATCHES = {
    "one_class": torch.zeros(6, dtype=torch.long),
    "all_singletons": torch.arange(6),
    "one_sample": torch.tensor([3]),
}


@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("batch_name", sorted(DEGENERATE_BATCHES))
def test_degenerate_batch_gives_zero_loss_with_backward(
    device, batch_name, normalize, memory_efficient
):
    labels = DEGENERATE_BATCHES[batch_name].to(device)
    embeddings = torch.randn(len(labels), 8, device=device, requires_grad=True)
    loss_func = make_ice(16.0, 1.0, normalize, memory_efficient=memory_efficient)
    loss = loss_func(embeddings, labels)
    assert loss.item() == 0
    assert loss.requires_grad
    loss.backward()
    assert embeddings.grad is not None
    assert torch.all(embeddings.grad == 0)


def test_empty_indices_tuple_gives_zero_loss(device):
    embeddings = torch.randn(5, 8, device=device, requires_grad=True)
    empty = torch.tensor([], dtype=torch.long, device=device)
    loss = losses.ICELoss()(embeddings, None, (empty, empty, empty, empty))
    assert loss.item() == 0
    loss.backward()
    assert torch.all(embeddings.grad == 0)


@pytest.mark.parametrize("case", ["labels", "ref_emb", "miner"])
def test_gpu_backward_form_runs_and_matches_on_cpu(agreement, make_batch, monkeypatch, case):
    """The backward GPUs use (positives in the dense gradient, ``(G + G^T) Q`` when the
    references are the batch), forced on the CPU so that CI checks it too."""
    monkeypatch.setattr(plan, "sparse_positives_pay_off", lambda device: False)
    embeddings, labels = make_batch(n=12, n_classes=4, seed=9)
    ref_emb, ref_labels = make_batch(n=10, n_classes=4, seed=10) if case == "ref_emb" else (None, None)
    indices_tuple = mine("multi_similarity", embeddings, labels) if case == "miner" else None
    check_against_reference(
        agreement, make_ice(16.0, 1.0, "batch"), f"gpu backward form {case}", embeddings, labels,
        indices_tuple, ref_emb, ref_labels, scale=16.0, lam=1.0, normalize="batch",
    )


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["dense", "chunked"])
@pytest.mark.parametrize(
    "labels, ref_labels",
    [
        (torch.arange(16) // 4 + 256, torch.tensor([0, 1, 2, 3, 0, 1], dtype=torch.uint8)),
        (torch.arange(16) // 4 + 0.5, torch.tensor([0, 1, 2, 3, 0, 1])),
    ],
    ids=["wider-than-uint8", "float-vs-long"],
)
def test_labels_are_compared_in_their_common_dtype(device, memory_efficient, labels, ref_labels):
    """Distinct labels must not wrap onto each other: no positive pair here, so zero,
    as PML's NTXentLoss says."""
    x, ref = torch.randn(16, 8), torch.randn(6, 8)
    args = (x.to(device), labels.to(device))
    kwargs = dict(ref_emb=ref.to(device), ref_labels=ref_labels.to(device))
    ice = losses.ICELoss(reducer=reducers.MeanReducer(), memory_efficient=memory_efficient)
    assert ice(*args, **kwargs).item() == 0.0
    assert pml_losses.NTXentLoss()(*args, **kwargs).item() == 0.0


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["dense", "chunked"])
def test_bool_labels_are_two_classes(make_batch, memory_efficient):
    embeddings, labels = make_batch(n=10, n_classes=2, seed=3, dtype=torch.float64)
    loss_func = losses.ICELoss(memory_efficient=memory_efficient)
    assert loss_func(embeddings, labels.bool()).item() == pytest.approx(
        loss_func(embeddings, labels).item(), rel=1e-12
    )


def test_dense_path_skips_the_logits_when_no_anchor_has_a_negative(monkeypatch):
    def fail(*args):
        raise AssertionError("logits computed for a batch without negatives")

    monkeypatch.setattr(ICELabelLosses, "apply", fail)
    embeddings = torch.randn(64, 4, requires_grad=True)
    value = losses.ICELoss()(embeddings, torch.full((64,), 3))
    value.backward()
    assert value.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reducer", ["mean", "ice"])
@pytest.mark.parametrize(
    "labels", [torch.arange(32) % 4, torch.arange(32)], ids=["pairs", "zero_loss"]
)
def test_loss_has_the_embeddings_dtype_on_every_path(device, dtype, reducer, labels):
    """Rule: the loss comes back in the embeddings' dtype, also when there is no pair
    (PML's zero loss); inside, everything is at least float32."""
    x = torch.randn(32, 8, device=device, dtype=dtype, requires_grad=True)
    reducer = reducers.MeanReducer() if reducer == "mean" else reducers.ICEReweightReducer()
    value = losses.ICELoss(scale=16.0, reducer=reducer)(x, labels.to(device))
    assert value.dtype == dtype
    value.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def test_self_pairs_are_removed_only_without_ref_emb(agreement, make_batch):
    """Rule: only the batch as its own reference set (no ref_emb) drops (i, i); a given
    ref_emb is a separate set, whatever tensor or labels object it is."""
    embeddings, labels = make_batch(n=12, n_classes=4, seed=2, dtype=torch.float64)
    loss_func = losses.ICELoss(scale=16.0, reducer=reducers.MeanReducer())
    with_self = ice_reference(
        embeddings.cpu(), labels.cpu(), ref_emb=embeddings.cpu(), ref_labels=labels.cpu(),
        scale=16.0,
    )
    without_self = ice_reference(embeddings.cpu(), labels.cpu(), scale=16.0)
    assert with_self.item() != pytest.approx(without_self.item(), rel=1e-3)
    same_tensor = loss_func(embeddings, labels, ref_emb=embeddings, ref_labels=labels.clone())
    cloned = loss_func(embeddings, labels, ref_emb=embeddings.clone(), ref_labels=labels)
    agreement.check("self pairs ref_emb=embeddings float64", same_tensor, with_self, 1e-12)
    agreement.check("self pairs ref_emb=clone float64", cloned, with_self, 1e-12)
    no_ref = loss_func(embeddings, labels)
    agreement.check("self pairs no ref_emb float64", no_ref, without_self, 1e-12)


def test_two_views_sharing_one_labels_tensor_keep_their_cross_view_positives(
    agreement, make_batch, pair_losses_of
):
    """ref_labels is labels (SelfSupervisedLoss's call): (i, i) across the views is the
    positive that matters and must stay."""
    view1, labels = make_batch(n=8, n_classes=8, seed=4, dtype=torch.float64)
    view2 = view1 + 0.1 * torch.randn_like(view1)
    loss_func = losses.ICELoss(scale=16.0, reducer=reducers.DoNothingReducer())
    pairs = pair_losses_of(
        loss_func.compute_loss(view1, labels, None, view2, labels)
    )
    assert set(pairs) == {(i, i) for i in range(8)}
    value = losses.ICELoss(scale=16.0, reducer=reducers.MeanReducer())(
        view1, labels, ref_emb=view2, ref_labels=labels
    )
    expected = ice_reference(
        view1.cpu(), labels.cpu(), ref_emb=view2.cpu(), ref_labels=labels.cpu(), scale=16.0
    )
    agreement.check("two views loss float64", value, expected, 1e-12)


def ntxent_equality_batch():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(32, 8, generator=generator, dtype=torch.float64)
    return embeddings, torch.randint(0, 4, (32,), generator=generator)


def pairs_as_ice_counts_them(indices_tuple, labels):
    """The pairs ICE uses: each pair once, positives of anchors without a negative left out."""
    a1, p, a2, n = lmu.convert_to_pairs(indices_tuple, labels)
    positives = torch.unique(torch.stack([a1, p], dim=1), dim=0)
    negatives = torch.unique(torch.stack([a2, n], dim=1), dim=0)
    has_negative = torch.isin(positives[:, 0], negatives[:, 0])
    positives = positives[has_negative]
    return positives[:, 0], positives[:, 1], negatives[:, 0], negatives[:, 1]


@pytest.mark.parametrize(
    "miner",
    [miners.BatchEasyHardMiner(), miners.MultiSimilarityMiner(0.1)],
    ids=["batch_easy_hard", "multi_similarity"],
)
def test_mean_reducer_equals_ntxent_on_duplicate_free_pairs(agreement, miner):
    embeddings, labels = ntxent_equality_batch()
    pairs = pairs_as_ice_counts_them(miner(embeddings, labels), labels)
    assert len(pairs[0]) > 0
    ice = losses.ICELoss(scale=8.0, reducer=reducers.MeanReducer())(embeddings, labels, pairs)
    ntxent = pml_losses.NTXentLoss(temperature=1 / 8.0)(embeddings, labels, pairs)
    agreement.check("NTXent equivalence mined pairs float64", ice, ntxent, 1e-9)


@pytest.mark.parametrize(
    "miner",
    [miners.TripletMarginMiner(0.2), miners.PairMarginMiner(0.2, 0.8)],
    ids=["triplet_margin", "pair_margin"],
)
def test_mean_reducer_differs_from_ntxent_as_explained(agreement, miner):
    """Triplets repeat pairs, which NTXent counts each time; PairMarginMiner leaves some
    positives' anchors without a negative, which NTXent keeps as zero terms. NTXent on
    the pairs as ICE counts them (once each, such positives left out) is ICE again."""
    embeddings, labels = ntxent_equality_batch()
    mined = miner(embeddings, labels)
    ice = losses.ICELoss(scale=8.0, reducer=reducers.MeanReducer())(embeddings, labels, mined)
    ntxent = pml_losses.NTXentLoss(temperature=1 / 8.0)
    assert ice.item() != pytest.approx(ntxent(embeddings, labels, mined).item(), rel=1e-2)
    as_ice_counts = ntxent(embeddings, labels, pairs_as_ice_counts_them(mined, labels))
    agreement.check("NTXent on pairs as ICE counts them float64", ice, as_ice_counts, 1e-9)
