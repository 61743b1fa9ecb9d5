"""One run's folder (``runs/<loss>/seed<k>/``): its checkpoint, rows, failure and status.

``run.json`` names the run (its loss label and seed), written when the run starts. The
checkpoint, written after every evaluated epoch, holds the rows so far with the state
to resume from; ``failed.json`` marks a run stopped by an error. All are written
atomically. A stored file that cannot be read (truncated, emptied, edited) is moved aside
to ``<name>.broken`` and the run starts again from scratch: ``StoredRun.note`` says so.
"""

import dataclasses
from pathlib import Path
from typing import List, Optional, Tuple

from ..storage.files import BrokenFile, atomic_torch_save, atomic_write_json, read_json, read_torch

CHECKPOINT_KEYS = ("epoch", "stopped_early", "rows", "models", "optimizers", "loss", "rng")
RunKey = Tuple[str, int]  # (loss label, seed)


@dataclasses.dataclass
class StoredRun:
    """Status 'new', 'partial', 'finished' or 'failed', the rows so far, the error of a failed
    run, the checkpoint of a partial or finished one and a note on a broken file moved aside."""

    status: str
    rows: List[dict]
    error: Optional[str] = None
    checkpoint: Optional[dict] = None
    note: Optional[str] = None
    key: Optional[RunKey] = None  # (loss label, seed) from run.json; None for a new run


class RunStore:
    """The files of one (loss, seed) run under ``folder``."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.identity_path = self.folder / "run.json"
        self.checkpoint_path = self.folder / "checkpoint.pth"
        self.failure_path = self.folder / "failed.json"
        self.logs = self.folder / "logs"
        self.tensorboard = self.folder / "tensorboard"

    def load(self, epochs: int, restart_broken: bool = True) -> StoredRun:
        """Read the folder once; a run is finished once stopped early or trained ``epochs`` epochs,
        and tested at its best validation epoch.
        A broken file is set aside for a restart, or (``restart_broken=False``) only reported."""
        try:
            failure = self._read_failure()
            if failure is not None:
                return StoredRun("failed", failure["rows"], error=failure["error"], key=self._key(failure["rows"]))
            checkpoint = self._read_checkpoint()
            if checkpoint is None:
                return StoredRun("new", [])
            key = self._key(checkpoint["rows"])
        except BrokenFile as error:
            if not restart_broken:
                return StoredRun("new", [], note=f"{error}; its rows are left out until a command that runs it")
            return StoredRun("new", [], note=self._set_aside(error))
        trained = checkpoint["stopped_early"] or checkpoint["epoch"] >= epochs
        finished = trained and checkpoint.get("tested", True)  # the test split evaluated at the best epoch
        return StoredRun("finished" if finished else "partial", checkpoint["rows"], checkpoint=checkpoint, key=key)

    def save_identity(self, label: str, seed: int) -> None:
        """``run.json``: the loss label and seed of the run in this folder."""
        atomic_write_json(self.identity_path, {"loss": label, "seed": seed})

    def _key(self, rows: List[dict]) -> Optional[RunKey]:
        """(loss label, seed) from run.json; a folder made before run.json existed is named by its
        first row. None when neither is there (a failure before the first evaluation)."""
        identity = read_json(self.identity_path)
        if identity is not None:
            if not (isinstance(identity, dict) and isinstance(identity.get("loss"), str)
                    and isinstance(identity.get("seed"), int)):
                raise BrokenFile(f"{self.identity_path} does not hold a loss label and a seed")
            return identity["loss"], identity["seed"]
        return (rows[0]["loss"], rows[0]["seed"]) if rows else None

    def save_checkpoint(self, state: dict) -> None:
        atomic_torch_save(self.checkpoint_path, state)

    def save_failure(self, error: str, rows: List[dict]) -> None:
        atomic_write_json(self.failure_path, {"error": error, "rows": rows})

    def _read_failure(self) -> Optional[dict]:
        failure = read_json(self.failure_path)
        if failure is not None and not (isinstance(failure, dict) and {"error", "rows"} <= set(failure)):
            raise BrokenFile(f"{self.failure_path} does not hold an error and rows")
        return failure

    def _read_checkpoint(self) -> Optional[dict]:
        if not self.checkpoint_path.is_file():
            return None
        checkpoint = read_torch(self.checkpoint_path)
        if not (isinstance(checkpoint, dict) and set(CHECKPOINT_KEYS) <= set(checkpoint)):
            raise BrokenFile(f"{self.checkpoint_path} is not a checkpoint of this harness")
        return checkpoint

    def _set_aside(self, error: BrokenFile) -> str:
        """Move the unreadable files to ``*.broken`` so that the run restarts cleanly."""
        for path in (self.failure_path, self.checkpoint_path):
            try:
                path.replace(path.with_name(path.name + ".broken"))
            except FileNotFoundError:  # absent, or moved by another process of this command
                pass
        return f"{error}; moved aside to *.broken, the run starts again"
