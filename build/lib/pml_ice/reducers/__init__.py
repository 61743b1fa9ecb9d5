"""PML's reducers, plus ICE's reweighting reducer: a drop-in for
``pytorch_metric_learning.reducers``."""

from pytorch_metric_learning.reducers import *  # noqa: F401,F403

from .ice_reweight_reducer import ICEReweightReducer  # noqa: F401
from .per_anchor_reducer import PerAnchorReducer  # noqa: F401
