"""A frozen trunk: its features are computed once per --out folder and stand in for the images.

Only the splits the data holds are embedded: tuning loads no test split (``test=None``)."""

from pathlib import Path

import torch
from pytorch_metric_learning import testers

from ..data.registry import DATASETS
from ..data.splits import BenchmarkData, TensorImageDataset
from ..data.transforms import RandomAffineImages
from ..storage.files import BrokenFile, atomic_torch_save, read_torch
from .models import build_trunk, seed_everything
from .settings import Settings


def _splits(data: BenchmarkData) -> list:
    return [split for split in ("train", "val", "test") if getattr(data, split) is not None]


def _compute_features(settings: Settings, data: BenchmarkData, cache: Path) -> dict:
    seed_everything(0)
    trunk = build_trunk(settings.model, DATASETS[settings.dataset].channels, settings.pretrained).to(settings.device).eval()
    tester = testers.GlobalEmbeddingSpaceTester(
        normalize_embeddings=False, batch_size=settings.eval_batch_size,
        dataloader_num_workers=settings.num_workers, data_device=torch.device(settings.device),
    )
    features = {}
    for split in _splits(data):
        images = getattr(data, split)
        if isinstance(images, RandomAffineImages):  # a frozen trunk's features are computed once, unaugmented
            images = images.unaugmented()
        embeddings, _ = tester.get_all_embeddings(images, trunk)
        features[split] = embeddings.cpu()
    atomic_torch_save(cache, features)
    return features


def cached_features(settings: Settings, data: BenchmarkData, out: Path, rank: int, world: int, log) -> BenchmarkData:
    """``data`` with its images replaced by the frozen trunk's features, computed by rank 0
    when the cache is missing, cannot be read or lacks one of the splits of ``data``."""
    cache = out / "cache" / "trunk_features.pt"
    features = None
    if rank == 0:
        try:
            features = read_torch(cache) if cache.is_file() else None
        except BrokenFile as error:
            log(f"{error}; computing the features again")
        if features is None or not set(_splits(data)) <= set(features):
            log(f"computing {settings.model} features of {sum(len(getattr(data, s)) for s in _splits(data))} "
                "images once")
            features = _compute_features(settings, data, cache)
    if world > 1:
        torch.distributed.barrier()
    if features is None:
        features = read_torch(cache)
    return BenchmarkData(
        train=TensorImageDataset(features["train"], data.train.labels),
        val=TensorImageDataset(features["val"], data.val.labels),
        test=TensorImageDataset(features["test"], data.test.labels) if data.test is not None else None,
    )
