"""ICELoss is twice differentiable on every path: gradgradcheck in float64, and a
gradient penalty agrees with PML's NTXentLoss (the same loss with MeanReducer on labels)."""

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners

from conftest import use_symmetric_tiles
from pml_ice import losses, reducers

PATHS = ["dense", "row_chunks", "symmetric_tiles"]


def batch(device):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=generator, dtype=torch.float64)
    return x.to(device).requires_grad_(), (torch.arange(16) % 4).to(device)


def ice_for(path, monkeypatch):
    use_symmetric_tiles(monkeypatch, path == "symmetric_tiles")
    return losses.ICELoss(
        scale=8.0, reducer=reducers.MeanReducer(), memory_efficient=path != "dense", chunk_size=5
    )


def penalty_grad(loss_func, x, labels):
    """d/dx of the gradient penalty sum((dL/dx)^2)."""
    x = x.detach().clone().requires_grad_()
    grad = torch.autograd.grad(loss_func(x, labels), x, create_graph=True)[0]
    (grad**2).sum().backward()
    return x.grad


@pytest.mark.parametrize("path", PATHS)
def test_gradgradcheck_on_labels(device, path, monkeypatch):
    x, labels = batch(device)
    loss_func = ice_for(path, monkeypatch)
    assert torch.autograd.gradgradcheck(lambda e: loss_func(e, labels), (x,), fast_mode=True)


@pytest.mark.parametrize("path", PATHS)
def test_gradient_penalty_equals_ntxent(agreement, device, path, monkeypatch):
    x, labels = batch(device)
    expected = penalty_grad(pml_losses.NTXentLoss(temperature=1 / 8.0), x, labels)
    actual = penalty_grad(ice_for(path, monkeypatch), x, labels)
    agreement.check("gradient penalty vs NTXent float64", actual, expected, 1e-9)


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["dense", "chunked"])
def test_gradgradcheck_with_ref_emb_and_miner(device, memory_efficient):
    x, labels = batch(device)
    ref = torch.randn(10, 8, dtype=torch.float64, device=device, requires_grad=True)
    ref_labels = (torch.arange(10) % 4).to(device)
    mined = miners.MultiSimilarityMiner(0.1)(x.detach(), labels, ref.detach(), ref_labels)
    loss_func = losses.ICELoss(
        scale=8.0, reducer=reducers.MeanReducer(), memory_efficient=memory_efficient, chunk_size=5
    )
    for indices_tuple in (None, mined):

        def loss_of(e, r):
            return loss_func(e, labels, indices_tuple, ref_emb=r, ref_labels=ref_labels)

        assert torch.autograd.gradgradcheck(loss_of, (x, ref), fast_mode=True)

