"""Record-keeper logs of a resumed run: drop what was logged after the checkpoint.

A run killed after PML's hook saved an epoch's records but before the checkpoint was
written logs that epoch again when it resumes. Each table is keyed by ``~iteration~``:
the epoch for the tester's accuracies (which also have an ``epoch`` column), the global
training iteration for the others.
"""

import csv
import io
import sqlite3
from pathlib import Path

from ..storage.files import atomic_write_text

ITERATION = "~iteration~"


def _is_after(row: dict, epoch: int, first_iteration_after: int) -> bool:
    if "epoch" in row:
        return int(float(row["epoch"])) > epoch
    return int(float(row[ITERATION])) >= first_iteration_after


def _trim_csv(path: Path, epoch: int, first_iteration_after: int) -> None:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    if not fields or ITERATION not in fields:
        return
    kept = [r for r in rows if not _is_after(r, epoch, first_iteration_after)]
    if len(kept) < len(rows):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\r\n")  # as record-keeper writes
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(path, buffer.getvalue())


def _trim_database(path: Path, epoch: int, first_iteration_after: int) -> None:
    with sqlite3.connect(path) as db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            columns = {row[1] for row in db.execute(f'PRAGMA table_info("{table}")')}
            if "epoch" in columns:
                db.execute(f'DELETE FROM "{table}" WHERE epoch > ?', (epoch,))
            elif ITERATION in columns:
                db.execute(f'DELETE FROM "{table}" WHERE "{ITERATION}" >= ?', (first_iteration_after,))
    db.close()


def drop_records_after(folder, epoch: int, iterations_per_epoch: int) -> None:
    """Remove the records of epochs after ``epoch`` from the CSV files and logs.db in ``folder``."""
    folder = Path(folder)
    first_iteration_after = epoch * iterations_per_epoch
    for path in folder.glob("*.csv"):
        _trim_csv(path, epoch, first_iteration_after)
    if (folder / "logs.db").is_file():
        _trim_database(folder / "logs.db", epoch, first_iteration_after)
