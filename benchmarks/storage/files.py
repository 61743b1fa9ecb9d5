"""Atomic file writes: a reader (or a rerun after a kill) sees the old file or the new one.

Files get the mode a plain ``open`` would give them (0666 less the umask), not mkstemp's 0600.
"""

import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path, obj) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


class BrokenFile(ValueError):
    """A stored file cannot be read; the message names it."""


def read_json(path, default=None):
    """The JSON in ``path``, ``default`` when there is no such file; ``BrokenFile`` when unreadable."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BrokenFile(f"{path} cannot be read ({type(error).__name__}: {error})") from error


def read_torch(path):
    """What ``torch.save`` stored in ``path`` (on the CPU), read with ``weights_only=True``: tensors
    and plain Python values only, so a planted pickle cannot run code. ``BrokenFile`` otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise BrokenFile(f"{path} cannot be read as tensors and plain values ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from error
