"""The settings dataclass, the dataset registry, the console and --amp."""

import dataclasses
import re

import pytest
import torch

from benchmarks import run
from benchmarks.core import launch, loss_registry, loss_specs, settings, training
from benchmarks.data import registry
from benchmarks.data.registry import DATASETS

TINY = ["--dataset", "digits", "--epochs", "1", "--seeds", "1", "--limit-per-class", "20", "--batch-size", "16", "--m-per-class", "4",
        "--patience", "-1"]


def test_every_setting_has_a_default_help_a_check_and_an_identity_flag():
    for field in dataclasses.fields(settings.Settings):
        assert field.default is not dataclasses.MISSING, field.name
        assert field.metadata["help"] and callable(field.metadata["check"]), field.name
        assert isinstance(field.metadata["identity"], bool), field.name


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_per_dataset_defaults_come_from_the_registry(name):
    entry = DATASETS[name]
    resolved = settings.resolve(["--dataset", name])
    assert {k: getattr(resolved, k) for k in entry.training} == entry.training
    assert (resolved.model, resolved.image_size) == (entry.default_model, entry.image_size)
    assert resolved.out == f"results/{name}"
    # Any option overrides the dataset's default.
    assert settings.resolve(["--dataset", name, "--epochs", "2"]).epochs == 2


def test_help_lists_every_dataset_with_its_defaults_and_install_hint(capsys):
    with pytest.raises(SystemExit):
        settings.resolve(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, entry in DATASETS.items():
        assert f"{name} ({entry.size};" in text
        assert f"epochs={entry.training['epochs']}" in text


def test_the_digits_split_sizes_in_the_table_are_those_loaded():
    data = registry.load_dataset("digits")
    sizes = [(len(split), len(set(split.labels.tolist()))) for split in (data.train, data.val, data.test)]
    assert sizes == [(723, 5), (178, 5), (896, 5)]
    assert "5 training classes (723 images; 178 more validate" in DATASETS["digits"].split
    assert "5 test classes (896 images)" in DATASETS["digits"].split


def test_registry_loader_gets_only_the_options_it_takes():
    data = registry.load_dataset("digits", root="/ignored", image_size=99, limit=20)
    assert len(data.test) == 100 and data.test[0][0].shape[0] == DATASETS["digits"].channels


@pytest.mark.slow
def test_console_one_line_per_run_verbose_epochs_quiet_table_and_no_pml_bars(capsys, tmp_path):
    argv = TINY + ["--losses", "ice,ntxent", "--out", str(tmp_path / "out")]
    assert run.main(argv + ["--verbose"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len([line for line in lines if re.match(r"(ice|ntxent) seed 0: best epoch \d, val MAP@R [\d.]+, "
                                                   r"test MAP@R [\d.]+, [\d.]+ s$", line)]) == 2
    assert len([line for line in lines if re.match(r"    (ice|ntxent) seed 0 epoch 0: val MAP@R [\d.]+, "
                                                   r"test MAP@R [\d.]+$", line)]) == 2
    assert len([line for line in lines if re.match(r"    (ice|ntxent) seed 0 epoch 1: val MAP@R [\d.]+$", line)]) == 2
    assert len(lines) <= 30
    assert "total_loss=" not in captured.err and "it/s" not in captured.err
    assert run.main(argv + ["--quiet"]) == 0  # finished runs: prints the table again
    quiet = capsys.readouterr().out
    assert quiet.lstrip().startswith("Test metrics") and "| `ntxent` | 1 |" in quiet
    assert "seed 0" not in quiet and "Wrote" not in quiet


@pytest.mark.slow
@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_autocasts_training_on_the_cpu(tmp_path, monkeypatch, amp, dtype):
    dtypes = []
    original = training.BenchmarkTrainer.compute_embeddings

    def record_dtype(self, data):
        embeddings = original(self, data)
        dtypes.append(embeddings.dtype)
        return embeddings

    monkeypatch.setattr(training.BenchmarkTrainer, "compute_embeddings", record_dtype)
    assert run.main(TINY + ["--amp", amp, "--device", "cpu", "--losses", "ice", "--out", str(tmp_path / "o")]) == 0
    assert dtypes and set(dtypes) == {dtype}
    assert f'"amp": "{amp}"' in (tmp_path / "o" / "config.json").read_text()
    checkpoint = torch.load(tmp_path / "o" / "runs" / "ice" / "seed0" / "checkpoint.pth", weights_only=True)
    assert (checkpoint["scaler"] is not None) == (amp == "fp16")  # the GradScaler's state resumes with the run


def amp_step(loss_name, amp, chunk_size):
    """One optimizer step of BenchmarkTrainer under ``amp`` (fp16 with its GradScaler)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8), torch.arange(8).repeat_interleave(4)
    trunk, embedder = torch.nn.Flatten(), torch.nn.Linear(64, 16)
    loss, _ = loss_specs.make_loss_spec(loss_name, {}).build(num_classes=8, embedding_size=16)
    optimizers = {"embedder_optimizer": torch.optim.Adam(embedder.parameters()),
                  "metric_loss_optimizer": torch.optim.Adam(loss.parameters())}
    trainer = training.BenchmarkTrainer(
        models={"trunk": trunk, "embedder": embedder}, optimizers=optimizers, batch_size=32,
        loss_funcs={"metric_loss": loss}, mining_funcs={}, dataset=torch.utils.data.TensorDataset(x, y),
        data_device=torch.device("cpu"), amp=amp, chunk_size=chunk_size,
        scaler=torch.amp.GradScaler("cpu") if amp == "fp16" else None)
    trainer.epoch = trainer.iteration = 1
    trainer.calculate_loss((x, y))
    trainer.loss_tracker.update(trainer.loss_weights)
    trainer.backward()
    trainer.step_optimizers()
    return loss


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
@pytest.mark.parametrize("chunk_size", [None, 8])
@pytest.mark.parametrize("loss_name", ["proxyanchor", "arcface", "normsoftmax"])
def test_a_loss_s_own_parameters_stay_float32_under_amp(loss_name, amp, chunk_size):
    """PyTorch's AMP recipe: parameters stay float32, autocast picks each op's dtype (fp16
    gradients would stop the GradScaler: "Attempting to unscale FP16 gradients")."""
    loss = amp_step(loss_name, amp, chunk_size)
    for parameter in loss.parameters():
        assert parameter.dtype == parameter.grad.dtype == torch.float32
        assert torch.isfinite(parameter).all()


def test_fp16_trains_a_loss_with_proxies(tmp_path):
    out = tmp_path / "o"
    assert run.main(TINY + ["--amp", "fp16", "--cache-chunk", "8", "--losses", "proxyanchor", "--out", str(out)]) == 0
    checkpoint = torch.load(out / "runs" / "proxyanchor" / "seed0" / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["loss"]["proxies"].dtype == torch.float32


def test_default_losses_come_from_the_dataset_tuned_file(tmp_path, monkeypatch):
    """The main job runs each loss at the settings `benchmarks.tune` chose for the dataset."""
    monkeypatch.setattr(settings, "TUNED_FOLDER", tmp_path)
    assert [s.label for s in settings.resolve(["--dataset", "digits"]).losses] == \
        loss_registry.DEFAULT_LOSSES.split(",")
    (tmp_path / "digits.toml").write_text('losses = "ice:lam=2.0,scale=8.0,ntxent:temperature=0.1"\n')
    resolved = settings.resolve(["--dataset", "digits"])
    assert [s.label for s in resolved.losses] == ["ice:lam=2,scale=8", "ntxent:temperature=0.1"]  # one text per value
    assert resolved.seeds == (0, 1, 2, 3, 4)  # only the losses are taken from the tuned file
    explicit = settings.resolve(["--dataset", "digits", "--losses", "supcon"])
    assert [s.label for s in explicit.losses] == ["supcon"]


def test_a_tuned_file_with_other_settings_is_refused(tmp_path, monkeypatch):
    """The tuned file of a dataset holds only its losses: a budget there would be read by nothing."""
    monkeypatch.setattr(settings, "TUNED_FOLDER", tmp_path)
    (tmp_path / "digits.toml").write_text('seeds = 5\nlosses = "ice"\n')
    with pytest.raises(settings.UsageError, match="must hold only 'losses'.*found: losses, seeds"):
        settings.resolve(["--dataset", "digits"])


def test_passes_per_epoch_sets_the_iterations_between_evaluations(tmp_path):
    data = launch.prepare_data(settings.resolve(TINY), 1)
    iterations = {}
    for passes in (1, 3):
        resolved = settings.resolve(TINY + ["--passes-per-epoch", str(passes), "--out", str(tmp_path / str(passes))])
        trunk, embedder = training_models(resolved, data)
        job = training.Run(data, trunk, embedder, resolved.losses[0], 0, resolved, training.RunStore(tmp_path / str(passes)),
                           training.StoredRun("new", []), on_rows=lambda rows: None)
        iterations[passes] = len(job.sampler) // job.per_rank_batch
    assert iterations[3] == 3 * iterations[1] == 3 * (len(data.train) // 16)


def training_models(resolved, data):
    from benchmarks.core.models import fresh_models

    return fresh_models(resolved, None, 0)


def test_folders_made_before_passes_per_epoch_existed_still_open(tmp_path):
    from benchmarks.storage.files import atomic_write_json
    from benchmarks.core.out_folder import IdentityMismatch, OutFolder

    identity = settings.resolve(TINY).identity()
    earlier = {k: v for k, v in identity.items() if k != "passes_per_epoch"}
    atomic_write_json(tmp_path / "config.json", earlier)
    OutFolder(tmp_path).check_identity(identity)  # made with one pass per epoch: the same settings
    with pytest.raises(IdentityMismatch, match="passes_per_epoch: 1 there, 2 now"):
        OutFolder(tmp_path).check_identity(dict(identity, passes_per_epoch=2))
