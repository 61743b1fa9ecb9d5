"""The --out folder of an experiment: its lock, its identity (config.json), its run folders
and the files published from all of them (results.csv, summary.md, plots).

One command at a time works in a folder: a second one waits for the lock; a folder the
command cannot write is only read. Every publication is rebuilt from the rows of every run
folder on disk, so runs made by earlier commands with other --losses or --seeds stay in
results.csv and summary.md, in its paired comparisons too.
"""

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from .query_scores import load_run_scores
from .results import best_epoch_rows, sort_rows, write_results_csv
from ..storage.files import BrokenFile, atomic_write_json, read_json
from .run_store import RunKey, RunStore
from .settings import UsageError, stored_identity



class IdentityMismatch(ValueError):
    """The folder holds runs made with other settings."""


class OutFolder:
    def __init__(self, path):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.results_csv = self.path / "results.csv"
        self.summary = self.path / "summary.md"
        self.read_only = False  # set by ``lock`` when the command cannot write the folder

    @contextlib.contextmanager
    def lock(self, say):
        """Hold ``.lock`` for the whole command; wait (saying so) while another command holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / ".lock"
        try:  # never through a link: a planted .lock -> victim would have the victim truncated
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as error:
            if lock.is_symlink():
                raise UsageError(f"{lock} is a symbolic link; remove it (the lock file must be a plain file)") from error
            if error.errno not in (errno.EROFS, errno.EACCES):
                raise
            self.read_only = True  # nothing can be written: the command only reads and prints
            yield
            return
        with os.fdopen(fd, "r+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                say(f"another command (pid {handle.read().strip() or '?'}) is running on {self.path}; "
                    "waiting for it to finish")
                fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def stored_settings(self) -> Optional[dict]:
        """The settings in config.json, None without one; ``BrokenFile`` naming the file when it
        cannot be read, holds no settings or holds an ``epochs`` that is not a count."""
        try:
            stored = read_json(self.config)
        except BrokenFile as error:
            raise BrokenFile(f"{error}. Restore it, or delete it if the runs under {self.path} were made "
                             "with this command's settings (it is then written again)") from error
        if stored is None:
            return None
        if not isinstance(stored, dict):
            raise BrokenFile(f"{self.config} does not hold the settings of {self.path}; restore or delete it")
        epochs = stored.get("epochs", 0)
        if not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 0):
            raise BrokenFile(f"{self.config}: 'epochs' must be a count of epochs (an integer >= 0), got {epochs!r}; "
                             "restore the file")
        return stored

    def check_identity(self, identity: dict) -> None:
        """Refuse a folder whose config.json names other settings (more epochs extend its runs);
        name a broken config.json. Settings an older config.json lacks are not compared."""
        stored = self.stored_settings()
        if stored is None:
            return
        stored = stored_identity(stored)
        differing = [k for k in identity if k in stored and stored[k] != identity[k]
                     and not (k == "epochs" and stored[k] < identity[k])]
        if differing:
            details = ", ".join(f"{k}: {stored.get(k)!r} there, {identity[k]!r} now" for k in differing)
            raise IdentityMismatch(f"{self.path} holds runs made with other settings ({details}); choose another --out")

    def settings_of_runs(self) -> dict:
        """config.json's settings, completed with the values of fields an older one lacks (a
        folder without ``patience`` counts as a fixed budget); ``UsageError`` when it has none."""
        stored = self.stored_settings()
        if stored is None or "epochs" not in stored:
            raise UsageError(f"{self.path} has no config.json with the settings of its runs; "
                             "pass --out folders of benchmarks.run")
        return {"patience": None, **stored_identity(stored)}

    def write_identity(self, identity: dict) -> None:
        """config.json: ``identity``, keeping the settings an existing one has but this harness does not know."""
        stored = read_json(self.config) or {}
        if {**stored, **identity} != stored:
            atomic_write_json(self.config, {**stored, **identity})

    def run_store(self, folder_name: str, seed: int) -> RunStore:
        return RunStore(self.path / "runs" / folder_name / f"seed{seed}")

    def other_run_stores(self, known: Sequence[RunStore]) -> List[RunStore]:
        """Run folders on disk that this command does not run (earlier commands' losses or seeds)."""
        known_folders = {store.folder for store in known}
        found = sorted(p.parent for p in (self.path / "runs").glob("*/seed*/checkpoint.pth"))
        found += sorted(p.parent for p in (self.path / "runs").glob("*/seed*/failed.json"))
        return [RunStore(folder) for folder in dict.fromkeys(found) if folder not in known_folders]

    def finished_runs(self, epochs: int):
        """Rows and folder of every run on disk that trained ``epochs`` epochs or stopped early
        (``epochs=0``: every run with a checkpoint), keyed by (loss label, seed); and a note on
        each run left out (failed, unfinished, or with a file that cannot be read) with its key
        (None when its files do not say)."""
        rows, run_folders, left_out = {}, {}, []
        for store in self.other_run_stores([]):
            stored = store.load(epochs, restart_broken=False)
            if stored.status == "finished" and stored.rows:
                rows[stored.key], run_folders[stored.key] = stored.rows, store.folder
            elif stored.note:
                left_out.append((None, stored.note))
            elif stored.status == "failed":
                left_out.append((stored.key, f"{store.folder} failed ({stored.error}); left out"))
            elif stored.status == "partial":
                trained, stopped = stored.checkpoint["epoch"], stored.checkpoint["stopped_early"]
                state = ("is not tested yet" if stopped or trained >= epochs
                         else f"has trained {trained} of {epochs} epochs")
                left_out.append((stored.key, f"{store.folder} {state}; left out until a command finishes it"))
        return rows, run_folders, left_out

    def best_epochs(self, epochs: int, keep: Callable[[RunKey], bool] = lambda key: True):
        """Per loss label of the finished runs whose (label, seed) ``keep`` accepts: each run's
        row at its best validation epoch, and the runs' test scores by seed; then the notes on
        the runs left out (``finished_runs``, and runs whose test scores cannot be read)."""
        rows_by_run, run_folders, left_out = self.finished_runs(epochs)
        keys = [key for key in rows_by_run if keep(key)]
        best = best_epoch_rows([row for key in keys for row in rows_by_run[key]])
        scores, without_scores = load_run_scores({key: run_folders[key] for key in keys})
        notes = [note for key, note in left_out if key is None or keep(key)]
        return best, scores, notes + list(without_scores.values())

    def publish_rows(self, rows_by_run: Dict[RunKey, List[dict]], loss_order: Sequence[str]) -> None:
        """results.csv: every row of every run, failed runs included."""
        if not self.read_only:
            write_results_csv(self.results_csv, sort_rows([r for rows in rows_by_run.values() for r in rows], loss_order))
