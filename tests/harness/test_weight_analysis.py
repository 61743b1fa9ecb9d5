"""The relative weight analysis against its formulas, on a hand-made batch."""

import math

import pytest
import torch

from benchmarks.report.weight_analysis import pair_weights
from pml_ice import losses, reducers
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


def test_the_weights_are_the_reducer_s(make_batch, monkeypatch):
    """The analysis takes its weights from ICEReweightReducer: the reducer's on the
    same per-pair losses, and whatever the reducer gives."""
    embeddings, labels = make_batch(n=12, n_classes=3, seed=4, dtype=torch.float64)
    pair_losses = losses.ICELoss(scale=8.0, reducer=reducers.DoNothingReducer())(embeddings, labels)["loss"]["losses"]
    analysis = pair_weights(embeddings, labels, scale=8.0, lams=[0.5, 3.0])
    for lam in (0.5, 3.0):
        assert torch.equal(analysis.weights[lam], reducers.ICEReweightReducer(lam=lam).weights(pair_losses))

    monkeypatch.setattr(reducers.ICEReweightReducer, "weights", lambda self, losses: torch.ones_like(losses))
    flat = pair_weights(embeddings, labels, scale=8.0, lams=[3.0])
    pulls = 1 - analysis.match_prob
    assert torch.allclose(flat.shares[3.0], pulls / pulls.sum(), rtol=1e-12)


def test_hardest_share_grows_with_lam(make_batch):
    embeddings, labels = make_batch(n=40, n_classes=5, seed=6, dtype=torch.float64)
    analysis = pair_weights(embeddings, labels, scale=16.0, lams=[0.0, 1.0, 4.0])
    shares = [analysis.hardest_share(lam) for lam in (0.0, 1.0, 4.0)]
    assert 0.1 < shares[0] < shares[1] < shares[2] < 1.0


def test_a_batch_without_pairs_is_refused():
    with pytest.raises(ValueError, match="no positive pair"):
        pair_weights(torch.randn(4, 3), torch.arange(4), scale=16.0, lams=[1.0])


def test_weights_command_on_a_tiny_run(tmp_path, capsys):
    """benchmarks.weights reads a finished run and writes its plot and report."""
    from benchmarks import run, weights

    out = tmp_path / "out"
    assert run.main(["--dataset", "digits", "--epochs", "1", "--seeds", "1", "--limit-per-class", "20",
                     "--batch-size", "16", "--m-per-class", "4", "--losses", "ice:scale=8", "--out", str(out)]) == 0
    assert weights.main(["--out", str(out), "--batches", "2", "--lams", "0,2"]) == 0
    folder = out / "runs" / "ice_scale_8" / "seed0"
    report = (folder / "weights.md").read_text()
    assert (folder / "weights.png").stat().st_size > 0
    # 2 batches of 16 = 4 classes x 4 images: 4 x 4 x 3 = 48 positive pairs each
    assert "| untrained | 96 |" in report and "| trained (epoch 1) | 96 |" in report
    assert weights.main(["--out", str(out), "--loss", "ntxent"]) == 2
    assert "no finished run of ntxent with seed 0" in capsys.readouterr().err


def test_weights_command_names_a_foreign_folder(tmp_path, capsys):
    from benchmarks import weights

    (tmp_path / "config.json").write_text("[1]")
    assert weights.main(["--out", str(tmp_path)]) == 2
    assert "config.json does not hold the settings of" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"dataset": "nope"}')
    assert weights.main(["--out", str(tmp_path)]) == 2
    assert "config.json names no dataset of this harness: not an output folder of benchmarks.run" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"dataset": "digits"}')
    (tmp_path / "runs" / "ice" / "seed0").mkdir(parents=True)
    torch.save({"epoch": 1, "model": {}}, tmp_path / "runs" / "ice" / "seed0" / "checkpoint.pth")
    assert weights.main(["--out", str(tmp_path)]) == 2
    assert "checkpoint.pth is not a checkpoint of this harness" in capsys.readouterr().err
