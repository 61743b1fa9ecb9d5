"""The choice of ICE's path (logits held whole, or in chunks recomputed in backward)
and of its chunk sizes, with the predicates that say where a variant pays off."""

import math
from dataclasses import dataclass

import torch

# Anchor x reference logits held whole (the dense path, exponentials kept for backward)
# up to this many, and logits per chunk on the chunked path. A GPU has room for larger
# buffers than a CPU's RAM, and its products need them.
DENSE_LOGITS_LIMIT = {"cpu": 2**26, "accelerator": 2**28}
CHUNK_LOGITS = {"cpu": 2**24, "accelerator": 2**27}


def symmetric_tiles_pay_off(kind, dtype):
    """Whether labels within the batch take the symmetric tiles (two matrix products
    instead of four, more elementwise passes) on the chunked path: where the products
    dominate, i.e. on an accelerator outside half precision."""
    return kind == "accelerator" and dtype not in (torch.float16, torch.bfloat16)


def sparse_positives_pay_off(device):
    """Whether backward should put the positives into a sparse matrix (a CPU) rather
    than into the dense gradient of the logits (a GPU); see ``add_grads_from_exp``."""
    return device.type == "cpu"


@dataclass(frozen=True)
class ComputationPlan:
    """How ICE computes its logits: whole (``memory_efficient=False``, memory
    ``anchors x references``) or, recomputed in backward, in chunks of ``chunk_rows``
    anchors or, with ``symmetric_tiles`` and labels within the batch, in
    ``tile_rows`` x ``tile_rows`` tiles."""

    memory_efficient: bool
    chunk_rows: int
    symmetric_tiles: bool
    tile_rows: int


def plan_computation(
    num_anchors, num_refs, device, memory_efficient=None, chunk_size=None, dtype=torch.float32
):
    """The one place that chooses ICE's path and chunk size (``ICELoss`` and
    ``benchmarks/speed.py`` both ask it). ``memory_efficient=None`` chunks above the
    device's ``DENSE_LOGITS_LIMIT``; ``chunk_size`` overrides the rows per chunk and
    per tile side; ``dtype`` is the one the similarity product runs in."""
    kind = "cpu" if torch.device(device).type == "cpu" else "accelerator"
    if memory_efficient is None:
        memory_efficient = num_anchors * num_refs > DENSE_LOGITS_LIMIT[kind]
    chunk_rows = chunk_size or max(1, CHUNK_LOGITS[kind] // max(num_refs, 1))
    tile_rows = chunk_size or math.isqrt(CHUNK_LOGITS[kind])
    tiles = symmetric_tiles_pay_off(kind, dtype)
    return ComputationPlan(memory_efficient, chunk_rows, tiles, tile_rows)
