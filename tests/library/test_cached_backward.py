"""Gradient caching (cached_backward, CachedMetricLossOnly) against one forward and
backward of the whole batch: the loss and every parameter gradient."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning import miners, trainers

from pml_ice import losses, reducers
from pml_ice.trainers import CachedMetricLossOnly
from pml_ice.utils import GradientCache, cached_backward
from pml_ice.utils.distributed import DistributedLossWrapper
from gloo import free_port, join_gloo

BATCH, IN_FEATURES, HIDDEN, EMBEDDING_SIZE, CHUNK = 24, 6, 16, 8, 5


def make_model(dropout=0.0, batchnorm=False, dtype=torch.float64):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(IN_FEATURES, HIDDEN)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(HIDDEN))
    layers += [torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(HIDDEN, EMBEDDING_SIZE)]
    return torch.nn.Sequential(*layers).to(dtype)


def make_batch(dtype=torch.float64, n=BATCH):
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(n, IN_FEATURES, generator=generator, dtype=torch.float64)
    labels = (torch.arange(n) % 4)[torch.randperm(n, generator=generator)]
    return inputs.to(dtype), labels


def make_ice():
    return losses.ICELoss(scale=16.0, reducer=reducers.ICEReweightReducer(lam=1.0))


LOSS_CASES = {
    "ice": lambda: (make_ice(), None),
    "ice_miner": lambda: (make_ice(), miners.MultiSimilarityMiner(epsilon=0.3)),
    "contrastive_miner": lambda: (losses.ContrastiveLoss(), miners.PairMarginMiner(0.2, 0.8)),
    "multi_similarity_miner": lambda: (
        losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner(epsilon=0.3)
    ),
}


def loss_and_miner_call(loss_func, miner):
    def call(embeddings, labels):
        indices_tuple = None if miner is None else miner(embeddings, labels)
        return loss_func(embeddings, labels, indices_tuple)

    return call


def whole_batch_step(model, inputs, labels, loss_func, miner=None, seed=7):
    torch.manual_seed(seed)
    model.zero_grad()
    loss = loss_and_miner_call(loss_func, miner)(model(inputs), labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def cached_step(model, inputs, labels, loss_func, miner=None, seed=7, **kwargs):
    torch.manual_seed(seed)
    model.zero_grad()
    loss = cached_backward(model, inputs, labels, loss_func, CHUNK, miner, **kwargs)
    return loss, [p.grad.clone() for p in model.parameters()]


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def max_error(first, second):
    (loss_a, grads_a), (loss_b, grads_b) = first, second
    return max(
        [relative_error(loss_a, loss_b)] + [relative_error(a, b) for a, b in zip(grads_a, grads_b)]
    )


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_cached_equals_whole_batch_with_dropout(case):
    """One dropout layer, active: on the CPU the chunks draw the whole batch's masks in
    turn, and the re-forward restores each chunk's random state, so loss and gradients
    agree with the whole batch to float64 rounding."""
    model = make_model(dropout=0.3)
    inputs, labels = make_batch()
    loss_func, miner = LOSS_CASES[case]()
    expected = whole_batch_step(model, inputs, labels, loss_func, miner)
    assert expected[0] > 0
    assert max_error(cached_step(model, inputs, labels, loss_func, miner), expected) <= 1e-12
    model.eval()  # the dropout masks matter: without them the gradients differ
    assert max_error(whole_batch_step(model, inputs, labels, loss_func, miner), expected) > 1e-3


def test_batchnorm_differs_only_by_per_chunk_statistics():
    """BatchNorm in train mode: caching equals the whole batch pushed through the
    model chunk by chunk (each chunk with its own statistics and one running-statistics
    update), not the whole batch at once; frozen (eval mode), it equals the whole batch."""
    inputs, labels = make_batch()
    loss_func = make_ice()
    cached_model = make_model(batchnorm=True)
    cached = cached_step(cached_model, inputs, labels, loss_func)

    chunked_model = make_model(batchnorm=True)
    chunked_model.zero_grad()
    embeddings = torch.cat([chunked_model(chunk) for chunk in inputs.split(CHUNK)])
    loss = loss_func(embeddings, labels)
    loss.backward()
    chunked = (loss.detach(), [p.grad.clone() for p in chunked_model.parameters()])
    assert max_error(cached, chunked) <= 1e-12
    for kept, expected in zip(cached_model.buffers(), chunked_model.buffers()):
        assert torch.equal(kept, expected)

    whole = whole_batch_step(make_model(batchnorm=True), inputs, labels, loss_func)
    assert max_error(cached, whole) > 1e-3

    frozen_model = make_model(batchnorm=True)
    frozen = cached_step(frozen_model, inputs, labels, loss_func, freeze_batchnorm=True)
    assert frozen_model[1].training and frozen_model[1].num_batches_tracked == 0
    eval_model = make_model(batchnorm=True)
    eval_model[1].eval()
    assert max_error(frozen, whole_batch_step(eval_model, inputs, labels, loss_func)) <= 1e-12


def test_cached_under_bfloat16_autocast():
    model = make_model(dropout=0.3, dtype=torch.float32)
    inputs, labels = make_batch(torch.float32)
    loss_func = make_ice()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = whole_batch_step(model, inputs, labels, loss_func)
        cached = cached_step(model, inputs, labels, loss_func)
    assert max_error(cached, expected) <= 1e-2


def test_grad_scaler_scales_the_cached_gradients():
    model = make_model(dropout=0.3)
    inputs, labels = make_batch()
    loss_func = make_ice()
    expected_loss, expected_grads = whole_batch_step(model, inputs, labels, loss_func)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss, grads = cached_step(model, inputs, labels, loss_func, scaler=scaler)
    unscaled = [grad / 1024.0 for grad in grads]
    assert max_error((loss, unscaled), (expected_loss, expected_grads)) <= 1e-12


def test_cached_metric_loss_only_equals_metric_loss_only():
    """One SGD step (lr=1) of each trainer from the same weights: equal updates."""
    inputs, labels = make_batch(torch.float32)
    dataset = torch.utils.data.TensorDataset(inputs, labels)
    results = []
    variants = [
        (trainers.MetricLossOnly, {}),
        (CachedMetricLossOnly, {"chunk_size": np.int64(CHUNK)}),  # numpy integers accepted
        (CachedMetricLossOnly, {"chunk_size": None}),  # no caching
    ]
    for trainer_class, extra in variants:
        model = make_model(dtype=torch.float32)
        trainer = trainer_class(
            models={"trunk": model},
            optimizers={"trunk_optimizer": torch.optim.SGD(model.parameters(), lr=1.0)},
            batch_size=BATCH,
            loss_funcs={"metric_loss": losses.MultiSimilarityLoss()},
            mining_funcs={"tuple_miner": miners.MultiSimilarityMiner(epsilon=0.3)},
            dataset=dataset,
            sampler=torch.utils.data.SequentialSampler(dataset),
            dataloader_num_workers=0,
            iterations_per_epoch=1,
            data_device=torch.device("cpu"),
            **extra,
        )
        trainer.train(num_epochs=1)
        results.append([p.detach().clone() for p in model.parameters()])
    initial = list(make_model(dtype=torch.float32).parameters())
    for uncached, cached, not_cached, start in zip(*results, initial):
        assert relative_error(start - cached, start - uncached) <= 1e-5
        assert torch.equal(not_cached, uncached)


def test_bad_arguments_are_named():
    model, (inputs, _) = make_model(), make_batch()
    for chunk_size in (0, True, 2.0, np.int64(0)):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            GradientCache(model, inputs, chunk_size)
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        GradientCache(model, [inputs], 4)
    with pytest.raises(ValueError, match="CachedMetricLossOnly: chunk_size must be a positive"):
        CachedMetricLossOnly(chunk_size=0)  # at construction, not at the first step
    with pytest.raises(ValueError, match="freeze_batchnorm applies to cached steps"):
        CachedMetricLossOnly(chunk_size=None, freeze_batchnorm=True)


def test_numpy_integer_chunk_size_is_accepted():
    model, (inputs, labels) = make_model(), make_batch()
    assert len(GradientCache(model, inputs, np.int64(CHUNK)).chunks) == 5


def ddp_worker(rank, world_size, port, out_dir):
    """Each rank: half of the global batch, cached in chunks, ICE sharded exactly."""
    join_gloo(rank, world_size, port)
    try:
        model = make_model()
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
        inputs, labels = make_batch(n=2 * BATCH)
        local = slice(rank * BATCH, (rank + 1) * BATCH)
        loss_func = DistributedLossWrapper(make_ice(), efficient=True)
        loss = cached_backward(ddp_model, inputs[local], labels[local], loss_func, CHUNK)
        grads = [p.grad.clone() for p in model.parameters()]
        torch.save((loss, grads), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cached_with_sharded_loss_under_ddp(tmp_path):
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    inputs, labels = make_batch(n=2 * BATCH)
    expected = whole_batch_step(make_model(), inputs, labels, make_ice())
    for rank in range(2):
        assert max_error(torch.load(tmp_path / f"rank{rank}.pt"), expected) <= 1e-12


def two_dropout_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(0.3),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Dropout(0.3),
        torch.nn.Linear(HIDDEN, EMBEDDING_SIZE),
    ).double()


def test_two_dropout_layers_give_the_chunks_own_masks():
    """With two random layers each chunk draws both layers' masks before the next chunk
    draws any, so the masks differ from the whole batch's under the same seed: caching
    equals the batch pushed through the model chunk by chunk (the masks the chunks
    drew), not the whole batch at once."""
    inputs, labels = make_batch()
    loss_func = make_ice()
    cached = cached_step(two_dropout_model(), inputs, labels, loss_func)

    torch.manual_seed(7)
    chunked_model = two_dropout_model()
    torch.manual_seed(7)
    embeddings = torch.cat([chunked_model(chunk) for chunk in inputs.split(CHUNK)])
    loss = loss_func(embeddings, labels)
    loss.backward()
    chunked = (loss.detach(), [p.grad.clone() for p in chunked_model.parameters()])
    assert max_error(cached, chunked) <= 1e-12

    whole = whole_batch_step(two_dropout_model(), inputs, labels, loss_func)
    assert max_error(cached, whole) > 1e-2


def test_frozen_model_with_a_loss_that_has_parameters():
    """Every model parameter frozen, ProxyAnchor's proxies training: the proxies get the
    uncached step's gradient (before: "element 0 of tensors does not require grad")."""
    inputs, labels = make_batch()
    results = []
    for step in (whole_batch_step, cached_step):
        model = make_model(dropout=0.3)
        model.requires_grad_(False)
        torch.manual_seed(3)
        loss_func = losses.ProxyAnchorLoss(num_classes=4, embedding_size=EMBEDDING_SIZE).double()
        torch.manual_seed(7)
        if step is whole_batch_step:
            loss = loss_func(model(inputs), labels)
            loss.backward()
        else:
            loss = cached_backward(model, inputs, labels, loss_func, CHUNK)
        assert all(p.grad is None for p in model.parameters())
        results.append((loss.detach(), [loss_func.proxies.grad.clone()]))
    assert results[0][0] > 0
    assert max_error(*results) <= 1e-12


class TupleModel(torch.nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.layer, self.wrap = torch.nn.Linear(IN_FEATURES, EMBEDDING_SIZE).double(), wrap

    def forward(self, inputs):
        return self.wrap(self.layer(inputs))


@pytest.mark.parametrize(
    "wrap, got",
    [
        (lambda e: (e, e.sum()), "a tuple"),
        (lambda e: {"embeddings": e}, "a dict"),
        (lambda e: e[0], r"a tensor of shape \(8,\)"),
    ],
    ids=["tuple", "dict", "one_row"],
)
def test_model_must_return_one_tensor_of_embeddings(wrap, got):
    inputs, labels = make_batch()
    with pytest.raises(TypeError, match=rf"one tensor with a row per input \(5 rows .*got {got}"):
        cached_backward(TupleModel(wrap), inputs, labels, make_ice(), CHUNK)


def test_random_state_after_the_step_is_the_uncached_steps():
    """The loss (or miner) draws random numbers after the forward pass; the generator
    ends where the uncached step leaves it, so the next step does not draw them again
    (before: reset to its state after the forward pass)."""
    inputs, labels = make_batch()
    ice = make_ice()

    def drawing_loss(embeddings, labels, indices_tuple):
        draws.append(torch.rand(4))
        return ice(embeddings, labels, indices_tuple)

    states = []
    for step in (whole_batch_step, cached_step):
        draws = []
        step(make_model(dropout=0.3), inputs, labels, drawing_loss)
        states.append(torch.get_rng_state())
        assert not torch.equal(torch.rand(4), draws[0])
    assert torch.equal(*states)


def test_a_second_backward_is_refused():
    """It would add the gradient to .grad again (before: silently doubled)."""
    model, (inputs, labels) = make_model(), make_batch()
    cache = GradientCache(model, inputs, CHUNK)
    make_ice()(cache.embeddings, labels).backward()
    cache.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"already called.*new GradientCache"):
        cache.backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
