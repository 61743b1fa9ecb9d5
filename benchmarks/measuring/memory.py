"""Memory probes: a process's resident memory now and at its peak, and fresh processes to
measure one step in.

The peak is Linux's ``VmHWM``: unlike ``ru_maxrss``, a process started by ``spawn`` (a fork
that then runs a new interpreter) does not report its parent's peak as its own.
"""

import multiprocessing
import os
import resource
from pathlib import Path

MIB = 2**20


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since it started (Linux ``VmHWM``; elsewhere
    ``ru_maxrss``, which macOS gives in bytes)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def current_rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_in_fresh_process(target, *args) -> None:
    """``target(*args)`` in a new interpreter (``spawn``), so its peak memory is its own."""
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"{target.__name__}{args[:2]} exited with code {process.exitcode}")
