"""Shared fixtures: the device under test, seeding, random batches, PML distances
paired with their reference description, and a recorder of the agreement with the
reference (printed at the end of the run)."""

import os
import random

import pytest
import torch
from pytorch_metric_learning import distances

from pml_ice.losses._ice import plan
from reference import DistanceSpec

DEVICE_ENV_VAR = "PML_ICE_TEST_DEVICE"

DISTANCE_CASES = {
    "cosine": (DistanceSpec("cosine"), lambda: distances.CosineSimilarity()),
    "dot": (
        DistanceSpec("dot", normalize=False),
        lambda: distances.DotProductSimilarity(normalize_embeddings=False),
    ),
    "lp_normalized": (DistanceSpec("lp"), lambda: distances.LpDistance()),
    "lp": (
        DistanceSpec("lp", normalize=False),
        lambda: distances.LpDistance(normalize_embeddings=False),
    ),
}


def relative_error(actual, expected):
    """max |actual - expected| / max |expected| (a norm-wise relative error)."""
    actual = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    expected = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.numel() == 0:
        return 0.0
    scale = max(expected.abs().max().item(), 1e-12)
    return (actual - expected).abs().max().item() / scale


class AgreementLog:
    """Checks closeness and keeps the largest relative error seen per category."""

    def __init__(self):
        self.max_errors = {}

    def check(self, category, actual, expected, rtol):
        error = relative_error(actual, expected)
        self.max_errors[category] = max(self.max_errors.get(category, 0.0), error)
        assert error <= rtol, f"{category}: relative error {error:.3e} > {rtol:.1e}"
        return error


AGREEMENT = AgreementLog()


def pytest_terminal_summary(terminalreporter):
    if not AGREEMENT.max_errors:
        return
    terminalreporter.section("max relative error against the reference")
    for category in sorted(AGREEMENT.max_errors):
        terminalreporter.write_line(
            f"{category:55s} {AGREEMENT.max_errors[category]:.3e}"
        )


@pytest.fixture
def agreement():
    return AGREEMENT


@pytest.fixture(scope="session")
def device():
    return torch.device(os.environ.get(DEVICE_ENV_VAR, "cpu"))


@pytest.fixture(autouse=True)
def seed_everything():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def make_batch(device):
    """make_batch(n, dim, n_classes, seed, dtype) -> (embeddings, labels) on the
    device; labels cycle through the classes so that every class is present."""

    def make(n=12, dim=8, n_classes=4, seed=0, dtype=torch.float32):
        generator = torch.Generator().manual_seed(seed)
        embeddings = torch.randn(n, dim, generator=generator, dtype=torch.float64)
        labels = torch.arange(n) % n_classes
        labels = labels[torch.randperm(n, generator=generator)]
        return embeddings.to(device, dtype), labels.to(device)

    return make


@pytest.fixture(params=sorted(DISTANCE_CASES))
def distance_case(request):
    """(reference DistanceSpec, factory of the equivalent PML distance)."""
    return DISTANCE_CASES[request.param]


@pytest.fixture
def pair_losses_of():
    """Turns the output of a DoNothingReducer into {(anchor, positive): loss}."""

    def convert(loss_dict):
        info = loss_dict["loss"]
        assert info["reduction_type"] == "pos_pair"
        losses = info["losses"]
        if not torch.is_tensor(losses):
            return {}
        anchors, positives = info["indices"]
        keys = list(zip(anchors.tolist(), positives.tolist()))
        assert len(set(keys)) == len(keys), "a pair appears twice"
        return dict(zip(keys, losses))

    return convert


def use_symmetric_tiles(monkeypatch, enabled):
    """Make the chunked path for labels within the batch use (or not) the symmetric
    tiles on every device and dtype, so that the CPU tests check both."""
    monkeypatch.setattr(plan, "symmetric_tiles_pay_off", lambda kind, dtype: enabled)
