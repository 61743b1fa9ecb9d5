"""Rendered datasets cached as ``.npz`` files, written atomically, rendered again when unreadable."""

import io
import zipfile
from pathlib import Path
from typing import Callable, Dict, Sequence

import numpy as np

from ..storage.files import atomic_write_bytes
from .splits import DatasetNotInstalled


def cached_arrays(cache: Path, names: Sequence[str], compute: Callable[[], Dict[str, np.ndarray]],
                  dataset: str, folder_hint: str) -> Dict[str, np.ndarray]:
    """The arrays ``names`` stored in ``cache``; when it is missing, cannot be read (e.g.
    truncated) or lacks one of them, those ``compute`` returns, stored there first.
    A cache folder that is a file stops with ``folder_hint`` (what to do instead)."""
    cache = Path(cache)
    if cache.parent.exists() and not cache.parent.is_dir():
        raise DatasetNotInstalled(f"{dataset}: the cache folder {cache.parent} is a file; {folder_hint}")
    if cache.is_file():
        try:
            with np.load(cache) as stored:
                return {name: stored[name] for name in names}
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError):
            pass
    arrays = compute()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(cache, buffer.getvalue())
    return arrays
