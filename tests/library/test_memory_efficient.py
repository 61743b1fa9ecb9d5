"""The chunked, recomputing path (memory_efficient=True) is exact: same per-pair
losses and gradients as memory_efficient=False and as the reference, with chunk sizes
that do not divide the batch, for labels, pair and triplet miners, a ref_emb larger
than the batch, every distance, and float16/bfloat16."""

import pytest
import torch
from pytorch_metric_learning import miners
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

from pml_ice import losses, reducers
from conftest import use_symmetric_tiles
from pml_ice.losses._ice import pairs
from reference import COSINE, DistanceSpec, ice_pair_losses

SCALE = 24.0
BATCH = 10
CHUNK_SIZES = [1, 3, 7]
INPUT_MODES = ["labels", "pair_miner", "triplet_miner", "ref_emb", "ref_emb_miner"]


@pytest.fixture(params=["row_chunks", "symmetric_tiles"])
def labels_path(request, monkeypatch):
    """Both chunked paths for labels within the batch, whatever this device would pick."""
    use_symmetric_tiles(monkeypatch, request.param == "symmetric_tiles")
    return request.param


# Every input mode on the row chunks; labels within the batch on the symmetric tiles too.
MODES_AND_PATHS = [(mode, "row_chunks") for mode in INPUT_MODES] + [("labels", "symmetric_tiles")]


def pair_weight(anchor, positive):
    """A fixed, pair-specific coefficient, so that the gradient of the weighted sum
    of the per-pair losses checks every pair's gradient."""
    return 1.0 + 0.25 * ((7 * anchor + 3 * positive) % 5)


def make_inputs(make_batch, mode, dtype=torch.float64):
    """Batch of 10 in 3 classes; ref_emb modes add a reference set of 25; the pairs
    of "ref_emb_miner" are mined ones given without labels."""
    embeddings, labels = make_batch(n=BATCH, n_classes=3, seed=51, dtype=dtype)
    ref_emb = ref_labels = indices_tuple = None
    if mode.startswith("ref_emb"):
        ref_emb, ref_labels = make_batch(n=25, n_classes=4, seed=52, dtype=dtype)
    if mode in ("pair_miner", "ref_emb_miner"):
        miner = miners.MultiSimilarityMiner(epsilon=0.1)
        indices_tuple = miner(embeddings.float(), labels, _float(ref_emb), ref_labels)
    elif mode == "triplet_miner":
        miner = miners.TripletMarginMiner(margin=0.3, type_of_triplets="all")
        indices_tuple = miner(embeddings.float(), labels)
    if indices_tuple is not None:
        assert len(indices_tuple[0]) > 0, "the miner found nothing: the test is void"
    if mode == "ref_emb_miner":
        labels = ref_labels = None
    return embeddings, labels, indices_tuple, ref_emb, ref_labels


def _float(x):
    return None if x is None else x.float()


def ice_pairs_and_grads(
    embeddings, labels, indices_tuple, ref_emb, ref_labels, distance, **ice_kwargs
):
    """Per-pair losses of ICELoss (DoNothingReducer) and the gradients of their
    pair-weighted sum with respect to embeddings and ref_emb."""
    loss_func = losses.ICELoss(
        scale=SCALE, distance=distance, reducer=reducers.DoNothingReducer(), **ice_kwargs
    )
    leaves = [embeddings.detach().clone().requires_grad_()]
    if ref_emb is not None:
        leaves.append(ref_emb.detach().clone().requires_grad_())
    loss_dict = loss_func(
        leaves[0], labels, indices_tuple, leaves[1] if ref_emb is not None else None, ref_labels
    )
    info = loss_dict["loss"]
    anchors, positives = (t.tolist() for t in info["indices"])
    pairs = dict(zip(zip(anchors, positives), info["losses"]))
    assert len(pairs) == len(anchors), "a pair appears twice"
    weighted = sum(pair_weight(a, p) * value for (a, p), value in pairs.items())
    weighted.backward()
    return {k: v.detach() for k, v in pairs.items()}, [leaf.grad for leaf in leaves]


def reference_pairs_and_grads(embeddings, labels, indices_tuple, ref_emb, ref_labels, spec):
    leaves = [embeddings.detach().cpu().double().requires_grad_()]
    if ref_emb is not None:
        leaves.append(ref_emb.detach().cpu().double().requires_grad_())
    pairs = ice_pair_losses(
        leaves[0],
        None if labels is None else labels.cpu(),
        None if indices_tuple is None else tuple(t.cpu() for t in indices_tuple),
        leaves[1] if ref_emb is not None else None,
        None if ref_labels is None else ref_labels.cpu(),
        SCALE,
        spec,
    )
    weighted = sum(pair_weight(a, p) * value for (a, p), value in pairs.items())
    weighted.backward()
    return {k: v.detach() for k, v in pairs.items()}, [leaf.grad for leaf in leaves]


def check_same(agreement, category, actual, expected, loss_rtol, grad_rtol):
    actual_pairs, actual_grads = actual
    expected_pairs, expected_grads = expected
    assert set(actual_pairs) == set(expected_pairs)
    keys = sorted(expected_pairs)
    agreement.check(
        f"{category} per-pair losses",
        torch.stack([actual_pairs[k].double().cpu() for k in keys]),
        torch.stack([expected_pairs[k].double().cpu() for k in keys]),
        loss_rtol,
    )
    for which, actual_grad, expected_grad in zip(
        ("embeddings", "ref_emb"), actual_grads, expected_grads
    ):
        agreement.check(f"{category} grad {which}", actual_grad, expected_grad, grad_rtol)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("mode, path", MODES_AND_PATHS)
def test_chunked_equals_dense_and_reference(
    agreement, make_batch, distance_case, mode, path, chunk_size, monkeypatch
):
    use_symmetric_tiles(monkeypatch, path == "symmetric_tiles")
    spec, make_distance = distance_case
    inputs = make_inputs(make_batch, mode)
    chunked = ice_pairs_and_grads(
        *inputs, make_distance(), memory_efficient=True, chunk_size=chunk_size
    )
    dense = ice_pairs_and_grads(*inputs, make_distance(), memory_efficient=False)
    reference = reference_pairs_and_grads(*inputs, spec)
    check_same(agreement, "chunked vs dense float64", chunked, dense, 1e-12, 1e-11)
    check_same(agreement, "chunked vs reference float64", chunked, reference, 1e-9, 1e-8)


@pytest.mark.parametrize("normalize", ["batch", "anchor"])
@pytest.mark.parametrize(
    "mode, path",
    [("labels", "row_chunks"), ("labels", "symmetric_tiles"), ("triplet_miner", "row_chunks"),
     ("ref_emb", "row_chunks")],
)
def test_chunked_reduced_loss_and_grads_equal_dense(
    agreement, make_batch, mode, path, normalize, monkeypatch
):
    use_symmetric_tiles(monkeypatch, path == "symmetric_tiles")
    embeddings, labels, indices_tuple, ref_emb, ref_labels = make_inputs(
        make_batch, mode, torch.float32
    )
    results = []
    for memory_efficient in (True, False):
        loss_func = losses.ICELoss(
            scale=SCALE,
            reducer=reducers.ICEReweightReducer(lam=2.0, normalize=normalize),
            memory_efficient=memory_efficient,
            chunk_size=3 if memory_efficient else None,
        )
        leaf = embeddings.clone().requires_grad_()
        loss = loss_func(leaf, labels, indices_tuple, ref_emb, ref_labels)
        loss.backward()
        results.append((loss, leaf.grad))
    agreement.check("chunked vs dense reweighted loss float32", results[0][0], results[1][0], 1e-5)
    agreement.check("chunked vs dense reweighted grad float32", results[0][1], results[1][1], 1e-4)


def test_large_memory_bank(agreement, make_batch):
    """A reference set 40x the batch, chunk size 3."""
    embeddings, labels = make_batch(n=5, n_classes=3, seed=53, dtype=torch.float64)
    ref_emb, ref_labels = make_batch(n=200, n_classes=6, seed=54, dtype=torch.float64)
    inputs = (embeddings, labels, None, ref_emb, ref_labels)
    chunked = ice_pairs_and_grads(*inputs, CosineSimilarity(), memory_efficient=True, chunk_size=3)
    dense = ice_pairs_and_grads(*inputs, CosineSimilarity(), memory_efficient=False)
    check_same(agreement, "chunked vs dense float64 (memory bank)", chunked, dense, 1e-12, 1e-11)


@pytest.mark.parametrize("memory_efficient", [True, None])
def test_automatic_chunk_size_equals_dense(agreement, make_batch, memory_efficient):
    inputs = make_inputs(make_batch, "ref_emb")
    automatic = ice_pairs_and_grads(*inputs, CosineSimilarity(), memory_efficient=memory_efficient)
    dense = ice_pairs_and_grads(*inputs, CosineSimilarity(), memory_efficient=False)
    check_same(agreement, "automatic path vs dense float64", automatic, dense, 1e-12, 1e-11)


HALF_TOLERANCES = {
    # (chunked vs dense: losses, grads), (vs float64 reference: losses, grads)
    torch.float16: ((2e-3, 5e-3), (1e-2, 3e-2)),
    torch.bfloat16: ((1e-2, 3e-2), (3e-2, 8e-2)),
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["labels", "triplet_miner", "ref_emb"])
@pytest.mark.parametrize("distance_case", ["cosine", "lp_normalized"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_chunked_half_precision(agreement, make_batch, dtype, distance_case, mode):
    spec, make_distance = distance_case
    inputs = make_inputs(make_batch, mode, dtype)
    chunked = ice_pairs_and_grads(*inputs, make_distance(), memory_efficient=True, chunk_size=3)
    dense = ice_pairs_and_grads(*inputs, make_distance(), memory_efficient=False)
    reference = reference_pairs_and_grads(*inputs, spec)
    (dense_loss_rtol, dense_grad_rtol), (ref_loss_rtol, ref_grad_rtol) = HALF_TOLERANCES[dtype]
    name = str(dtype).replace("torch.", "")
    check_same(agreement, f"chunked vs dense {name}", chunked, dense, dense_loss_rtol, dense_grad_rtol)
    check_same(agreement, f"chunked vs reference {name}", chunked, reference, ref_loss_rtol, ref_grad_rtol)


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("distance_name", ["cosine", "lp"])
def test_constant_memory_bank(agreement, make_batch, memory_efficient, distance_name):
    """A bank that needs no gradient (as in CrossBatchMemory): the embeddings' gradient
    is the reference's, and none is computed for the bank."""
    distance, spec = {
        "cosine": (CosineSimilarity(), COSINE),
        "lp": (LpDistance(), DistanceSpec("lp")),
    }[distance_name]
    embeddings, labels = make_batch(n=6, n_classes=3, seed=55, dtype=torch.float64)
    bank, bank_labels = make_batch(n=30, n_classes=4, seed=56, dtype=torch.float64)
    loss_func = losses.ICELoss(
        scale=SCALE,
        distance=distance,
        reducer=reducers.DoNothingReducer(),
        memory_efficient=memory_efficient,
        chunk_size=4,
    )
    leaf = embeddings.clone().requires_grad_()
    info = loss_func(leaf, labels, ref_emb=bank, ref_labels=bank_labels)["loss"]
    weights = torch.tensor(
        [pair_weight(a, p) for a, p in zip(*(t.tolist() for t in info["indices"]))],
        dtype=torch.float64,
        device=info["losses"].device,
    )
    (weights * info["losses"]).sum().backward()
    _, (expected_grad, _) = reference_pairs_and_grads(
        embeddings, labels, None, bank, bank_labels, spec
    )
    agreement.check("constant bank grad embeddings float64", leaf.grad, expected_grad, 1e-11)
    assert bank.grad is None


@pytest.mark.slow
@pytest.mark.parametrize("memory_efficient", [True, False], ids=["tiles", "dense"])
def test_signed_upstream_gradients_match_the_reference(
    agreement, make_batch, memory_efficient, labels_path
):
    """Per-pair gradients of either sign (some zero): the tiles' sign handling and rows
    without a loss term, on uneven 5-row tiles of a 23-sample batch."""
    embeddings, labels = make_batch(n=23, n_classes=5, seed=31, dtype=torch.float64)

    def weight(anchor, positive):
        return float((7 * anchor + 3 * positive) % 5 - 2)

    leaf = embeddings.clone().requires_grad_()
    loss_func = losses.ICELoss(scale=SCALE, reducer=reducers.DoNothingReducer(),
                               memory_efficient=memory_efficient, chunk_size=5)
    info = loss_func(leaf, labels)["loss"]
    pairs = list(zip(*(t.tolist() for t in info["indices"])))
    sum(weight(a, p) * value for (a, p), value in zip(pairs, info["losses"])).backward()

    reference_leaf = embeddings.detach().cpu().requires_grad_()
    expected = ice_pair_losses(reference_leaf, labels.cpu(), scale=SCALE)
    assert set(expected) == set(pairs)
    sum(weight(a, p) * value for (a, p), value in expected.items()).backward()
    agreement.check("signed upstream grad embeddings float64", leaf.grad, reference_leaf.grad, 1e-9)


def test_no_pairs_are_built_when_no_anchor_has_a_negative(monkeypatch):
    """One label for the whole batch: the answer is zero, so no pair list may grow with
    the square of the batch."""
    built = []
    original = pairs.PairList.from_sorted.__func__

    def recording_from_sorted(cls, anchors, refs, num_anchors):
        built.append(len(anchors))
        return original(cls, anchors, refs, num_anchors)

    monkeypatch.setattr(pairs.PairList, "from_sorted", classmethod(recording_from_sorted))
    embeddings = torch.randn(3000, 4, requires_grad=True)
    labels = torch.zeros(3000, dtype=torch.long)
    value = losses.ICELoss(memory_efficient=True)(embeddings, labels)
    value.backward()
    assert value.item() == 0.0 and max(built) == 0
