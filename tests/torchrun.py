"""Two processes under torchrun from a test, one CPU thread each."""

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_two_processes(arguments, timeout=300):
    """stdout of ``torchrun --nproc_per_node 2 <arguments>`` run in the repository; a failed
    run fails the test with its stderr, and a run past ``timeout`` is killed with its workers."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *arguments]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers
        process.communicate()
        raise
    assert process.returncode == 0, stderr[-3000:]
    return stdout
