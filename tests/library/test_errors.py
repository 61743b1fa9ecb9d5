"""Every bad input of the issue gets an error whose message names the problem."""

import numpy as np
import pytest
import torch

from pml_ice import losses, reducers

ERRORS = (ValueError, TypeError)


@pytest.fixture(params=[False, True], ids=["dense", "memory_efficient"])
def loss_func(request):
    return losses.ICELoss(scale=16.0, memory_efficient=request.param)


@pytest.fixture
def labels(device):
    return torch.tensor([0, 0, 1, 1, 2, 2], device=device)


@pytest.mark.parametrize("shape", [(6,), (6, 4, 2)], ids=["1d", "3d"])
def test_embeddings_not_2d(loss_func, labels, device, shape):
    embeddings = torch.randn(*shape, device=device)
    with pytest.raises(ERRORS, match=r"(?i)embeddings.*(2-?d|2 dim|two[- ]dim|ndim|dimension)"):
        loss_func(embeddings, labels)


def test_labels_of_wrong_length(loss_func, device):
    embeddings = torch.randn(6, 4, device=device)
    with pytest.raises(ERRORS, match=r"(?i)labels.*(shape|length|size|number)"):
        loss_func(embeddings, torch.tensor([0, 0, 1, 1, 2], device=device))


def test_labels_of_wrong_shape(loss_func, labels, device):
    embeddings = torch.randn(6, 4, device=device)
    with pytest.raises(ERRORS, match=r"(?i)labels.*(1-?d|shape|dimension)"):
        loss_func(embeddings, labels.unsqueeze(1))


def test_ref_labels_of_wrong_length(loss_func, labels, device):
    embeddings, ref_emb = torch.randn(6, 4, device=device), torch.randn(5, 4, device=device)
    with pytest.raises(ERRORS, match=r"(?i)labels.*(shape|length|size|number)"):
        loss_func(embeddings, labels, ref_emb=ref_emb, ref_labels=labels)


def test_ref_emb_not_2d(loss_func, labels, device):
    embeddings, ref_emb = torch.randn(6, 4, device=device), torch.randn(5, device=device)
    with pytest.raises(ERRORS, match=r"(?i)ref_emb.*(2-?d|dimension)"):
        loss_func(embeddings, labels, ref_emb=ref_emb, ref_labels=labels[:5])


def test_ref_emb_of_other_embedding_size(loss_func, labels, device):
    embeddings, ref_emb = torch.randn(6, 4, device=device), torch.randn(5, 3, device=device)
    with pytest.raises(ERRORS, match=r"(?i)ref_emb.*(size|dim)"):
        loss_func(embeddings, labels, ref_emb=ref_emb, ref_labels=labels[:5])


def test_indices_tuple_of_wrong_arity(loss_func, labels, device):
    embeddings = torch.randn(6, 4, device=device)
    with pytest.raises(ERRORS, match=r"(?i)indices_tuple"):
        loss_func(embeddings, None, (labels, labels))


def test_neither_labels_nor_indices_tuple(loss_func, device):
    embeddings = torch.randn(6, 4, device=device)
    with pytest.raises(ERRORS, match=r"(?i)(labels.*indices_tuple|indices_tuple.*labels)"):
        loss_func(embeddings)


def test_ref_emb_without_ref_labels(loss_func, labels, device):
    embeddings, ref_emb = torch.randn(6, 4, device=device), torch.randn(5, 4, device=device)
    with pytest.raises(ERRORS, match=r"(?i)ref_labels"):
        loss_func(embeddings, labels, ref_emb=ref_emb)


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_non_positive_scale(scale):
    with pytest.raises(ERRORS, match=r"(?i)scale"):
        losses.ICELoss(scale=scale)


def test_negative_lam():
    with pytest.raises(ERRORS, match=r"(?i)lam"):
        reducers.ICEReweightReducer(lam=-0.1)


def test_unknown_normalize():
    with pytest.raises(ERRORS, match=r"(?i)normali[sz]e"):
        reducers.ICEReweightReducer(normalize="pair")


def test_valid_edge_values_are_accepted(labels, device):
    """The checks are not over-eager: lam = 0 and a tiny positive scale are valid."""
    loss_func = losses.ICELoss(
        scale=1e-3, reducer=reducers.ICEReweightReducer(lam=0.0, normalize="anchor")
    )
    assert torch.isfinite(loss_func(torch.randn(6, 4, device=device), labels))


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
        scale=np.float32(16), reducer=reducers.ICEReweightReducer(lam=np.float64(1)),
        memory_efficient=True, chunk_size=np.int64(3),
    )
    assert loss_func.scale == 16.0 and loss_func.reducer.lam == 1.0
    assert loss_func.chunk_size == 3 and type(loss_func.chunk_size) is int
    assert torch.isfinite(loss_func(embeddings, labels))


@pytest.mark.parametrize("value", [0, -2, True, 2.0, "4"])
def test_bad_chunk_size_is_refused(value):
    with pytest.raises(ValueError, match="ICELoss: chunk_size must be a positive integer"):
        losses.ICELoss(chunk_size=value)


@pytest.mark.parametrize(
    "where", ["labels", "ref_labels", "chunked"], ids=["dense", "ref_labels", "pair_lists"]
)
def test_nan_labels_are_refused(device, where):
    """NaN is not equal to itself: the dense path made each NaN a class of its own and
    the pair-list path all NaNs one class, so neither answer is right."""
    x = torch.randn(6, 4, device=device)
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0, float("nan"), float("nan")], device=device)
    clean = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0], device=device)
    loss_func = losses.ICELoss(memory_efficient=where == "chunked")
    name = "ref_labels" if where == "ref_labels" else "labels"
    with pytest.raises(ValueError, match=f"{name} contain NaN"):
        if where == "ref_labels":
            loss_func(x, clean, ref_emb=x.clone(), ref_labels=labels)
        else:
            loss_func(x, labels)


def test_cross_batch_memory_smaller_than_the_batch_names_both_sizes(device):
    memory = losses.CrossBatchMemory(losses.ICELoss(), embedding_size=4, memory_size=5)
    x, y = torch.randn(8, 4, device=device), torch.arange(8, device=device) % 2
    with pytest.raises(ValueError, match=r"batch of 8 .*memory_size of 5"):
        memory(x, y)
