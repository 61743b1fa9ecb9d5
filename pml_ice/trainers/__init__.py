"""PML's trainers, plus CachedMetricLossOnly: a drop-in for
``pytorch_metric_learning.trainers``."""

from pytorch_metric_learning.trainers import *  # noqa: F401,F403

from .cached_metric_loss_only import CachedMetricLossOnly  # noqa: F401
