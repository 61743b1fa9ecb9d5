"""torch.func transforms of ICELoss on every path, against the float64 reference:
``grad`` (also of ``ref_emb`` and with mined pairs), ``vjp``, ``jacrev`` and a nested
``grad`` (a gradient penalty) against autograd with ``create_graph``. Before the
autograd Functions had a ``setup_context``, torch refused with "must override the
setup_context staticmethod"."""

import pytest
import torch
from pytorch_metric_learning import miners

from conftest import use_symmetric_tiles
from pml_ice import losses, reducers
from reference import ice_reference

SCALE, LAM, NORMALIZE = 8.0, 1.0, "anchor"
PATHS = ["dense", "row_chunks", "symmetric_tiles"]


def ice_for(path, monkeypatch, reducer=None):
    use_symmetric_tiles(monkeypatch, path == "symmetric_tiles")
    return losses.ICELoss(
        scale=SCALE,
        reducer=reducer or reducers.ICEReweightReducer(lam=LAM, normalize=NORMALIZE),
        memory_efficient=path != "dense",
        chunk_size=5,
    )


def batch(device, n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator, dtype=torch.float64)
    return x.to(device), (torch.arange(n) % 4).to(device)


@pytest.mark.parametrize("path", PATHS)
def test_grad_equals_reference(agreement, device, path, monkeypatch):
    x, labels = batch(device)
    loss_func = ice_for(path, monkeypatch)
    grad = torch.func.grad(lambda e: loss_func(e, labels))(x)
    leaf = x.detach().cpu().clone().requires_grad_()
    ice_reference(leaf, labels.cpu(), scale=SCALE, lam=LAM, normalize=NORMALIZE).backward()
    agreement.check("torch.func.grad vs reference float64", grad, leaf.grad, 1e-10)


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["dense", "row_chunks"])
def test_grad_of_ref_emb_and_mined_pairs(agreement, device, memory_efficient):
    x, labels = batch(device)
    refs, ref_labels = batch(device, n=10, seed=1)
    mined = miners.MultiSimilarityMiner(0.1)(x, labels, refs, ref_labels)
    loss_func = losses.ICELoss(
        scale=SCALE, reducer=reducers.ICEReweightReducer(lam=LAM, normalize=NORMALIZE),
        memory_efficient=memory_efficient, chunk_size=5,
    )
    for indices_tuple in (None, mined):
        grads = torch.func.grad(
            lambda e, r: loss_func(e, labels, indices_tuple, r, ref_labels), argnums=(0, 1)
        )(x, refs)
        leaves = [t.detach().cpu().clone().requires_grad_() for t in (x, refs)]
        cpu_tuple = None if indices_tuple is None else tuple(t.cpu() for t in indices_tuple)
        ice_reference(
            leaves[0], labels.cpu(), cpu_tuple, leaves[1], ref_labels.cpu(), scale=SCALE, lam=LAM,
            normalize=NORMALIZE,
        ).backward()
        for grad, leaf in zip(grads, leaves):
            agreement.check("torch.func.grad ref_emb vs reference float64", grad, leaf.grad, 1e-10)


@pytest.mark.parametrize("path", PATHS)
def test_vjp_jacrev_and_nested_grad_equal_autograd(device, path, monkeypatch):
    x, labels = batch(device)
    loss_func = ice_for(path, monkeypatch, reducers.MeanReducer())
    leaf = x.clone().requires_grad_()
    grad = torch.autograd.grad(loss_func(leaf, labels), leaf, create_graph=True)[0]
    penalty_grad = torch.autograd.grad((grad**2).sum(), leaf)[0]

    loss, vjp = torch.func.vjp(lambda e: loss_func(e, labels), x)
    assert torch.allclose(vjp(torch.ones_like(loss))[0], grad, rtol=0, atol=1e-14)
    assert torch.allclose(torch.func.jacrev(lambda e: loss_func(e, labels))(x), grad, rtol=0, atol=1e-14)
    nested = torch.func.grad(
        lambda e: (torch.func.grad(lambda z: loss_func(z, labels))(e) ** 2).sum()
    )(x)
    assert penalty_grad.abs().max() > 0
    assert torch.allclose(nested, penalty_grad, rtol=0, atol=1e-12)
