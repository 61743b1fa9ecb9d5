from pytorch_metric_learning.trainers import MetricLossOnly
from pytorch_metric_learning.utils import common_functions as c_f

from ..checks import check_positive_integer
from ..utils.gradient_cache import GradientCache


class CachedMetricLossOnly(MetricLossOnly):
    """PML's MetricLossOnly with gradient caching (:func:`pml_ice.utils.cached_backward`):
    the trunk and embedder see ``chunk_size`` samples at a time, the miner and the
    loss the whole batch. Takes MetricLossOnly's arguments, plus:

    Args:
        chunk_size: samples per chunk of the forward and its re-forward (a positive
            integer); ``None`` caches nothing (MetricLossOnly's step).
        freeze_batchnorm: run the models' BatchNorm layers in eval mode during the
            cached step, where caching equals the uncached step exactly; otherwise
            each chunk is normalised by its own statistics.
    """

    def __init__(self, *args, chunk_size=256, freeze_batchnorm=False, **kwargs):
        if chunk_size is not None:
            check_positive_integer("CachedMetricLossOnly", "chunk_size", chunk_size)
        elif freeze_batchnorm:
            raise ValueError(
                "CachedMetricLossOnly: freeze_batchnorm applies to cached steps, but "
                "chunk_size is None; give a chunk_size, or use PML's freeze_trunk_batchnorm"
            )
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.freeze_batchnorm = freeze_batchnorm
        self.gradient_cache = None
        super().__init__(*args, **kwargs)

    def calculate_loss(self, curr_batch):
        if self.chunk_size is None:
            return super().calculate_loss(curr_batch)
        data, labels = curr_batch
        data = c_f.to_device(data, device=self.data_device, dtype=self.dtype)
        self.gradient_cache = GradientCache(
            self.compute_embeddings,
            data,
            self.chunk_size,
            self.freeze_batchnorm,
            modules=self.models.values(),
        )
        embeddings = self.gradient_cache.embeddings
        indices_tuple = self.maybe_mine_embeddings(embeddings, labels)
        self.losses["metric_loss"] = self.maybe_get_metric_loss(
            embeddings, labels, indices_tuple
        )

    def backward(self):
        super().backward()
        if self.gradient_cache is not None:
            self.gradient_cache.backward()
            self.gradient_cache = None
