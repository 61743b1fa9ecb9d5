"""The example scripts run as the docs say."""

import pytest

from torchrun import REPO, run_two_processes


@pytest.mark.slow
def test_ddp_cached_example_trains_under_torchrun():
    """DDP + sharded ICE + gradient caching on the CPU: it runs, reports from rank 0 only,
    and the global loss falls."""
    stdout = run_two_processes([str(REPO / "examples" / "ddp_cached.py"), "--steps", "20",
                                "--batch-per-process", "64", "--chunk-size", "16"])
    lines = stdout.splitlines()
    assert lines[0] == "2 processes x 64 samples = global batch 128, chunks of 16"
    steps = [line.split() for line in lines[1:]]
    assert [words[1] for words in steps] == ["1", "10", "20"]
    first, last = float(steps[0][-1]), float(steps[-1][-1])
    assert last < 0.7 * first, (first, last)
