"""Tools for large batches: an exact sharded ICE over processes and gradient caching."""

from . import distributed  # noqa: F401
