"""The one place that chooses ICE's path: which per-pair computation runs, its chunk or
tile sizes, and how many logits it holds at its peak; with the predicates that say where
a variant pays off. ``ICELoss.computation_plan`` is its public face."""

import enum
import math
from dataclasses import dataclass
from typing import Optional

import torch

# Anchor x reference logits held whole (the exponentials kept for backward) up to this
# many, and logits per chunk (or tile) when they are recomputed in backward. A GPU has
# room for larger buffers than a CPU's RAM, and its products need them.
DENSE_LOGITS_LIMIT = {"cpu": 2**26, "accelerator": 2**28}
CHUNK_LOGITS = {"cpu": 2**24, "accelerator": 2**27}
# Tiles held at once on the symmetric-tile path: a tile and the two temporaries of its
# log-sum-exp update.
TILES_AT_PEAK = 3


class ComputationPath(str, enum.Enum):
    """ICE's ways of computing its per-pair losses (each compares equal to its name):

    - ``label_mask``: pairs from labels, logits held whole, negatives by comparing labels;
    - ``pair_lists_whole``: sorted pair lists (a miner), logits held whole (filled chunk
      by chunk);
    - ``pair_lists_in_chunks``: sorted pair lists (a miner, or labels), one chunk of
      anchor rows at a time, recomputed in backward;
    - ``symmetric_tiles``: labels within the batch and inner-product logits: square tiles
      of the symmetric ``Z``, each serving two blocks of rows, recomputed in backward.
    """

    LABEL_MASK = "label_mask"
    PAIR_LISTS_WHOLE = "pair_lists_whole"
    PAIR_LISTS_IN_CHUNKS = "pair_lists_in_chunks"
    SYMMETRIC_TILES = "symmetric_tiles"


@dataclass(frozen=True)
class ComputationPlan:
    """The path ICE takes and the sizes it needs: ``chunk_rows`` anchor rows per chunk on
    the pair-list paths, ``tile_rows`` rows per tile side on the symmetric tiles (None
    where the path has none), and ``peak_logits``, the logits it holds at once at its
    forward's peak (the whole matrix, one chunk, or ``TILES_AT_PEAK`` tiles)."""

    path: ComputationPath
    chunk_rows: Optional[int]
    tile_rows: Optional[int]
    peak_logits: int


def device_kind(device):
    return "cpu" if torch.device(device).type == "cpu" else "accelerator"


def symmetric_tiles_pay_off(kind, dtype):
    """Whether labels within the batch take the symmetric tiles (two matrix products
    instead of four, more elementwise passes) rather than row chunks when the logits are
    recomputed: where the products dominate, i.e. on an accelerator outside half precision."""
    return kind == "accelerator" and dtype not in (torch.float16, torch.bfloat16)


def sparse_positives_pay_off(device):
    """Whether backward should put the positives into a sparse matrix (a CPU) rather
    than into the dense gradient of the logits (a GPU); see ``add_grads_from_exp``."""
    return device.type == "cpu"


def plan_computation(
    num_anchors,
    num_refs,
    device,
    dtype=torch.float32,
    *,
    mined_pairs=False,
    refs_are_batch=True,
    inner_product=True,
    memory_efficient=None,
    chunk_size=None,
):
    """ICE's path for ``num_anchors`` anchors against ``num_refs`` references on ``device``,
    the similarity product in ``dtype``; pairs from an indices tuple (``mined_pairs``) or
    from labels; references that are the batch itself (``refs_are_batch``) or not; logits
    from a plain inner product (``inner_product``) or from another distance.

    ``memory_efficient=None`` recomputes the logits in backward when
    ``num_anchors x num_refs`` exceeds the device's ``DENSE_LOGITS_LIMIT``; ``True``
    always does, ``False`` never does. ``chunk_size`` overrides the rows per chunk and per
    tile side (default: about ``CHUNK_LOGITS`` logits per chunk or tile)."""
    kind = device_kind(device)
    if memory_efficient is None:
        memory_efficient = num_anchors * num_refs > DENSE_LOGITS_LIMIT[kind]
    chunk_rows = chunk_size or max(1, CHUNK_LOGITS[kind] // max(num_refs, 1))
    whole = num_anchors * num_refs
    if not memory_efficient:
        if mined_pairs:
            return ComputationPlan(ComputationPath.PAIR_LISTS_WHOLE, chunk_rows, None, whole)
        return ComputationPlan(ComputationPath.LABEL_MASK, None, None, whole)
    if (
        not mined_pairs
        and refs_are_batch
        and inner_product
        and symmetric_tiles_pay_off(kind, dtype)
    ):
        tile_rows = chunk_size or math.isqrt(CHUNK_LOGITS[kind])
        peak = TILES_AT_PEAK * min(num_anchors, tile_rows) ** 2
        return ComputationPlan(ComputationPath.SYMMETRIC_TILES, None, tile_rows, peak)
    peak = min(num_anchors, chunk_rows) * num_refs
    return ComputationPlan(ComputationPath.PAIR_LISTS_IN_CHUNKS, chunk_rows, None, peak)


def chunk_ranges(num_rows, chunk_rows):
    """``(start, end)`` of each chunk of ``chunk_rows`` rows (or of each tile side)."""
    return [(start, min(start + chunk_rows, num_rows)) for start in range(0, num_rows, chunk_rows)]
