"""Every PML reducer on ICE's "pos_pair" output, and ICEReweightReducer on its own:
element losses, other losses' per-pair -log p, embedding regularisation."""

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.regularizers import LpRegularizer

from pml_ice import losses, reducers
from reference import ice_pair_losses, ice_reference, reduce_pair_losses

SCALE = 12.0


@pytest.fixture
def batch(make_batch, device):
    """Ten samples in three classes plus a singleton class (an anchor without a
    positive, which PerAnchorReducer averages as a zero)."""
    embeddings, labels = make_batch(n=10, n_classes=3, seed=21, dtype=torch.float64)
    labels = torch.cat([labels, torch.tensor([7], device=device)])
    extra = torch.randn(1, embeddings.shape[1], dtype=torch.float64, device=device)
    return torch.cat([embeddings, extra]), labels


def reference_pair_losses(embeddings, labels):
    losses_by_pair = ice_pair_losses(embeddings.cpu(), labels.cpu(), scale=SCALE)
    return {key: value.item() for key, value in losses_by_pair.items()}


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def per_anchor_mean(pair_losses, n):
    total = 0.0
    for anchor in range(n):
        anchor_losses = [v for (i, _), v in pair_losses.items() if i == anchor]
        total += mean(anchor_losses) if anchor_losses else 0.0
    return total / n


CLASS_WEIGHTS = torch.tensor([0.5, 2.0, 1.5, 1.0, 1.0, 1.0, 1.0, 3.0], dtype=torch.float64)


def thresholds(sorted_values):
    """Low and high thresholds halfway between losses, so that rounding cannot move
    a loss across them."""
    q1, q3 = len(sorted_values) // 4, 3 * len(sorted_values) // 4
    low = (sorted_values[q1] + sorted_values[q1 + 1]) / 2
    high = (sorted_values[q3] + sorted_values[q3 + 1]) / 2
    return low, high


def expected_value(reducer_name, pair_losses, labels):
    values = sorted(pair_losses.values())
    low, high = thresholds(values)
    return {
        "mean": mean(values),
        "sum": sum(values),
        "avg_non_zero": mean(v for v in values if v > 0),
        "threshold": mean(v for v in values if low < v < high),
        "class_weighted": mean(
            v * CLASS_WEIGHTS[int(labels[i])].item() for (i, _), v in pair_losses.items()
        ),
        "per_anchor": per_anchor_mean(pair_losses, len(labels)),
        "multiple": sum(values),
    }[reducer_name]


def make_reducer(reducer_name, pair_losses):
    values = sorted(pair_losses.values())
    low, high = thresholds(values)
    return {
        "mean": lambda: reducers.MeanReducer(),
        "sum": lambda: reducers.SumReducer(),
        "avg_non_zero": lambda: reducers.AvgNonZeroReducer(),
        "threshold": lambda: reducers.ThresholdReducer(low=low, high=high),
        "class_weighted": lambda: reducers.ClassWeightedReducer(weights=CLASS_WEIGHTS),
        "per_anchor": lambda: reducers.PerAnchorReducer(),
        "multiple": lambda: reducers.MultipleReducers({"loss": reducers.SumReducer()}),
    }[reducer_name]()


@pytest.mark.parametrize(
    "reducer_name",
    ["mean", "sum", "avg_non_zero", "threshold", "class_weighted", "per_anchor", "multiple"],
)
def test_pml_reducer_gives_its_definition(agreement, batch, reducer_name):
    embeddings, labels = batch
    pair_losses = reference_pair_losses(embeddings, labels)
    reducer = make_reducer(reducer_name, pair_losses)
    inputs = embeddings.clone().requires_grad_()
    loss = losses.ICELoss(scale=SCALE, reducer=reducer)(inputs, labels)
    loss.backward()
    assert torch.isfinite(inputs.grad).all()
    expected = expected_value(reducer_name, pair_losses, labels)
    agreement.check("PML reducers loss float64", loss, torch.tensor(expected, dtype=torch.float64), 1e-9)


def test_do_nothing_reducer_returns_reference_pairs(batch, pair_losses_of):
    embeddings, labels = batch
    loss_dict = losses.ICELoss(scale=SCALE, reducer=reducers.DoNothingReducer())(
        embeddings, labels
    )
    actual = {k: v.item() for k, v in pair_losses_of(loss_dict).items()}
    expected = reference_pair_losses(embeddings, labels)
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-10)


def test_ice_reducer_is_exported_with_all_pml_reducers():
    import pytorch_metric_learning.reducers as pml_reducers

    for name in dir(pml_reducers):
        if name == "PerAnchorReducer":
            assert issubclass(reducers.PerAnchorReducer, pml_reducers.PerAnchorReducer)
        elif name.endswith("Reducer") or name == "MultipleReducers":
            assert getattr(reducers, name) is getattr(pml_reducers, name), name
    assert issubclass(reducers.ICEReweightReducer, pml_reducers.BaseReducer)


@pytest.mark.parametrize("normalize", ["batch", "anchor"])
@pytest.mark.parametrize("lam", [0.0, 0.7, 3.0])
def test_reweighting_on_element_losses(device, lam, normalize):
    """Element losses are per-sample -log p: each element is its own anchor, so the
    batch normalisation is sum w l / sum w and the anchor one is the plain mean."""
    element_losses = torch.rand(9, dtype=torch.float64, device=device) * 3
    embeddings = torch.randn(9, 4, device=device)
    loss_dict = {
        "loss": {
            "losses": element_losses,
            "indices": torch.arange(9, device=device),
            "reduction_type": "element",
        }
    }
    reducer = reducers.ICEReweightReducer(lam=lam, normalize=normalize)
    value = reducer(loss_dict, embeddings, torch.arange(9, device=device))
    if normalize == "anchor":
        expected = element_losses.mean().item()
    else:
        weights = [math.exp(lam * (1 - math.exp(-v))) for v in element_losses.tolist()]
        expected = sum(w * v for w, v in zip(weights, element_losses.tolist())) / sum(weights)
    assert value.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("normalize", ["batch", "anchor"])
def test_reweighting_of_ntxent_pairs_is_ice(agreement, make_batch, normalize):
    """NTXentLoss's per-pair terms are ICE's -log p_ij, so ICEReweightReducer turns
    NTXentLoss into reweighted ICE (every anchor here has a negative)."""
    embeddings, labels = make_batch(n=12, n_classes=4, seed=22, dtype=torch.float64)
    reducer = reducers.ICEReweightReducer(lam=2.0, normalize=normalize)
    value = pml_losses.NTXentLoss(temperature=1 / SCALE, reducer=reducer)(embeddings, labels)
    expected = ice_reference(
        embeddings.cpu(), labels.cpu(), scale=SCALE, lam=2.0, normalize=normalize
    )
    agreement.check("ICEReweightReducer on NTXent loss float64", value, expected, 1e-9)


@pytest.mark.parametrize("lam", [0.0, 1.5, 40.0])
def test_weights_are_exp_of_lam_times_one_minus_p(device, lam):
    """``weights`` is the formula, and the batch-normalised loss is its weighted mean."""
    pair_losses = torch.tensor([0.0, 0.3, 2.0, 30.0], dtype=torch.float64, device=device)
    reducer = reducers.ICEReweightReducer(lam=lam, normalize="batch")
    weights = reducer.weights(pair_losses)
    expected = [math.exp(lam * (1 - math.exp(-v))) for v in pair_losses.tolist()]
    assert weights.tolist() == pytest.approx(expected, rel=1e-14)
    total, count = reducer.reweighted_sums(pair_losses, torch.arange(4, device=device))
    assert (total / count).item() == pytest.approx(
        (weights * pair_losses).sum().item() / weights.sum().item(), rel=1e-13
    )


@pytest.mark.parametrize("normalize", ["batch", "anchor"])
def test_sums_of_shards_add_up(device, normalize):
    """Shards of one batch (anchors local to each), one of them empty: with the
    largest log weight made common by ``all_reduce_max``, their sums add up to the
    whole batch's loss; every shard calls it ("batch"), the empty one with -inf."""
    pair_losses = torch.tensor([0.1, 2.5, 0.7, 4.0, 0.2], dtype=torch.float64, device=device)
    anchors = torch.tensor([0, 0, 1, 2, 2], device=device)
    reducer = reducers.ICEReweightReducer(lam=3.0, normalize=normalize)
    shards = [slice(0, 2), slice(2, 2), slice(2, 5)]
    largest = max(reducer.log_weights(pair_losses[part]).max() for part in (shards[0], shards[2]))
    seen = []

    def all_reduce_max(tensor):
        seen.append(tensor.item())
        return tensor.copy_(torch.maximum(tensor, largest))

    sums = [
        reducer.reweighted_sums(pair_losses[part], anchors[part], all_reduce_max) for part in shards
    ]
    assert sums[1][0].item() == sums[1][1].item() == 0.0
    assert seen == ([seen[0], float("-inf"), seen[2]] if normalize == "batch" else [])
    whole = reducer.reweighted_sums(pair_losses, anchors)
    total, count = (sum(parts) for parts in zip(*sums))
    assert (total / count).item() == pytest.approx((whole[0] / whole[1]).item(), rel=1e-13)


@pytest.mark.parametrize("normalize", ["batch", "anchor"])
def test_weights_are_held_constant(make_batch, normalize):
    """The gradient of the reweighted loss is the weighted sum of the per-pair
    gradients: the weights themselves carry no gradient."""
    embeddings, labels = make_batch(n=10, n_classes=3, seed=23, dtype=torch.float64)
    inputs = embeddings.clone().requires_grad_()
    losses.ICELoss(scale=SCALE, reducer=reducers.ICEReweightReducer(lam=3.0, normalize=normalize))(
        inputs, labels
    ).backward()
    reference_inputs = embeddings.cpu().clone().requires_grad_()
    pair_losses = ice_pair_losses(reference_inputs, labels.cpu(), scale=SCALE)
    reduce_pair_losses(pair_losses, lam=3.0, normalize=normalize).backward()
    assert torch.allclose(inputs.grad.cpu(), reference_inputs.grad, rtol=1e-8, atol=1e-12)

    with_weight_gradient = embeddings.cpu().clone().requires_grad_()
    pair_losses = ice_pair_losses(with_weight_gradient, labels.cpu(), scale=SCALE)
    weights = {k: torch.exp(3.0 * (1 - torch.exp(-v))) for k, v in pair_losses.items()}
    total = sum(weights[k] * pair_losses[k] for k in pair_losses)
    (total / sum(weights.values())).backward()
    assert not torch.allclose(inputs.grad.cpu(), with_weight_gradient.grad, rtol=1e-3)


def test_embedding_regularizer_is_added(agreement, make_batch):
    embeddings, labels = make_batch(n=10, n_classes=3, seed=24, dtype=torch.float64)
    loss_func = losses.ICELoss(scale=SCALE, embedding_regularizer=LpRegularizer())
    value = loss_func(embeddings, labels)
    reducer = losses.ICELoss(scale=SCALE).reducer
    expected = ice_reference(
        embeddings.cpu(),
        labels.cpu(),
        scale=SCALE,
        lam=reducer.lam,
        normalize=reducer.normalize,
    ) + embeddings.cpu().norm(dim=1).mean()
    agreement.check("embedding regularizer loss float64", value, expected, 1e-9)


def test_per_anchor_reducer_with_a_reference_set_larger_than_the_batch(
    agreement, make_batch
):
    """PML's PerAnchorReducer sizes its matrix by the batch; ours by the references."""
    embeddings, labels = make_batch(n=6, n_classes=3, seed=4, dtype=torch.float64)
    ref_emb, ref_labels = make_batch(n=15, n_classes=3, seed=5, dtype=torch.float64)
    pair_losses = {
        key: value.item()
        for key, value in ice_pair_losses(
            embeddings.cpu(),
            labels.cpu(),
            ref_emb=ref_emb.cpu(),
            ref_labels=ref_labels.cpu(),
            scale=SCALE,
        ).items()
    }
    expected = per_anchor_mean(pair_losses, len(embeddings))
    loss_func = losses.ICELoss(scale=SCALE, reducer=reducers.PerAnchorReducer())
    loss = loss_func(embeddings, labels, ref_emb=ref_emb, ref_labels=ref_labels)
    agreement.check(
        "PerAnchorReducer with ref_emb float64",
        loss,
        torch.tensor(expected, dtype=torch.float64),
        1e-9,
    )


@pytest.mark.parametrize("normalize", ["batch", "anchor"])
def test_weight_statistics(device, normalize):
    """collect_stats records max w / mean w and (sum w)^2 / (n sum w^2) of the weights
    w = exp(lam (1 - exp(-l))), worked out by hand for three element losses."""
    element_losses = torch.tensor([0.0, math.log(2.0), 50.0], dtype=torch.float64, device=device)
    # p = 1, 1/2, ~0 -> with lam = ln 4: w = 1, 2, 4 (up to e^-50)
    loss_dict = {"loss": {"losses": element_losses, "indices": torch.zeros(3, dtype=torch.long, device=device),
                          "reduction_type": "element"}}
    reducer = reducers.ICEReweightReducer(lam=math.log(4.0), normalize=normalize, collect_stats=True)
    reducer(loss_dict, torch.randn(3, 2, device=device), None)
    assert reducer.max_weight_over_mean == pytest.approx(4 / (7 / 3), rel=1e-9)
    assert reducer.effective_sample_size == pytest.approx(49 / (3 * 21), rel=1e-9)


def test_reweighting_half_precision_losses_matches_float32(device):
    """Weights and their sums overflowed in float16 and the loss came out 0.0."""
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0)).to(device)
    y = (torch.arange(256) // 4).to(device)
    loss_func = pml_losses.TripletMarginLoss(reducer=reducers.ICEReweightReducer())
    expected = loss_func(x, y)
    half = x.half().requires_grad_()
    value = loss_func(half, y)
    assert value.dtype == torch.float16
    assert value.item() == pytest.approx(expected.item(), rel=2e-2)
    value.backward()
    assert torch.isfinite(half.grad).all() and half.grad.abs().sum() > 0


@pytest.mark.parametrize("normalize", ["batch", "anchor"])
@pytest.mark.parametrize("lam", [100.0, 700.0])
def test_large_lam_is_exact(make_batch, lam, normalize):
    """lam >= 88 overflowed float32 weights to inf and the loss to NaN."""
    embeddings, labels = make_batch(n=12, n_classes=3, seed=8, dtype=torch.float64)
    loss_func = losses.ICELoss(
        scale=16.0, reducer=reducers.ICEReweightReducer(lam=lam, normalize=normalize)
    )
    value = loss_func(embeddings, labels)
    expected = ice_reference(
        embeddings.cpu(), labels.cpu(), scale=16.0, lam=lam, normalize=normalize
    )
    assert value.item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("normalize", ["batch", "anchor"])
def test_huge_lam_in_float32_stays_finite(make_batch, normalize):
    embeddings, labels = make_batch(n=12, n_classes=3, seed=8)
    embeddings.requires_grad_()
    reducer = reducers.ICEReweightReducer(lam=1e30, normalize=normalize)
    value = losses.ICELoss(reducer=reducer)(embeddings, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(embeddings.grad).all()


def test_anchor_normalisation_of_n_by_1_element_losses(make_batch):
    """MultiSimilarityLoss's element losses: each element is its own anchor, so the
    anchor normalisation is the plain mean (it crashed on the (N, 1) shape)."""
    embeddings, labels = make_batch(n=16, n_classes=4, seed=5, dtype=torch.float64)
    anchor = pml_losses.MultiSimilarityLoss(
        reducer=reducers.ICEReweightReducer(normalize="anchor")
    )(embeddings, labels)
    mean = pml_losses.MultiSimilarityLoss(reducer=reducers.MeanReducer())(embeddings, labels)
    assert anchor.item() == pytest.approx(mean.item(), rel=1e-12)


def test_anchor_normalisation_of_n_by_1_losses_directly(device):
    element_losses = torch.rand(6, 1, dtype=torch.float64, device=device)
    loss_dict = {"loss": {"losses": element_losses, "indices": torch.arange(6, device=device),
                          "reduction_type": "element"}}
    value = reducers.ICEReweightReducer(normalize="anchor")(loss_dict, torch.randn(6, 2), None)
    assert value.item() == pytest.approx(element_losses.mean().item(), rel=1e-12)
