"""Start an experiment of ``python -m benchmarks.run``: processes, data, the --out folder, the loop.

The steps, one module each: settings -> data.registry (data) -> models -> training (PML
trainer and tester, one run) -> run_store (one run's files) -> experiment (the loop) ->
out_folder and report (results). ``run_experiment`` is shared by the commands that train.
"""

import contextlib
import datetime
import errno
import gc
import os
import sys
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from ..data.registry import DATASETS, load_dataset
from ..data.splits import BenchmarkData, DatasetNotInstalled
from .console import Console
from .experiment import Experiment, Finished, settings_lines
from .features import cached_features
from ..storage.files import BrokenFile
from .models import WeightsUnavailable, build_trunk
from .out_folder import IdentityMismatch, OutFolder
from .parallel_runs import threads_per_run
from .settings import Settings, UsageError

USER_ERRORS = (DatasetNotInstalled, WeightsUnavailable, UsageError, IdentityMismatch, BrokenFile, ValueError)


def start_processes(settings: Settings):
    """Start torch.distributed when launched by torchrun; return (rank, number of processes)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes <= 1:
        return 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if settings.device.startswith("cuda"):
        torch.cuda.set_device(local_rank)  # "cuda" then means this process's GPU
    torch.distributed.init_process_group(backend="nccl" if settings.device.startswith("cuda") else "gloo",
                                         timeout=datetime.timedelta(seconds=settings.timeout))
    return torch.distributed.get_rank(), processes


def check_batches(settings: Settings, data: BenchmarkData, processes: int) -> None:
    """Each process's share of the batch must be whole classes that the training split can fill."""
    share = settings.batch_size // processes
    if settings.batch_size % processes or share % settings.m_per_class:
        raise UsageError(f"--batch-size {settings.batch_size} must split into {processes} process(es) whose share "
                         f"is a multiple of --m-per-class {settings.m_per_class}")
    classes = len(np.unique(data.train.labels))
    if settings.m_per_class * classes < share:
        raise UsageError(f"--m-per-class {settings.m_per_class} x {classes} training classes cannot fill a batch "
                         f"of {share}; raise --m-per-class or lower --batch-size")


def prepare_data(settings: Settings, processes: int) -> BenchmarkData:
    """Load the data and check that the batches and the model can be built, before writing anything."""
    if processes > 1 and settings.jobs > 1:
        raise UsageError("--jobs trains runs side by side in processes of its own; under torchrun leave it at 1")
    data = load_dataset(settings.dataset, settings.data_root, settings.download, settings.image_size,
                        settings.val, settings.limit_per_class)
    check_batches(settings, data, processes)
    if not settings.freeze_trunk:
        build_trunk(settings.model, DATASETS[settings.dataset].channels, settings.pretrained)  # fail early on missing weights
    return data


def open_folder(settings: Settings, folder: OutFolder, data: BenchmarkData, console: Console, rank: int,
                processes: int) -> Tuple[BenchmarkData, Optional[int]]:
    """Check and claim the --out folder; return the data to train on and, for a frozen trunk,
    its feature size (the data are then the trunk's cached features)."""
    identity = dict(settings.identity(), processes=processes, torch_threads=threads_per_run(settings.jobs))
    folder.check_identity(identity)
    if rank == 0:
        folder.write_identity(identity)
    console.say("\n".join(settings_lines(settings, data, processes, [s.label for s in settings.losses])))
    if not settings.freeze_trunk:
        return data, None
    data = cached_features(settings, data, folder.path, rank, processes, console.say)
    return data, data.train.images.shape[1]


def refuse(prog: str, error: Exception, console: Console) -> int:
    """Print ``prog: error: ...`` on stderr; the exit status of a refused command."""
    console.stop()
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


# what a file system that cannot take a write says: full, over quota, read-only, not ours
UNWRITABLE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def run_experiment(settings: Settings, prog: str, publish: Callable[[Finished], None]) -> int:
    """Train and evaluate every (loss, seed) of ``settings`` in ``settings.out`` (rerunning resumes),
    then hand what the runs left to ``publish`` (rank 0; ``report.summary.publish_summary``
    writes the summary). Returns the exit status (2 when the data, the model or the folder refuse the settings, 1 when
    a file cannot be written or another process of a torchrun launch stopped answering for
    ``--timeout`` seconds)."""
    try:
        return _run_experiment(settings, prog, publish)
    except OSError as error:
        if error.errno not in UNWRITABLE:
            raise
        print(f"{prog}: error: cannot write {error.filename or settings.out}: {error.strerror}; the files written "
              "before are intact (each is replaced whole); make room or give a writable --out, then rerun to resume",
              file=sys.stderr)
        return 1


def _run_experiment(settings: Settings, prog: str, publish: Callable[[Finished], None]) -> int:
    rank, processes = start_processes(settings)
    try:
        return _run_in_processes(settings, prog, publish, rank, processes)
    finally:
        if processes > 1:
            gc.collect()  # DDP's reducers hold the process group: free them while the interpreter is whole
            torch.distributed.destroy_process_group()


def _run_in_processes(settings: Settings, prog: str, publish: Callable[[Finished], None], rank: int,
                      processes: int) -> int:
    console = Console(enabled=rank == 0, verbose=settings.verbose, quiet=settings.quiet)
    try:
        data = prepare_data(settings, processes)
    except USER_ERRORS as error:
        return refuse(prog, error, console)
    folder = OutFolder(settings.out)
    with contextlib.ExitStack() as held:
        try:
            if rank == 0:
                held.enter_context(folder.lock(console.say))
            if processes > 1:
                torch.distributed.barrier()  # the other ranks read the folder once rank 0 holds it
            data, feature_size = open_folder(settings, folder, data, console, rank, processes)
        except USER_ERRORS as error:
            return refuse(prog, error, console)
        try:
            Experiment(settings, data, folder, console, rank, processes, feature_size).run(publish)
            if processes > 1:
                torch.distributed.barrier()
        except RuntimeError as error:  # gloo and NCCL report a process that stopped answering this way
            if processes == 1 or "timed out" not in str(error).lower():
                raise
            console.stop()
            print(f"{prog}: error: process {rank} waited --timeout {settings.timeout} s for another process, which "
                  f"froze or died ({error}); rerun the command to resume, with a larger --timeout if one step of "
                  "training or evaluation takes that long", file=sys.stderr)
            return 1
    return 0
