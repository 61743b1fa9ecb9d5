"""The library probes of the reliability review (issue 8), kept so they cannot come back:
half-precision reweighting, label dtypes, huge lam, element losses shaped (N, 1), no
quadratic work for a batch without negatives, and bad arguments."""

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from pml_ice import losses, reducers
from pml_ice.losses import ice_pairs
from pml_ice.losses.ice_label_losses import ICELabelLosses
from reference import ice_reference


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


def test_no_pairs_are_built_when_no_anchor_has_a_negative(monkeypatch):
    """One label for the whole batch: the answer is zero, so no pair list may grow with
    the square of the batch (10,000 rows took 13.6 s and 4.6 GB)."""
    built = []
    original = ice_pairs.PairList.from_sorted.__func__

    def recording_from_sorted(cls, anchors, refs, num_anchors):
        built.append(len(anchors))
        return original(cls, anchors, refs, num_anchors)

    monkeypatch.setattr(ice_pairs.PairList, "from_sorted", classmethod(recording_from_sorted))
    embeddings = torch.randn(3000, 4, requires_grad=True)
    labels = torch.zeros(3000, dtype=torch.long)
    value = losses.ICELoss(memory_efficient=True)(embeddings, labels)
    value.backward()
    assert value.item() == 0.0 and max(built) == 0


def test_dense_path_skips_the_logits_when_no_anchor_has_a_negative(monkeypatch):
    def fail(*args):
        raise AssertionError("logits computed for a batch without negatives")

    monkeypatch.setattr(ICELabelLosses, "apply", fail)
    embeddings = torch.randn(64, 4, requires_grad=True)
    value = losses.ICELoss()(embeddings, torch.full((64,), 3))
    value.backward()
    assert value.item() == 0.0


def test_bool_indices_tuple_is_refused(device):
    x, y = torch.randn(6, 4, device=device), torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    mask = torch.tensor([True, False, True, False, True, False], device=device)
    with pytest.raises(ValueError, match=r"indices_tuple\[0\].*integer.*torch.bool"):
        losses.ICELoss()(x, y, (mask, mask, mask))


@pytest.mark.parametrize("value", [True, False, 1e39, float("inf"), float("nan"), "16", -1.0])
def test_bad_scale_is_refused(value):
    with pytest.raises(ValueError, match="scale"):
        losses.ICELoss(scale=value)


@pytest.mark.parametrize("value", [True, 1e39, float("nan"), -0.5, None])
def test_bad_lam_is_refused(value):
    with pytest.raises(ValueError, match="lam"):
        reducers.ICEReweightReducer(lam=value)


def test_numpy_numbers_are_accepted(make_batch):
    embeddings, labels = make_batch()
    loss_func = losses.ICELoss(
        scale=np.float32(16), reducer=reducers.ICEReweightReducer(lam=np.float64(1))
    )
    assert loss_func.scale == 16.0 and loss_func.reducer.lam == 1.0
    assert torch.isfinite(loss_func(embeddings, labels))
