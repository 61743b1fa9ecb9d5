"""Instance Cross Entropy (ICE) for pytorch-metric-learning."""

from . import losses, reducers  # noqa: F401

__version__ = "0.1.0"
