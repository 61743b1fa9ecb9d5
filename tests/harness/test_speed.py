"""benchmarks/speed.py at tiny sizes: the candidates are run's loss specs plus 'floor',
one row per candidate, ratios to the floor, memory-only mode, clear errors."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from benchmarks import speed
from pml_ice.losses import ICELoss


def run_speed(tmp_path, *options):
    speed.main(["--device", "cpu", "--batches", "16", "--dim", "8", "--repeats", "2",
                "--warmup", "0", "--out", str(tmp_path), "--name", "t", *options])
    return json.loads((tmp_path / "t.json").read_text())["rows"], (tmp_path / "t.md").read_text()


@pytest.mark.slow
def test_one_row_per_candidate_with_ratios(tmp_path):
    rows, table = run_speed(
        tmp_path, "--time-only", "--losses", "floor,ice:scale=8,lam=2,multisimilarity,supcon"
    )
    assert [row["loss"] for row in rows] == ["floor", "ice:lam=2,scale=8", "multisimilarity", "supcon"]
    for row in rows:
        assert len(row["times_ms"]) == 2 and row["median_ms"] > 0
        assert row["x_floor"] == pytest.approx(row["median_ms"] / rows[0]["median_ms"])
        assert row["x_supcon"] == pytest.approx(row["median_ms"] / rows[3]["median_ms"])
        assert f"| 16 | {row['loss']} |" in table


@pytest.mark.slow
def test_memory_only_measures_a_fresh_process(tmp_path):
    rows, table = run_speed(tmp_path, "--memory-only", "--losses", "ice:memory_efficient=True,chunk_size=4")
    (row,) = rows
    assert "median_ms" not in row
    assert row["peak_bytes"] >= row["baseline_bytes"] > 0
    assert "MiB" in table


@pytest.mark.slow
def test_a_candidate_over_the_memory_budget_is_skipped(tmp_path):
    rows, _ = run_speed(tmp_path, "--time-only", "--max-memory", "0.000001", "--losses", "floor,pml_ntxent")
    assert all(row["skipped"].startswith("skipped (needs") for row in rows)


@pytest.mark.parametrize("losses, message", [
    ("floor,multisim", "unknown loss 'multisim'"),
    ("ice:scal=3", "unknown parameter 'scal'"),
    ("ice,ice", "give each candidate once"),
])
def test_bad_candidates_are_named(capsys, losses, message):
    with pytest.raises(SystemExit):
        speed.parse_args(["--losses", losses])
    assert message in capsys.readouterr().err


def test_ice_memory_estimate_follows_the_library_plan():
    """speed.py asks the library which path ICE takes, so its estimate is the chunk's."""
    ice = speed.parse_candidates("ice")[0]
    chunked = speed.parse_candidates("ice:memory_efficient=True,chunk_size=16")[0]
    dense_bytes = speed.estimate_step_bytes(ice, 4096, 0, 8, 4, torch.float32, "cpu")
    chunk_bytes = speed.estimate_step_bytes(chunked, 4096, 0, 8, 4, torch.float32, "cpu")
    assert dense_bytes > 30 * chunk_bytes


@pytest.mark.parametrize("name", ["ice", "ntxent"])
def test_ice_memory_estimate_grows_with_the_logits_of_the_plan(monkeypatch, name):
    """Every ICELoss candidate's estimate asks the loss itself (its computation_plan,
    with the step's sizes, pairs, device and dtype) how many logits it holds."""
    calls, peak = [], {"logits": 0}
    original = ICELoss.computation_plan

    def recording_plan(self, *args):
        calls.append(args)
        return dataclasses.replace(original(self, *args), peak_logits=peak["logits"])

    monkeypatch.setattr(ICELoss, "computation_plan", recording_plan)
    candidate = speed.parse_candidates(name)[0]
    without_logits = speed.estimate_step_bytes(candidate, 64, 256, 8, 4, torch.bfloat16, "cuda")
    peak["logits"] = 10**6
    with_logits = speed.estimate_step_bytes(candidate, 64, 256, 8, 4, torch.bfloat16, "cuda")
    assert calls == [(64, 256, False, "cuda", torch.bfloat16)] * 2
    assert with_logits - without_logits >= 10**6 * 2


def test_speed_imports_nothing_private_from_the_library():
    tree = ast.parse(Path(speed.__file__).read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name and name.startswith("pml_ice") and "._" in name]
