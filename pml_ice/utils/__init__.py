"""Tools for large batches: an exact sharded ICE over processes and gradient caching."""

from . import distributed  # noqa: F401
from .gradient_cache import GradientCache, cached_backward  # noqa: F401
