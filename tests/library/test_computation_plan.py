"""ICELoss.computation_plan names the path ICELoss takes (labels or mined pairs, with or
without ref_emb, a cosine or an Lp distance, the CPU dtypes, memory_efficient True /
False / None, a chunk size), and the device's rule: the dense limit, the chunk and tile
sizes, and the logits each path holds at its peak."""

import math

import pytest
import torch
from pytorch_metric_learning import miners
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

from conftest import use_symmetric_tiles
from pml_ice import losses
from pml_ice.losses._ice import plan
from pml_ice.losses._ice.label_mask_losses import ICELabelLosses
from pml_ice.losses._ice.pair_list_losses import ICEPairLosses
from pml_ice.losses._ice.symmetric_tile_losses import ICESymmetricTiles

BATCH, BANK = 10, 14


@pytest.fixture
def paths_taken(monkeypatch):
    """``(path, size)`` of every per-pair computation ICELoss runs: the autograd
    Function it applies, and the chunk rows or tile side it hands it."""
    taken = []
    label_mask, pair_lists = ICELabelLosses.apply, ICEPairLosses.apply
    tiles = ICESymmetricTiles.apply

    def record_label_mask(*args):
        taken.append(("label_mask", None))
        return label_mask(*args)

    def record_pair_lists(queries, refs, kernel, pairs, chunk_rows, save_exp):
        taken.append(("pair_lists_whole" if save_exp else "pair_lists_in_chunks", chunk_rows))
        return pair_lists(queries, refs, kernel, pairs, chunk_rows, save_exp)

    def record_tiles(queries, kernel, labels, positives, side):
        taken.append(("symmetric_tiles", side))
        return tiles(queries, kernel, labels, positives, side)

    monkeypatch.setattr(ICELabelLosses, "apply", record_label_mask)
    monkeypatch.setattr(ICEPairLosses, "apply", record_pair_lists)
    monkeypatch.setattr(ICESymmetricTiles, "apply", record_tiles)
    return taken


def expected_path(pairs, ref_emb, distance, memory_efficient, tiles_pay_off):
    """The rule, for a batch far below the dense limit."""
    if not memory_efficient:
        return "label_mask" if pairs == "labels" else "pair_lists_whole"
    if pairs == "labels" and not ref_emb and distance == "cosine" and tiles_pay_off:
        return "symmetric_tiles"
    return "pair_lists_in_chunks"


@pytest.mark.parametrize("tiles_pay_off", [False, True], ids=["no_tiles", "tiles_pay_off"])
@pytest.mark.parametrize("chunk_size", [None, 3], ids=["chunk_auto", "chunk3"])
@pytest.mark.parametrize("memory_efficient", [None, True, False], ids=lambda v: f"me_{v}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("distance", ["cosine", "lp"])
@pytest.mark.parametrize("ref_emb", [False, True], ids=["batch", "ref_emb"])
@pytest.mark.parametrize("pairs", ["labels", "miner"])
def test_the_plan_names_the_path_iceloss_takes(
    make_batch, paths_taken, monkeypatch, pairs, ref_emb, distance, dtype, memory_efficient,
    chunk_size, tiles_pay_off,
):
    use_symmetric_tiles(monkeypatch, tiles_pay_off)
    embeddings, labels = make_batch(n=BATCH, n_classes=3, seed=7, dtype=dtype)
    bank = bank_labels = None
    if ref_emb:
        bank, bank_labels = make_batch(n=BANK, n_classes=3, seed=8, dtype=dtype)
    indices_tuple = None
    if pairs == "miner":
        miner = miners.MultiSimilarityMiner(epsilon=0.5)
        float_bank = None if bank is None else bank.float()
        indices_tuple = miner(embeddings.float(), labels, float_bank, bank_labels)
        assert len(indices_tuple[0]) > 0, "the miner found nothing: the test is void"
    loss_func = losses.ICELoss(
        distance=CosineSimilarity() if distance == "cosine" else LpDistance(),
        memory_efficient=memory_efficient, chunk_size=chunk_size,
    )
    loss_func(embeddings, labels, indices_tuple, bank, bank_labels)

    computation = loss_func.computation_plan(
        BATCH, BANK if ref_emb else None, pairs == "miner", embeddings.device, dtype
    )
    tiled = computation.path == "symmetric_tiles"
    size = computation.tile_rows if tiled else computation.chunk_rows
    assert paths_taken == [(computation.path, size)]
    expected = expected_path(pairs, ref_emb, distance, memory_efficient, tiles_pay_off)
    assert computation.path == expected
    if chunk_size is not None and computation.path != "label_mask":
        assert size == chunk_size


@pytest.mark.parametrize("device, kind", [("cpu", "cpu"), ("cuda", "accelerator")])
def test_the_dense_limit_chunks_and_tiles_per_device(device, kind):
    """memory_efficient=None holds the logits whole up to the device's limit; chunks and
    tiles hold about the device's chunk of logits; tiles only outside half precision on
    an accelerator, and only for labels within the batch."""
    ice = losses.ICELoss()
    limit, chunk = plan.DENSE_LOGITS_LIMIT[kind], plan.CHUNK_LOGITS[kind]
    side = math.isqrt(limit)
    assert side * side == limit
    assert ice.computation_plan(side, device=device).path == "label_mask"
    mined = ice.computation_plan(side, device=device, mined_pairs=True)
    assert mined.path == "pair_lists_whole"
    above = ice.computation_plan(side + 1, side, device=device)
    assert above.path == "pair_lists_in_chunks"
    assert above.chunk_rows == chunk // side
    assert above.peak_logits == above.chunk_rows * side

    tiled = ice.computation_plan(side + 1, device=device)
    assert tiled.path == ("symmetric_tiles" if kind == "accelerator" else "pair_lists_in_chunks")
    if kind == "accelerator":
        assert tiled.tile_rows == math.isqrt(chunk) and tiled.chunk_rows is None
        assert tiled.peak_logits == plan.TILES_AT_PEAK * tiled.tile_rows**2
        for half in (torch.float16, torch.bfloat16):
            rows = ice.computation_plan(side + 1, device=device, dtype=half)
            assert rows.path == "pair_lists_in_chunks"
        rows = ice.computation_plan(side + 1, device=device, mined_pairs=True)
        assert rows.path == "pair_lists_in_chunks"
    lp = losses.ICELoss(distance=LpDistance())
    assert lp.computation_plan(side + 1, device=device).path == "pair_lists_in_chunks"


def test_memory_efficient_and_chunk_size_override_the_rule():
    forced = losses.ICELoss(memory_efficient=True, chunk_size=7)
    assert forced.computation_plan(20, device="cuda").tile_rows == 7
    rows = forced.computation_plan(20, 30, device="cuda")
    assert (rows.path, rows.chunk_rows, rows.peak_logits) == ("pair_lists_in_chunks", 7, 7 * 30)
    assert forced.computation_plan(5, 30).peak_logits == 5 * 30  # a chunk is at most the batch
    huge = 10 * math.isqrt(plan.DENSE_LOGITS_LIMIT["accelerator"])
    whole = losses.ICELoss(memory_efficient=False).computation_plan(huge, device="cuda")
    assert (whole.path, whole.peak_logits) == ("label_mask", huge * huge)
