"""The measuring commands' shared probes."""

import json
import resource

import torch

from benchmarks.measuring import inputs, memory


def report_peaks(path):
    with open(path, "w") as out:
        json.dump({"peak": memory.peak_rss_bytes(),
                   "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, out)


def test_a_fresh_process_reports_its_own_peak_not_its_parent_s(tmp_path):
    held = torch.ones(2000 * memory.MIB // 4)  # 2000 MiB resident in this process
    assert memory.current_rss_bytes() > 2000 * memory.MIB
    memory.run_in_fresh_process(report_peaks, str(tmp_path / "peaks.json"))
    peaks = json.loads((tmp_path / "peaks.json").read_text())
    assert peaks["peak"] < 2000 * memory.MIB < memory.peak_rss_bytes()
    # what ru_maxrss would have said in the child: the parent's size at the fork
    assert peaks["ru_maxrss"] > 2000 * memory.MIB
    del held


def test_class_labels_have_the_samples_per_class_in_a_seeded_order():
    labels = inputs.class_labels(12, 4, torch.Generator().manual_seed(0))
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert labels.tolist() == inputs.class_labels(12, 4, torch.Generator().manual_seed(0)).tolist()
    assert labels.tolist() != sorted(labels.tolist())
