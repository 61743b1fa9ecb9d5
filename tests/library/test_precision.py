"""float16 / bfloat16 inputs and torch.autocast: finite losses and gradients,
within 2 % of float32 on the same values, for scales up to 128."""

import pytest
import torch

from conftest import use_symmetric_tiles
from pml_ice import losses

RELATIVE_TOLERANCE = 0.02
SCALES = [1.0, 32.0, 128.0]
PATHS = ["dense", "row_chunks", "symmetric_tiles"]


def memory_efficient_for(path, monkeypatch):
    """ICELoss's memory_efficient argument for a path, with the tiles set accordingly."""
    use_symmetric_tiles(monkeypatch, path == "symmetric_tiles")
    return path != "dense"


def relative_difference(value, float32_value):
    return abs(value.float().item() - float32_value.item()) / abs(float32_value.item())


@pytest.mark.parametrize("batch_size", [10, 32], ids=["n10", "n32"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_inputs_close_to_float32(
    agreement, make_batch, distance_case, dtype, scale, path, batch_size, monkeypatch
):
    """Batches of 10 and 32: torch's CPU kernels may take other routes below and
    above 25 rows."""
    memory_efficient = memory_efficient_for(path, monkeypatch)
    _, make_distance = distance_case
    embeddings, labels = make_batch(n=batch_size, dim=16, n_classes=4, seed=41)
    low = embeddings.to(dtype).requires_grad_()
    loss_func = losses.ICELoss(
        scale=scale, distance=make_distance(), memory_efficient=memory_efficient
    )
    loss = loss_func(low, labels)
    loss.backward()
    float32_loss = loss_func(low.detach().float(), labels)
    assert torch.isfinite(loss)
    assert torch.isfinite(low.grad).all()
    name = str(dtype).replace("torch.", "")
    agreement.check(f"{name} input vs float32 loss", loss.float(), float32_loss, RELATIVE_TOLERANCE)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", SCALES)
def test_autocast_bfloat16_close_to_float32(agreement, make_batch, device, scale, path, monkeypatch):
    """Under autocast the loss gets float32 embeddings (its products then run in
    bfloat16) or the bfloat16 output of a layer run under autocast."""
    memory_efficient = memory_efficient_for(path, monkeypatch)
    embeddings, labels = make_batch(n=32, dim=16, n_classes=4, seed=42)
    layer = torch.nn.Linear(16, 16).to(device)
    loss_func = losses.ICELoss(scale=scale, memory_efficient=memory_efficient)

    inputs = embeddings.clone().requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = loss_func(inputs, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(inputs.grad).all()
    agreement.check(
        "autocast(bfloat16) float32 input vs float32 loss",
        loss.float(),
        loss_func(embeddings, labels),
        RELATIVE_TOLERANCE,
    )

    with torch.autocast(device.type, dtype=torch.bfloat16):
        layer_output = layer(embeddings)
        loss = loss_func(layer_output, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    agreement.check(
        "autocast(bfloat16) layer output vs float32 loss",
        loss.float(),
        loss_func(layer_output.detach().float(), labels),
        RELATIVE_TOLERANCE,
    )
