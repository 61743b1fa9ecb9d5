"""The harness's gradient caching (--cache-chunk) and its loss across processes."""

import pytest
import json

import torch
from pytorch_metric_learning.miners import MultiSimilarityMiner
from pytorch_metric_learning.utils import distributed as pml_dist

from benchmarks import run
from benchmarks.core import training
from benchmarks.core.loss_specs import make_loss_spec
from pml_ice.utils import distributed as ice_dist

TINY = ["--dataset", "digits", "--epochs", "2", "--seeds", "1", "--limit-per-class", "40", "--batch-size", "32",
        "--m-per-class", "8", "--patience", "-1", "--quiet"]


def build(name, **values):
    return make_loss_spec(name, values).build(num_classes=8, embedding_size=16, collect_stats=False)


@pytest.mark.slow
def test_a_chunk_of_the_whole_batch_gives_the_uncached_run(tmp_path):
    argv = TINY + ["--losses", "ice,multisimilarity"]
    assert run.main(argv + ["--out", str(tmp_path / "plain")]) == 0
    assert run.main(argv + ["--cache-chunk", "32", "--out", str(tmp_path / "cached")]) == 0
    assert (tmp_path / "plain" / "results.csv").read_bytes() == (tmp_path / "cached" / "results.csv").read_bytes()
    assert json.loads((tmp_path / "cached" / "config.json").read_text())["cache_chunk"] == 32
    assert "gradient caching in chunks of 32" in (tmp_path / "cached" / "summary.md").read_text()


def test_each_chunk_is_re_forwarded_under_the_forward_autocast(tmp_path, monkeypatch):
    calls = []
    original = training.BenchmarkTrainer.compute_embeddings

    def record(self, data):
        embeddings = original(self, data)
        calls.append((len(data), embeddings.dtype, torch.is_grad_enabled()))
        return embeddings

    monkeypatch.setattr(training.BenchmarkTrainer, "compute_embeddings", record)
    assert run.main(TINY + ["--amp", "bf16", "--device", "cpu", "--cache-chunk", "8", "--losses", "ice",
                            "--out", str(tmp_path / "o")]) == 0
    assert calls and {size for size, _, _ in calls} == {8} and {dtype for _, dtype, _ in calls} == {torch.bfloat16}
    with_graph = [grad for _, _, grad in calls]
    assert with_graph.count(True) == with_graph.count(False)  # every chunk: a forward, then its re-forward


def trainer_step(loss_name, chunk_size, x, y):
    torch.manual_seed(1)
    trunk = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Dropout(0.3), torch.nn.ReLU())
    embedder = torch.nn.Linear(32, 16)
    loss, miner = build(loss_name)
    trainer = training.BenchmarkTrainer(
        models={"trunk": trunk, "embedder": embedder},
        optimizers={"trunk_optimizer": None, "embedder_optimizer": None}, batch_size=len(x),
        loss_funcs={"metric_loss": loss}, mining_funcs={"tuple_miner": miner} if miner else {},
        dataset=torch.utils.data.TensorDataset(x, y), data_device=torch.device("cpu"), chunk_size=chunk_size,
    )
    trainer.epoch = trainer.iteration = 1
    torch.manual_seed(2)  # the dropout masks
    trainer.calculate_loss((x, y))
    trainer.loss_tracker.update(trainer.loss_weights)
    trainer.backward()
    params = list(trunk.parameters()) + list(embedder.parameters())
    return trainer.losses["total_loss"].detach(), [p.grad.clone() for p in params], torch.rand(1)


def test_a_cached_step_has_the_uncached_loss_gradients_and_random_state():
    """Without BatchNorm, caching changes nothing but the rounding (dropout included)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8), torch.arange(8).repeat_interleave(4)
    for loss_name in ("ice", "multisimilarity", "ntxent"):
        plain_loss, plain_grads, plain_next = trainer_step(loss_name, None, x, y)
        loss, grads, next_draw = trainer_step(loss_name, 5, x, y)
        torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-7)
        for grad, plain in zip(grads, plain_grads):
            assert (grad - plain).norm() <= 1e-5 * plain.norm()  # float32 rounding; other dropout masks: ~1
        assert torch.equal(next_draw, plain_next)  # training goes on with the same random numbers


def test_across_processes_ice_is_sharded_exactly_and_pml_losses_keep_pml_s_wrapper():
    for name in ("ice", "ntxent"):  # the harness's NTXent is ICE without reweighting
        ice, _ = build(name)
        loss, miner = training.distributed_loss_and_miner(ice, MultiSimilarityMiner())
        assert isinstance(loss, ice_dist.DistributedLossWrapper) and loss.efficient
        assert isinstance(miner, ice_dist.DistributedMinerWrapper) and miner.efficient
    for name in ("supcon", "multisimilarity", "proxyanchor"):
        pml_loss, pml_miner = build(name)
        loss, miner = training.distributed_loss_and_miner(pml_loss, pml_miner)
        assert type(loss) is pml_dist.DistributedLossWrapper and not loss.efficient
        assert miner is None if pml_miner is None else type(miner) is pml_dist.DistributedMinerWrapper
