"""The harness tests train one run at a time on one thread (so ``--jobs auto`` means 1), in
this process and in the commands they start as subprocesses; the library tests keep torch's
threads."""

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)
