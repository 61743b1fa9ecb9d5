"""PML's reducers, plus ICE's reweighting reducer."""

from pytorch_metric_learning.reducers import *  # noqa: F401,F403

from .ice_reweight_reducer import ICEReweightReducer  # noqa: F401
