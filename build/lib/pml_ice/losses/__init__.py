"""PML's losses, plus ICELoss and wrappers that accept it: a drop-in for
``pytorch_metric_learning.losses``."""

from pytorch_metric_learning.losses import *  # noqa: F401,F403

from .cross_batch_memory import CrossBatchMemory  # noqa: F401
from .ice_loss import ICELoss  # noqa: F401
from .self_supervised_loss import SelfSupervisedLoss  # noqa: F401
