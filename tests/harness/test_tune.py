"""Tuning: tune -> best.toml -> run --config, test split never touched, kill and resume,
two processes sharing one study, and bad requests."""

import csv
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from benchmarks import run, tune
from benchmarks.core import features, launch, loss_specs, models, training, tuning
from benchmarks.storage.files import read_torch
from benchmarks.core.models import build_trunk
from benchmarks.core.settings import resolve
from benchmarks.data.transforms import RandomAffineImages

REPO = Path(__file__).resolve().parents[2]
TINY = ["--dataset", "digits", "--epochs", "1", "--limit-per-class", "30", "--batch-size", "32", "--m-per-class", "8"]


def trials_of(out, loss, dataset="digits"):
    study = optuna.load_study(study_name=f"{dataset}-{loss}", storage=f"sqlite:///{out / 'tuning.db'}")
    return study.get_trials(deepcopy=False)


@pytest.mark.slow
def test_tune_then_run_with_the_tuned_config(tmp_path):
    out = tmp_path / "tune"
    assert tune.main(TINY + ["--trials", "2", "--losses", "ice,ntxent", "--out", str(out)]) == 0
    for loss in ("ice", "ntxent"):
        assert [t.state for t in trials_of(out, loss)] == [optuna.trial.TrialState.COMPLETE] * 2
        assert (out / "plots" / f"{loss}.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "tuning.md").read_text()
    assert report.count("| complete |") == 4 and "test split not loaded" in report
    toml = (out / "best.toml").read_text()
    assert 'epochs = 1\n' in toml and 'limit_per_class = 30\n' in toml and "seeds = 5\n" in toml
    best = {loss: max((t for t in trials_of(out, loss)), key=lambda t: (t.value, -t.number)).user_attrs["loss"]
            for loss in ("ice", "ntxent")}
    assert f'losses = "{best["ice"]},{best["ntxent"]}"\n' in toml

    final = tmp_path / "final"
    assert run.main(["--config", str(out / "best.toml"), "--seeds", "1", "--out", str(final)]) == 0
    with open(final / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["loss"], r["epoch"]) for r in rows] == [(best[l], e) for l in ("ice", "ntxent") for e in ("0", "1")]


class SealedSplit:
    """A test split that fails on any use."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was used while tuning ({name})")

    def __len__(self):
        raise AssertionError("the test split was used while tuning (len)")


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [False, True], ids=["trained-trunk", "frozen-trunk"])
def test_tuning_never_touches_the_test_split(tmp_path, monkeypatch, frozen):
    real_load = launch.load_dataset

    def load_with_sealed_test(*args, **kwargs):
        return dataclasses.replace(real_load(*args, **kwargs), test=SealedSplit())

    monkeypatch.setattr(launch, "load_dataset", load_with_sealed_test)
    evaluated = []

    class RunRecordingRows(tuning.Run):
        def execute(self):
            result = super().execute()
            evaluated.extend(result.rows)
            return result

    monkeypatch.setattr(tuning, "Run", RunRecordingRows)
    flags = ["--freeze-trunk"] if frozen else []
    assert tune.main(TINY + flags + ["--trials", "1", "--losses", "ntxent", "--out", str(tmp_path)]) == 0
    assert [r["epoch"] for r in evaluated] == [0, 1]
    assert all("mean_average_precision_at_r" not in r and 0 <= r["val_mean_average_precision_at_r"] <= 1 for r in evaluated)


@pytest.mark.slow
def test_killed_tuning_resumes_keeping_finished_trials(tmp_path, monkeypatch):
    argv = TINY + ["--trials", "3", "--losses", "ntxent", "--out", str(tmp_path)]
    real = tuning.validation_map_at_r
    calls = {"n": 0}

    def killed_in_third_trial(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(tuning, "validation_map_at_r", killed_in_third_trial)
    with pytest.raises(KeyboardInterrupt):
        tune.main(argv)
    before = [(t.number, t.state, t.value, t.params) for t in trials_of(tmp_path, "ntxent")]
    assert [s for _, s, _, _ in before] == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.FAIL]

    monkeypatch.setattr(tuning, "validation_map_at_r", real)
    assert tune.main(argv) == 0
    after = trials_of(tmp_path, "ntxent")
    assert [(t.number, t.state, t.value, t.params) for t in after[:3]] == before
    assert [t.state for t in after[3:]] == [optuna.trial.TrialState.COMPLETE]
    assert after[3].params == before[2][3]  # the killed trial's setting is tried again
    assert "| 2 | fail (not counted) |" in (tmp_path / "tuning.md").read_text()
    assert tune.main(argv) == 0  # the budget is spent: nothing more runs
    assert len(trials_of(tmp_path, "ntxent")) == 4


@pytest.mark.slow
def test_two_processes_share_one_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    command = [sys.executable, "-m", "benchmarks.tune", *TINY, "--trials", "2", "--losses", "ntxent", "--storage", storage]
    processes = [subprocess.Popen(command + ["--out", str(tmp_path / f"p{i}")], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    study = optuna.load_study(study_name="digits-ntxent", storage=storage)
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    # Two separate studies would hold 4 trials; a shared one stops at 2, or 3 when both started the last.
    assert 2 <= len(finished) <= 3
    assert not (tmp_path / "p0" / "tuning.db").exists()
    for i in range(2):  # each process reports every trial of the shared study
        assert (tmp_path / f"p{i}" / "tuning.md").read_text().count("| complete") >= len(finished) - 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--losses", "ice,circle"], "no search space for circle; --losses takes names of losses that can be tuned: ice, ntxent"),
        (["--losses", "ice,ice"], "loss given twice"),
        (["--losses", "ice:scale=3"], "no search space for ice:scale=3"),
        (["--trials", "0"], "--trials and --seeds must be at least 1"),
        (["--storage", "nosuchdb://x"], "--storage 'nosuchdb://x': optuna cannot open this database"),
        (["--epochs", "-1"], "--epochs must be an integer >= 0"),
    ],
)
def test_bad_requests_fail_before_training(tmp_path, capsys, argv, message):
    assert tune.main(argv + ["--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_an_out_naming_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    assert tune.main(TINY + ["--out", str(existing)]) == 2
    assert f"--out {existing} is a file, not a folder; choose another --out" in capsys.readouterr().err
    assert existing.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [existing]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tn?x", "a%41b", "c#d", "e{f}g", "h i"])
def test_the_default_database_lies_in_its_folder_whatever_the_folder_s_name(tmp_path, name):
    """The folder name was pasted into the SQLite URL: 'tn?x' put the database in ./tn."""
    folder = tmp_path / name
    folder.mkdir()
    tuning.open_storage(tuning.sqlite_url(folder / "tuning.db")).engine.dispose()
    assert (folder / "tuning.db").is_file() and sorted(tmp_path.iterdir()) == [folder]


@pytest.mark.slow
def test_two_out_folders_whose_names_differ_after_a_question_mark_keep_their_own_studies(tmp_path, capsys):
    for name in ("tn?x", "tn?y"):
        assert tune.main(TINY + ["--trials", "1", "--losses", "ntxent", "--out", str(tmp_path / name)]) == 0
        assert "tuning ntxent: 0/1 trials finished" in capsys.readouterr().out  # a new study each time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tn?x", "tn?y"]
    for name in ("tn?x", "tn?y"):
        storage = f"sqlite:///{tmp_path / name / 'tuning.db'}".replace("?", "%3F")
        study = optuna.load_study(study_name="digits-ntxent", storage=storage)
        assert len(study.get_trials()) == 1


def test_a_damaged_database_is_named_as_damaged(tmp_path, capsys):
    damaged = tmp_path / "tuning.db"
    damaged.write_bytes(b"not a database")
    assert tune.main(["--storage", f"sqlite:///{damaged}", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the database cannot be read" in err and "restore it, or move it aside" in err
    assert "give a SQLAlchemy URL" not in err


@pytest.mark.slow
def test_a_study_tuned_with_another_budget_is_refused(tmp_path, capsys):
    argv = TINY + ["--trials", "1", "--losses", "ntxent", "--out", str(tmp_path)]
    assert tune.main(argv) == 0
    assert tune.main(argv + ["--lr", "0.01"]) == 2
    assert "study 'digits-ntxent' in the storage was tuned with other settings (lr: 0.001 there, 0.01 now)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_study_without_trials_takes_the_current_budget(tmp_path, monkeypatch):
    trained = scripted_values(monkeypatch)
    argv = TINY + ["--trials", "1", "--losses", "ntxent", "--out", str(tmp_path)]
    study = optuna.create_study(study_name="digits-ntxent", storage=f"sqlite:///{tmp_path / 'tuning.db'}")
    study.set_user_attr("settings", {"lr": 0.01})  # left by a process that stopped before its first trial
    assert tune.main(argv) == 0 and len(trained) == 1


@pytest.mark.slow
def test_diverged_trials_are_pruned_and_count_toward_the_budget(tmp_path, monkeypatch):
    values = iter([None, 0.25, 0.5])

    def scripted(opts, data, spec, seed, run_dir, on_epoch):
        value = next(values)
        if value is None:
            raise tuning.NonFiniteLossError(f"loss '{spec.label}' is nan at epoch 1, iteration 2")
        return value

    monkeypatch.setattr(tuning, "validation_map_at_r", scripted)
    assert tune.main(TINY + ["--trials", "3", "--losses", "ntxent", "--out", str(tmp_path)]) == 0
    trials = trials_of(tmp_path, "ntxent")
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] + [optuna.trial.TrialState.COMPLETE] * 2
    assert "is nan at epoch 1" in trials[0].user_attrs["error"]
    assert "| 0 | diverged | - |" in (tmp_path / "tuning.md").read_text()
    assert f'losses = "{trials[2].user_attrs["loss"]}"' in (tmp_path / "best.toml").read_text()


def scripted_curves(monkeypatch, curves, warm_until=0):
    """Trials whose best validation MAP@R so far after epochs 1, 2, ... follows ``curves`` in
    turn; the last one is warming up until epoch ``warm_until``. Returns the epochs trained."""
    epochs_trained = []

    def scripted(opts, data, spec, seed, run_dir, on_epoch):
        number = epochs_trained.count(1)  # trials trained before this one
        for epoch, value in enumerate(curves[number], start=1):
            epochs_trained.append(epoch)
            on_epoch(epoch, value, number == len(curves) - 1 and epoch <= warm_until)
        return curves[number][-1]

    monkeypatch.setattr(tuning, "validation_map_at_r", scripted)
    return epochs_trained


@pytest.mark.slow
def test_successive_halving_prunes_a_trial_behind_the_others_and_the_report_counts_it(tmp_path, monkeypatch):
    epochs_trained = scripted_curves(monkeypatch, [[0.5] * 9, [0.6] * 9, [0.1] * 9])
    assert tune.main(TINY + ["--trials", "3", "--losses", "ntxent", "--out", str(tmp_path)]) == 0
    trials = trials_of(tmp_path, "ntxent")
    # at epoch 3 (the first rung) the third trial is not in the best third of the three: pruned there
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert trials[2].last_step == 3 and epochs_trained.count(4) == 2
    report = (tmp_path / "tuning.md").read_text()
    assert "trials per loss: 3\n" in report and "| ntxent | 2 | 1 | 0 | 60.00 |" in report
    assert "| 2 | pruned | 10.00 | 3 |" in report and "SuccessiveHalvingPruner(min_resource=3" in report


@pytest.mark.slow
def test_a_trial_still_warming_up_is_not_pruned(tmp_path, monkeypatch):
    scripted_curves(monkeypatch, [[0.5] * 9, [0.6] * 9, [0.1] * 9], warm_until=5)
    assert tune.main(TINY + ["--trials", "3", "--losses", "ntxent", "--out", str(tmp_path)]) == 0
    trials = trials_of(tmp_path, "ntxent")
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert trials[2].last_step == 6  # judged at the first epoch after its warm-up


@pytest.mark.slow
def test_proxyanchor_learning_rate_is_part_of_its_spec(tmp_path):
    assert tune.main(TINY + ["--trials", "1", "--losses", "proxyanchor,arcface", "--out", str(tmp_path)]) == 0
    spec = loss_specs.parse_loss_spec(trials_of(tmp_path, "proxyanchor")[0].user_attrs["loss"])
    assert 1e-4 <= spec.loss_lr <= 0.1
    best = (tmp_path / "best.toml").read_text()
    assert f"loss_lr={spec.loss_lr}" in best and "\nloss_lr = 0.01\n" in best  # --loss-lr keeps its default


def test_undefined_validation_metric_stops_with_a_clear_error(tmp_path, capsys):
    # 5 images per class: every fifth image validates, one per class, so no validation query has a match.
    argv = ["--dataset", "digits", "--limit-per-class", "5", "--batch-size", "20", "--m-per-class", "4", "--epochs", "1",
            "--trials", "1", "--losses", "ntxent", "--out", str(tmp_path)]
    assert tune.main(argv) == 2
    assert "validation MAP@R is undefined" in capsys.readouterr().err


def test_a_feature_cache_made_while_tuning_is_completed_by_a_run(tmp_path):
    settings = resolve(TINY + ["--freeze-trunk"])
    data = launch.prepare_data(settings, 1)
    said = []
    tuned = features.cached_features(settings, dataclasses.replace(data, test=None), tmp_path, 0, 1, said.append)
    assert tuned.test is None and set(read_torch(tmp_path / "cache" / "trunk_features.pt")) == {"train", "val"}
    final = features.cached_features(settings, data, tmp_path, 0, 1, said.append)
    assert len(said) == 2 and final.test.images.shape == (len(data.test), tuned.train.images.shape[1])
    assert set(read_torch(tmp_path / "cache" / "trunk_features.pt")) == {"train", "val", "test"}


def test_a_frozen_trunk_sees_the_training_images_unaugmented(tmp_path):
    settings = resolve(TINY + ["--freeze-trunk", "--model", "cnn"])
    data = launch.prepare_data(settings, 1)
    images = data.train.images
    augmented = dataclasses.replace(data, train=RandomAffineImages(images, data.train.labels, degrees=30))
    cached = features.cached_features(settings, augmented, tmp_path, 0, 1, lambda text: None)
    models.seed_everything(0)
    trunk = build_trunk("cnn", data.train.images.shape[1]).eval()
    with torch.no_grad():
        assert torch.allclose(cached.train.images, trunk(images), atol=1e-5)


@pytest.mark.slow
def test_a_storage_password_is_never_written_or_printed(tmp_path, monkeypatch, capsys):
    url = "postgresql+psycopg2://bench:hunter2@127.0.0.1:5433/optuna"
    assert tune.main(["--storage", url, "--out", str(tmp_path / "refused")]) == 2  # no driver or server here
    assert "hunter2" not in capsys.readouterr().err
    local = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'tuning.db'}")
    monkeypatch.setattr(tuning, "open_storage", lambda given: local if given == url else pytest.fail(given))
    out = tmp_path / "tune"
    assert tune.main(TINY + ["--trials", "1", "--losses", "ntxent", "--storage", url, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    written = (out / "best.toml").read_text() + (out / "tuning.md").read_text()
    assert "postgresql+psycopg2://bench:***@127.0.0.1:5433/optuna" in written
    assert "hunter2" not in written + printed.out + printed.err


def test_credentials_are_masked_in_any_url():
    assert tuning.mask_credentials("a://u:p@h/x b://v:q:r@h c://h:80/y sqlite:////d/t.db") == \
        "a://u:***@h/x b://v:***@h c://h:80/y sqlite:////d/t.db"


def scripted_values(monkeypatch):
    """Replace training by a value of the setting, recording every setting trained."""
    trained = []

    def fake(opts, data, spec, seed, run_dir, on_epoch):
        trained.append(spec.label)
        return 0.5
    monkeypatch.setattr(tuning, "validation_map_at_r", fake)
    return trained


@pytest.mark.slow
def test_resumed_and_parallel_samplers_propose_new_settings(tmp_path, monkeypatch):
    trained = scripted_values(monkeypatch)
    argv = TINY + ["--losses", "ntxent", "--out", str(tmp_path)]
    for trials in (1, 2, 3):  # three processes, each resuming the study
        assert tune.main(argv + ["--trials", str(trials)]) == 0
    assert len(trained) == 3 and len(set(trained)) == 3
    storage = f"sqlite:///{tmp_path / 'tuning.db'}"  # two processes asking at once, on the same history
    asked = [optuna.load_study(study_name="digits-ntxent", storage=storage, sampler=tuning.TrialSeededTPE(0)).ask()
             for _ in range(2)]
    assert len({*trained, *(tuning.trial_spec("ntxent", t).label for t in asked)}) == 5


@pytest.mark.slow
def test_a_duplicate_setting_fails_without_training_and_is_not_counted(tmp_path, monkeypatch):
    trained = scripted_values(monkeypatch)
    argv = TINY + ["--losses", "ntxent", "--out", str(tmp_path)]
    assert tune.main(argv + ["--trials", "1"]) == 0
    study = optuna.load_study(study_name="digits-ntxent", storage=f"sqlite:///{tmp_path / 'tuning.db'}")
    temperature = trials_of(tmp_path, "ntxent")[0].params["temperature"]
    study.enqueue_trial({"temperature": temperature * (1 + 1e-6)})  # the same setting once rounded
    assert tune.main(argv + ["--trials", "2"]) == 0
    trials = trials_of(tmp_path, "ntxent")
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                                         optuna.trial.TrialState.COMPLETE]
    assert trials[1].user_attrs["error"] == "same setting as trial 0"
    assert len(trained) == 2 and len(set(trained)) == 2
    assert tune.main(argv + ["--trials", "2"]) == 0  # a finished study: the duplicate is not queued again
    assert len(trials_of(tmp_path, "ntxent")) == 3 and len(trained) == 2


@pytest.mark.slow
def test_a_trial_of_a_dead_process_is_failed_retried_and_its_folder_removed(tmp_path, monkeypatch):
    trained = scripted_values(monkeypatch)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = optuna.create_study(study_name="digits-ntxent", storage=f"sqlite:///{tmp_path / 'tuning.db'}",
                                direction="maximize")
    killed = study.ask()
    killed.set_user_attr("process", f"{tuning.socket.gethostname()}:{dead.pid}")
    spec = tuning.trial_spec("ntxent", killed)
    killed.set_user_attr("loss", spec.label)
    (tmp_path / "trials" / "ntxent-0-abc").mkdir(parents=True)
    assert tune.main(TINY + ["--losses", "ntxent", "--out", str(tmp_path), "--trials", "2"]) == 0
    trials = trials_of(tmp_path, "ntxent")
    assert trials[0].state == optuna.trial.TrialState.FAIL
    assert [t.state for t in trials[1:]] == [optuna.trial.TrialState.COMPLETE] * 2
    assert trials[1].params == trials[0].params and trials[1].user_attrs["retry_of"] == 0
    assert trained[0] == spec.label and len(set(trained)) == 2
    assert not (tmp_path / "trials" / "ntxent-0-abc").exists()


def test_a_queued_trial_holds_the_setting_it_will_get(tmp_path):
    study = optuna.create_study(study_name="digits-ntxent", storage=f"sqlite:///{tmp_path / 'tuning.db'}")
    study.enqueue_trial({"temperature": 0.25})
    (waiting,) = study.get_trials(deepcopy=False)
    assert waiting.state == optuna.trial.TrialState.WAITING and not waiting.params
    trial = study.ask({"temperature": optuna.distributions.FloatDistribution(0.0001, 1.0, log=True)})
    assert tuning.setting_key(waiting) == tuning.setting_key(study.get_trials(deepcopy=False)[0]) \
        == '{"temperature": 0.25}' and trial.params == {"temperature": 0.25}


def test_an_emptied_database_is_refused_before_the_report_is_overwritten(tmp_path, monkeypatch, capsys):
    scripted_values(monkeypatch)
    argv = TINY + ["--losses", "ntxent", "--out", str(tmp_path), "--trials", "1"]
    assert tune.main(argv) == 0
    report, toml = (tmp_path / "tuning.md").read_text(), (tmp_path / "best.toml").read_text()
    (tmp_path / "tuning.db").write_bytes(b"")
    assert tune.main(argv) == 2
    assert "tuning.md reports trials of ntxent that the storage does not hold" in capsys.readouterr().err
    assert (tmp_path / "tuning.md").read_text() == report and (tmp_path / "best.toml").read_text() == toml


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # the test asks by hand
def test_a_trial_whose_heartbeat_stopped_on_another_host_is_retried(tmp_path, monkeypatch):
    trained = scripted_values(monkeypatch)
    monkeypatch.setattr(tuning, "HEARTBEAT_S", 1)
    monkeypatch.setattr(tuning, "STALE_AFTER_S", 1)
    url = f"sqlite:///{tmp_path / 'tuning.db'}"
    storage = tuning.open_storage(url)
    study = optuna.create_study(study_name="digits-ntxent", storage=storage, direction="maximize")
    killed = study.ask()
    killed.set_user_attr("process", "another-host:1")
    spec = tuning.trial_spec("ntxent", killed)
    killed.set_user_attr("loss", spec.label)
    storage.record_heartbeat(killed._trial_id)
    time.sleep(2.5)
    assert tune.main(TINY + ["--losses", "ntxent", "--out", str(tmp_path), "--trials", "2", "--storage", url]) == 0
    trials = trials_of(tmp_path, "ntxent")
    assert trials[0].state == optuna.trial.TrialState.FAIL
    assert [t.state for t in trials[1:]] == [optuna.trial.TrialState.COMPLETE] * 2
    assert spec.label in trained and len(set(trained)) == 2


def test_a_best_trial_at_an_edge_of_its_space_is_named():
    from types import SimpleNamespace

    from benchmarks.core.loss_registry import LOSSES
    from benchmarks.report.tuning_report import edge_text

    scale, lam = LOSSES["ice"].search_space[:2]  # scale log-uniform in [1, 1e4], lam uniform in [0, 4]
    assert (scale.edge(1.5), scale.edge(100.0), scale.edge(9000.0)) == ("low", None, "high")
    assert (lam.edge(0.1), lam.edge(2.0), lam.edge(3.9)) == ("low", None, "high")
    best = SimpleNamespace(params={"scale": 9000.0, "lam": 2.0, "normalize": "batch"})
    assert edge_text("ice", best, 4) == "scale 9000 (the high end of scale in [1, 10000] log-uniform)"
    assert edge_text("ice", SimpleNamespace(params={"scale": 100.0, "lam": 2.0, "normalize": "anchor"}), 4) == ""


def test_a_parameter_without_effect_at_the_best_trial_is_no_edge():
    from types import SimpleNamespace

    from benchmarks.report.tuning_report import edge_text, inert_text

    lam_high = {"scale": 100.0, "lam": 3.94}
    anchor, batch = SimpleNamespace(params={**lam_high, "normalize": "anchor"}), SimpleNamespace(params={**lam_high, "normalize": "batch"})
    assert edge_text("ice", anchor, 2) == "" and inert_text("ice", anchor, 2).startswith("lam 3.94 (anchor normalisation")
    assert edge_text("ice", anchor, 4).startswith("lam 3.94 (the high end") and inert_text("ice", anchor, 4) == ""
    assert edge_text("ice", batch, 2).startswith("lam 3.94 (the high end") and inert_text("ice", batch, 2) == ""
    hard = SimpleNamespace(params={"margin": 0.99, "miner_type_of_triplets": "hard"})
    assert edge_text("triplet", hard, 4) == "" and inert_text("triplet", hard, 4).startswith("margin 0.99")
    semihard = SimpleNamespace(params={"margin": 0.99, "miner_type_of_triplets": "semihard"})
    assert edge_text("triplet", semihard, 4).startswith("margin 0.99 (the high end")


def value_and_grad(loss_func, embeddings, labels):
    embeddings = embeddings.clone().requires_grad_(True)
    loss = loss_func(embeddings, labels)
    loss.backward()
    return loss.detach(), embeddings.grad


def test_lam_has_no_effect_with_anchor_normalisation_and_one_positive_per_anchor():
    from pml_ice import losses, reducers

    torch.manual_seed(0)
    embeddings, labels = torch.randn(12, 8, dtype=torch.float64), torch.arange(6).repeat_interleave(2)

    def ice(lam, normalize):
        return losses.ICELoss(scale=20.0, reducer=reducers.ICEReweightReducer(lam=lam, normalize=normalize))

    plain = value_and_grad(ice(0.0, "anchor"), embeddings, labels)
    value, grad = value_and_grad(ice(4.0, "anchor"), embeddings, labels)
    assert torch.allclose(value, plain[0]) and torch.allclose(grad, plain[1])
    weighted = value_and_grad(ice(4.0, "batch"), embeddings, labels)
    assert not torch.allclose(weighted[1], plain[1])  # batch normalisation: lam does act


def test_the_margin_has_no_effect_on_hard_triplets():
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners

    torch.manual_seed(0)
    embeddings, labels = torch.randn(16, 8, dtype=torch.float64), torch.arange(4).repeat_interleave(4)

    def triplet_grad(margin, kind):
        miner = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets=kind)
        loss_func = pml_losses.TripletMarginLoss(margin=margin)
        return value_and_grad(lambda e, l: loss_func(e, l, miner(e, l)), embeddings, labels)[1]

    assert torch.allclose(triplet_grad(0.1, "hard"), triplet_grad(0.9, "hard"))
    assert not torch.allclose(triplet_grad(0.1, "all"), triplet_grad(0.9, "all"))
