"""The relative weight analysis against its formulas, on a hand-made batch."""

import math

import pytest
import torch

from benchmarks.weight_analysis import pair_weights
from reference import ice_pair_losses


def test_weights_and_shares_follow_the_formulas(make_batch):
    embeddings, labels = make_batch(n=12, n_classes=3, seed=4, dtype=torch.float64)
    analysis = pair_weights(embeddings, labels, scale=8.0, lams=[0.0, 2.0])
    expected = ice_pair_losses(embeddings.cpu(), labels.cpu(), scale=8.0)
    probs = sorted(math.exp(-v.item()) for v in expected.values())
    assert sorted(analysis.match_prob.tolist()) == pytest.approx(probs, rel=1e-12)
    for lam in (0.0, 2.0):
        pulls = [math.exp(lam * (1 - p)) * (1 - p) for p in probs]
        shares = sorted(analysis.shares[lam].tolist())
        assert shares == pytest.approx(sorted(x / sum(pulls) for x in pulls), rel=1e-12)
    assert analysis.weights[0.0].tolist() == [1.0] * len(probs)


def test_hardest_share_grows_with_lam(make_batch):
    embeddings, labels = make_batch(n=40, n_classes=5, seed=6, dtype=torch.float64)
    analysis = pair_weights(embeddings, labels, scale=16.0, lams=[0.0, 1.0, 4.0])
    shares = [analysis.hardest_share(lam) for lam in (0.0, 1.0, 4.0)]
    assert 0.1 < shares[0] < shares[1] < shares[2] < 1.0


def test_a_batch_without_pairs_is_refused():
    with pytest.raises(ValueError, match="no positive pair"):
        pair_weights(torch.randn(4, 3), torch.arange(4), scale=16.0, lams=[1.0])
