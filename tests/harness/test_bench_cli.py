"""Command line of the harness: loss specs, bad options and missing datasets fail at once."""

import re

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from benchmarks import run
from benchmarks.core import launch, loss_registry, loss_specs, settings


def run_main(capsys, *argv):
    """``run.main`` on digits (the fast dataset) unless ``argv`` names one."""
    if "--dataset" not in argv:
        argv = ("--dataset", "digits") + argv
    code = run.main(list(argv))
    return code, capsys.readouterr()


def test_loss_list_with_inline_parameters():
    specs = loss_specs.parse_loss_list("ice:scale=16,lam=0.5,ntxent:temperature=0.05,triplet:miner_type_of_triplets=hard")
    assert [s.name for s in specs] == ["ice", "ntxent", "triplet"]
    assert dict(specs[0].params) == {"lam": 0.5, "scale": 16}
    assert specs[2].describe_values()["miner_type_of_triplets"] == "hard"
    loss, miner = specs[2].build(num_classes=3, embedding_size=4)
    assert miner.type_of_triplets == "hard"
    assert loss_specs.parse_loss_list(loss_registry.DEFAULT_LOSSES)[0].label == "ice"


def test_a_spec_is_one_value_whatever_its_text():
    """``scale=32`` and ``scale=32.0`` are one spec with one label (one run folder); labels of
    non-integral values keep their text, as the tuned default job's folder names do."""
    assert loss_specs.parse_loss_spec("ice:scale=32") == loss_specs.parse_loss_spec("ice:scale=32.0")
    assert loss_specs.parse_loss_spec("ice:scale=32.0").label == "ice:scale=32"
    tuned = "ice:lam=2.56,normalize='anchor',scale=6.03"
    assert loss_specs.parse_loss_spec(tuned).label == tuned
    assert loss_specs.make_loss_spec("ice", {"scale": 6.03, "lam": 2.56, "normalize": "anchor"}).label == tuned


def test_ice_parameters_reach_loss_and_reducer():
    spec = loss_specs.parse_loss_spec("ice:scale=20,lam=2,normalize=anchor")
    loss, miner = spec.build(num_classes=3, embedding_size=4)
    assert miner is None
    assert loss.scale == 20
    assert loss.reducer.lam == 2 and loss.reducer.normalize == "anchor"


def test_proxy_losses_get_classes_and_embedding_size():
    loss, _ = loss_specs.parse_loss_spec("proxyanchor").build(num_classes=7, embedding_size=5)
    assert tuple(loss.proxies.shape) == (7, 5)
    assert loss_specs.has_trainable_parameters(loss)


def test_a_loss_with_own_parameters_takes_its_own_learning_rate():
    from benchmarks.core import training
    from benchmarks.core.settings import resolve

    spec = loss_specs.parse_loss_spec("proxyanchor:loss_lr=0.003,margin=0.2")
    assert spec.loss_lr == 0.003 and spec.describe_values()["loss_lr"] == 0.003
    loss, _ = spec.build(num_classes=7, embedding_size=5)
    settings = resolve(["--dataset", "digits"])
    model = torch.nn.Linear(5, 5)
    chosen = training.build_optimizers(model, model, loss, settings, spec.loss_lr)["metric_loss_optimizer"]
    default = training.build_optimizers(model, model, loss, settings)["metric_loss_optimizer"]
    assert chosen.param_groups[0]["lr"] == 0.003 and default.param_groups[0]["lr"] == settings.loss_lr


@pytest.mark.parametrize("temperature", [0.5, 0.125, 0.03])
def test_the_harness_ntxent_is_pml_ntxent(temperature):
    loss, _ = loss_specs.parse_loss_spec(f"ntxent:temperature={temperature}").build(num_classes=8, embedding_size=16)
    torch.manual_seed(0)
    embeddings = torch.randn(32, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (32,))
    ours = loss(embeddings, labels)
    pml_ntxent, _ = loss_specs.parse_loss_spec(f"pml_ntxent:temperature={temperature}").build(8, 16)
    assert type(pml_ntxent) is pml_losses.NTXentLoss
    ntxent = pml_ntxent(embeddings, labels)
    ours_grad, ntxent_grad = torch.autograd.grad(ours, embeddings)[0], torch.autograd.grad(ntxent, embeddings)[0]
    assert ours.item() == pytest.approx(ntxent.item(), rel=1e-12)
    torch.testing.assert_close(ours_grad, ntxent_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "text, message",
    [
        ("ice:loss_lr=0.1", "unknown parameter 'loss_lr' for loss 'ice'"),
        ("arcface:loss_lr=0", "loss_lr of loss 'arcface' must be a finite number > 0"),
        ("arcface:loss_lr=inf", "loss_lr of loss 'arcface' must be a finite number > 0, got 'inf'"),
        ("nosuchloss", "unknown loss 'nosuchloss'; valid losses: arcface, circle, contrastive, ice"),
        ("ice:temperature=1", "unknown parameter 'temperature' for loss 'ice'; valid parameters: scale"),
        ("ntxent:temperature", "must be written key=value"),
        ("ice:scale=-1", "scale"),
        ("ice,ice", "loss given twice: ice"),
        ("ice:scale=2,scale=3", "given twice"),
        ("triplet:miner_type_of_triplets=foo", "miner_type_of_triplets of loss 'triplet' must be one of all, hard, semihard, easy; got 'foo'"),
        ("ice:normalize=foo", "normalize of loss 'ice' must be one of batch, anchor; got 'foo'"),
        ("triplet:swap=foo", "swap of loss 'triplet' must be true or false; got 'foo'"),
        ("triplet:triplets_per_anchor=many", "triplets_per_anchor of loss 'triplet' must be 'all' or an integer >= 1; "
         "got 'many'"),
        ("triplet:triplets_per_anchor=0", "must be 'all' or an integer >= 1; got 0"),
        ("triplet:triplets_per_anchor=2.5", "must be 'all' or an integer >= 1; got 2.5"),
        ("ice:lam=-1", "loss 'ice:lam=-1' cannot be built: ICEReweightReducer: lam must be a real number >= 0"),
        ("ice:lam=[1]", "lam of loss 'ice' must be a finite number; got [1]"),
        ("ice:scale=inf", "scale of loss 'ice' must be a finite number; got 'inf'"),
        ("ntxent:temperature=0", "temperature of loss 'ntxent' must be a number > 0; got 0"),
        ("ntxent:lam=1", "unknown parameter 'lam' for loss 'ntxent'; valid parameters: temperature"),
    ],
)
def test_bad_loss_specs(text, message):
    with pytest.raises(loss_specs.LossSpecError) as error:
        loss_specs.parse_loss_list(text)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--losses", "ice,bogus"], "unknown loss 'bogus'; valid losses:"),
        (["--losses", "ntxent:tau=1"], "valid parameters: temperature"),
        (["--epochs", "-1"], "--epochs must be an integer >= 0"),
        (["--seeds", "0"], "--seeds must be a count from 1 to 10000"),
        (["--batch-size", "60", "--m-per-class", "16"], "--batch-size 60 must be a multiple of --m-per-class 16"),
        (["--lr", "0"], "--lr must be a number > 0"),
        (["--batch-size", "128", "--m-per-class", "4"], "cannot fill a batch of 128"),
        (["--dataset", "fashion-mnist", "--data-root", "/nonexistent"], "apt-get install dataset-fashion-mnist"),
        (["--dataset", "emoji", "--data-root", "/nonexistent"], "npm install emoji-datasource-google@16.0.0"),
        (["--dataset", "emoji-styles", "--data-root", "/nonexistent"], "`npm ci --prefix benchmarks/data`"),
        (["--dataset", "cub200"], "--download"),
        (["--dataset", "folder"], "one sub-folder of images per class"),
    ],
)
def test_bad_command_lines_fail_with_the_problem(capsys, tmp_path, argv, message):
    code, captured = run_main(capsys, *argv, "--out", str(tmp_path / "out"))
    assert code == 2
    assert message in captured.err
    # Nothing is written, so the corrected command may use the same --out.
    assert not (tmp_path / "out" / "results.csv").exists()
    assert not (tmp_path / "out" / "config.json").exists()


def test_batch_that_does_not_split_across_processes(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "start_processes", lambda settings: (0, 3))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)  # no group was started
    code, captured = run_main(capsys, "--batch-size", "32", "--m-per-class", "8", "--out", str(tmp_path / "out"))
    assert code == 2
    assert "--batch-size 32 must split into 3 process(es) whose share is a multiple of --m-per-class 8" in captured.err
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


def test_unknown_option_and_choice_exit_with_usage(capsys):
    for argv in (["--no-such-option"], ["--dataset", "mnist"], ["--model", "vgg"]):
        with pytest.raises(SystemExit) as exit_info:
            run.main(argv)
        assert exit_info.value.code == 2
    assert "invalid choice: 'vgg'" in capsys.readouterr().err


def test_help_documents_datasets_losses_and_outputs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("digits", "fashion-mnist", "emoji", "cub200", "cars196", "sop", "folder", "--no-pretrained",
                 "ntxent", "multisimilarity", "miner_epsilon", "results.csv", "torchrun", "--config"):
        assert word in text


@pytest.mark.parametrize("given, seeds", [("5", (0, 1, 2, 3, 4)), ("3,4", (3, 4)), ("7,", (7,)), (" 2 , 0 ", (2, 0))])
def test_seeds_are_a_count_or_a_list(given, seeds):
    assert settings.resolve(["--dataset", "digits", "--seeds", given]).seeds == seeds


@pytest.mark.parametrize("given", ["0", "2,-1", "1,1", "a", "", "10001", "1.5"])
def test_seeds_that_are_neither_are_refused(given):
    with pytest.raises(settings.UsageError, match="--seeds must be a count from 1 to 10000"):
        settings.resolve(["--dataset", "digits", "--seeds", given])


@pytest.mark.parametrize("inside", ["benchmarks/x", "pml_ice", "docs/results", "tests/harness/out"])
def test_an_out_inside_the_source_tree_is_refused(inside):
    with pytest.raises(settings.UsageError, match=f"is inside the repository's {inside.split('/')[0]}/ folder"):
        settings.resolve(["--dataset", "digits", "--out", str(settings.REPOSITORY / inside)])


@pytest.mark.parametrize("out", [str(settings.REPOSITORY), str(settings.REPOSITORY / "benchmarks" / ".."), "."])
def test_an_out_at_the_repository_root_is_refused(out, monkeypatch):
    monkeypatch.chdir(settings.REPOSITORY)
    with pytest.raises(settings.UsageError, match=f"--out {re.escape(out)} is the repository's root; choose a folder"):
        settings.resolve(["--dataset", "digits", "--out", out])
    settings.resolve(["--dataset", "digits", "--out", "results/x"])  # a folder below it is fine


def test_config_file_sets_options_and_command_line_wins(tmp_path):
    config = tmp_path / "bench.toml"
    config.write_text('losses = ["ice:scale=8", "supcon"]\nepochs = 7\nseeds = 2\nbatch-size = 32\n')
    opts = settings.resolve(["--config", str(config), "--seeds", "1", "--dataset", "digits"])
    assert [s.label for s in opts.losses] == ["ice:scale=8", "supcon"]
    assert (opts.epochs, opts.seeds, opts.batch_size, opts.m_per_class) == (7, (0,), 32, 16)


@pytest.mark.parametrize(
    "line, message",
    [
        ('dataset = "mnist"', "unknown dataset 'mnist'; valid datasets: digits"),
        ('patience = "x"', "--patience must be an integer"),
        ('lr = "abc"', "--lr must be a number > 0, got 'abc'"),
        ("loss-lr = 0", "--loss-lr must be a number > 0"),
        ("weight_decay = -0.1", "--weight-decay must be a number >= 0, got -0.1"),
        ("lr = inf", "--lr must be finite, got inf"),
        ("weight_decay = nan", "--weight-decay must be"),
        ("embedding_size = 100000000000", "--embedding-size must be at most 65536, got 100000000000"),
        ("image-size = 0", "--image-size must be an integer >= 1"),
        ('limit-per-class = "5"', "--limit-per-class must be an integer >= 1, got '5'"),
        ('val = "random"', "--val must be one of auto, classes, samples, got 'random'"),
        ('freeze-trunk = "no"', "'freeze-trunk' must be true or false"),
    ],
)
def test_config_file_with_bad_value(tmp_path, line, message):
    config = tmp_path / "bench.toml"
    config.write_text(line + "\n")
    with pytest.raises(settings.UsageError) as error:
        settings.resolve(["--config", str(config)])
    assert message in str(error.value)


@pytest.mark.parametrize("text, keys", [
    ("batch-size = 32\nbatch_size = 64", "as 'batch-size' and as 'batch_size'"),
    ("pretrained = true\nno-pretrained = true", "as 'pretrained' and as 'no-pretrained'"),
])
def test_config_file_setting_one_setting_twice(tmp_path, text, keys):
    config = tmp_path / "bench.toml"
    config.write_text(text + "\n")
    with pytest.raises(settings.UsageError, match=f"bench.toml sets one setting twice, {keys}; keep one of them"):
        settings.resolve(["--config", str(config)])


def test_config_file_with_unknown_key(tmp_path):
    config = tmp_path / "bench.toml"
    config.write_text("epoch = 3\n")
    with pytest.raises(settings.UsageError, match="unknown key 'epoch'.*valid keys: .*epochs"):
        settings.resolve(["--config", str(config)])


def test_out_folder_refuses_other_settings(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    common = ["--epochs", "0", "--seeds", "1", "--losses", "ice", "--limit-per-class", "20", "--out", str(out)]
    code, _ = run_main(capsys, *common, "--embedding-size", "8", "--data-root", "a")
    assert code == 0
    code, captured = run_main(capsys, *common, "--data-root", "a")
    assert code == 2
    assert "holds runs made with other settings (embedding_size: 8 there, 64 now)" in captured.err
    code, captured = run_main(capsys, *common, "--embedding-size", "8", "--data-root", "b")
    assert code == 2
    assert f"(data_root: '{tmp_path / 'a'}' there, '{tmp_path / 'b'}' now)" in captured.err
    # The same folder written another way is the same experiment.
    code, _ = run_main(capsys, *common, "--embedding-size", "8", "--data-root", str(tmp_path / "a"))
    assert code == 0


# Hostile-user probes: each once gave lost rows, a traceback or a silent wrong run.


def write_config(tmp_path, text):
    config = tmp_path / "bench.toml"
    config.write_text(text + "\n")
    return ["--config", str(config)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--m-per-class", "1", "--batch-size", "16"], "--m-per-class must be an integer >= 2"),
        (["--device", "foo"], "--device must be cpu, cuda, cuda:N or auto, got 'foo'"),
        (["--verbose", "--quiet"], "--verbose and --quiet exclude each other"),
        (["--model", "resnet18"], "model 'resnet18' takes RGB images, dataset 'digits' has 1 channel(s)"),
        (["--eval-batch-size", "99999999999999999999"], "--eval-batch-size must be at most 1048576"),
        (["--passes-per-epoch", "99999999999"], "--passes-per-epoch must be at most 1000"),
    ],
)
def test_bad_option_values_are_refused(capsys, tmp_path, argv, message):
    assert run.main(["--dataset", "digits"] + argv + ["--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_out_naming_an_existing_file_is_refused(capsys, tmp_path):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    assert run.main(["--out", str(existing)]) == 2
    assert f"--out {existing} is a file, not a folder" in capsys.readouterr().err
    assert existing.read_text() == "keep me"


@pytest.mark.parametrize(
    "line, message",
    [
        ("losses = 5", "--losses must be text such as 'ice,ntxent:temperature=0.05' or a list of such texts, got 5"),
        ("out = 5", "--out must be a path (text), got 5"),
        ("data-root = [1]", "--data-root must be a path (text), got [1]"),
        ("epochs = {a = 1}", "--epochs must be an integer >= 0, got {'a': 1}"),
        ("seeds = true", "--seeds must be a count from 1 to 10000 (seeds 0..K-1) or distinct seeds from 0 to 9999"),
        ("seeds = [1, 1]", "separated by commas (3,4 or 7,), got [1, 1]"),
        ('no-pretrained = "no"', "'no-pretrained' must be true or false, got 'no'"),
        ('device = "foo"', "--device must be cpu, cuda, cuda:N or auto"),
        ('amp = "fp8"', "--amp must be one of bf16, fp16, got 'fp8'"),
    ],
)
def test_config_values_of_the_wrong_type(tmp_path, line, message):
    with pytest.raises(settings.UsageError) as error:
        settings.resolve(write_config(tmp_path, line))
    assert message in str(error.value)


def test_no_pretrained_in_a_config_file(tmp_path):
    assert settings.resolve(write_config(tmp_path, "no-pretrained = true")).pretrained is False
    assert settings.resolve(write_config(tmp_path, "no-pretrained = false")).pretrained is True


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    config = tmp_path / "bench.toml"
    config.write_bytes(b"epochs = 1\n# \xff\xfe\n")
    with pytest.raises(settings.UsageError, match="bench.toml is not UTF-8 text, as TOML must be"):
        settings.resolve(["--config", str(config)])


def test_a_refused_torchrun_launch_frees_the_models_and_destroys_its_process_group(monkeypatch, tmp_path):
    """DDP's reducers hold the process group; freed at interpreter exit instead, a gloo thread
    can abort the process. The group is destroyed on every path, after a collection."""
    import gc

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: None)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(gc, "collect", lambda: calls.append("collect"))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append("destroy"))
    # a batch of 12 does not split into 2 shares of whole classes of 4: refused after the group started
    opts = settings.resolve(["--dataset", "digits", "--batch-size", "12", "--m-per-class", "4", "--out", str(tmp_path)])
    assert launch.run_experiment(opts, "python -m benchmarks.run", publish=print) == 2
    assert calls == ["collect", "destroy"]


def test_processes_wait_timeout_seconds_for_each_other(monkeypatch, tmp_path, capsys):
    from benchmarks.core import experiment

    assert settings.resolve([]).timeout == 600
    opts = settings.resolve(["--dataset", "digits", "--timeout", "5", "--epochs", "0", "--seeds", "1", "--losses", "ice",
                             "--limit-per-class", "20", "--batch-size", "16", "--m-per-class", "4", "--out", str(tmp_path)])
    with pytest.raises(settings.UsageError, match="--timeout must be an integer >= 1"):
        settings.resolve(["--timeout", "0"])
    started = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: started.update(kwargs))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: started.update(destroyed=True))

    def frozen_peer(self, publish):
        raise RuntimeError("[gloo/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete")

    monkeypatch.setattr(experiment.Experiment, "run", frozen_peer)
    assert launch.run_experiment(opts, "python -m benchmarks.run", publish=print) == 1
    assert started["timeout"].total_seconds() == 5 and started["backend"] == "gloo"
    assert started["destroyed"]
    assert "process 0 waited --timeout 5 s for another process, which froze or died" in capsys.readouterr().err
