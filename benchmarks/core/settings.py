"""The settings of one command: one frozen dataclass, resolved once.

Each field holds its default, its help text, its check and whether it identifies an
``--out`` folder (``config.json`` holds those fields). The command line, the ``--config``
TOML file and ``config.json`` are all derived from the fields. Settings whose good value
depends on the data (``per_dataset``) take their default from the dataset registry.
Precedence: field default < dataset default < config file < command line.
"""

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..data.registry import DATASETS, help_text
from . import loss_registry, loss_specs
from .models import FROM_SCRATCH_MODELS, MODELS

# The tuned losses of a dataset, <dataset>.toml: the losses of a best.toml of `python -m benchmarks.tune`.
TUNED_FOLDER = Path(__file__).resolve().parents[1] / "tuned" / "configs"
REPOSITORY = Path(__file__).resolve().parents[2]
SOURCE_FOLDERS = ("benchmarks", "pml_ice", "tests", "docs", ".git")  # no --out inside them


class UsageError(ValueError):
    """A bad command line or config file; the message names the problem."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Integer:
    minimum: int
    optional: bool = False
    note: str = ""
    maximum: Optional[int] = None
    cli_type = int

    def __call__(self, name, value):
        if self.optional and value is None:
            return None
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= self.minimum):
            raise UsageError(f"{flag(name)} must be an integer >= {self.minimum}{self.note}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise UsageError(f"{flag(name)} must be at most {self.maximum}{self.note}, got {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class Number:
    above_zero: bool
    cli_type = float

    def __call__(self, name, value):
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or not (value > 0 if self.above_zero else value >= 0):
            raise UsageError(f"{flag(name)} must be a number {'>' if self.above_zero else '>='} 0, got {value!r}")
        if not math.isfinite(value):
            raise UsageError(f"{flag(name)} must be finite, got {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class Fraction:
    """A number strictly between 0 and 1 (None allowed when ``optional``)."""

    optional: bool = False
    cli_type = float

    def __call__(self, name, value):
        if self.optional and value is None:
            return None
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (is_number and 0 < value < 1):
            raise UsageError(f"{flag(name)} must be a number between 0 and 1 (exclusive), got {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class Boolean:
    """``cli``: 'on' (--name), 'off' (--no-name) or 'both' (--name / --no-name)."""

    cli: str = "on"

    def __call__(self, name, value):
        if not isinstance(value, bool):
            raise UsageError(f"'{name.replace('_', '-')}' must be true or false, got {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class OneOf:
    choices: Tuple[str, ...]
    noun: Optional[str] = None  # "unknown dataset 'x'; valid datasets: ..." instead of "--x must be one of"
    optional: bool = False
    cli_type = str

    def __call__(self, name, value):
        if (self.optional and value is None) or value in self.choices:
            return value
        if self.noun:
            raise UsageError(f"unknown {self.noun} {value!r}; valid {self.noun}s: {', '.join(self.choices)}")
        raise UsageError(f"{flag(name)} must be one of {', '.join(self.choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class PathText:
    cli_type = str

    def __call__(self, name, value):
        if value is not None and not isinstance(value, str):
            raise UsageError(f"{flag(name)} must be a path (text), got {value!r}")
        return value


def integer_list(minimum: int):
    """An argparse type: ``'128,1024'`` -> ``[128, 1024]``, distinct integers >= ``minimum``, sorted."""
    def parse(text: str) -> List[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            values = []
        if not values or min(values) < minimum or len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"expected distinct integers >= {minimum} separated by commas, "
                                             f"got {text!r}")
        return sorted(values)

    return parse


class SeedList:
    """A count K, for seeds 0..K-1 ('5'; 5 in TOML), or distinct seeds ('3,4' or '7,'; [3, 4] in
    TOML) -> the tuple of seeds."""

    cli_type = str
    most = 10_000  # seeds a command may run, and one above the largest seed

    def __call__(self, name, value):
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",")]
            try:
                numbers = [int(part) for part in parts if part]
            except ValueError:
                numbers = None
            value = numbers if "," in value else (numbers[0] if numbers and len(numbers) == 1 else None)
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= self.most:
            return tuple(range(value))
        if (isinstance(value, list) and value and len(set(value)) == len(value)
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < self.most for v in value)):
            return tuple(value)
        raise UsageError(f"{flag(name)} must be a count from 1 to {self.most} (seeds 0..K-1) or distinct seeds "
                         f"from 0 to {self.most - 1} separated by commas (3,4 or 7,), got {value!r}")


class LossList:
    """Text such as 'ice:scale=32,ntxent' (a TOML list of such texts too) -> tuple of LossSpec."""

    cli_type = str

    def __call__(self, name, value):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        if not isinstance(value, str):
            raise UsageError(f"--losses must be text such as 'ice,ntxent:temperature=0.05' or a list of such "
                             f"texts, got {value!r}")
        try:
            return tuple(loss_specs.parse_loss_list(value))
        except loss_specs.LossSpecError as error:
            raise UsageError(str(error)) from error


# Runs trained side by side at most by --jobs auto (memory: one process per run).
AUTO_JOBS = 4


class JobCount:
    """'auto' or an integer from 1 to ``most``; 'auto' stays as it is until ``_resolve_auto``."""

    cli_type = str
    most = 64

    def __call__(self, name, value):
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        return Integer(1, maximum=self.most)(name, value)


class Device:
    cli_type = str

    def __call__(self, name, value):
        if value == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(value)
        except (RuntimeError, TypeError):
            raise UsageError(f"--device must be cpu, cuda, cuda:N or auto, got {value!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {value}: torch sees no CUDA device here; use --device cpu")
        if device.type not in ("cpu", "cuda"):
            raise UsageError(f"--device must be cpu, cuda, cuda:N or auto, got {value!r}")
        return value


def setting(default, help, check, identity=False, per_dataset=False, metavar=None):
    """A field of ``Settings``; ``per_dataset`` fields default to the dataset registry's value."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, check=check, identity=identity, per_dataset=per_dataset, metavar=metavar))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of ``python -m benchmarks.run``."""

    dataset: str = setting("glyphs", "dataset", OneOf(tuple(DATASETS), noun="dataset"), identity=True)
    data_root: Optional[str] = setting(None, "where the dataset lives (fashion-mnist, emoji, cub200, cars196, sop, "
                                       "folder)", PathText(), identity=True, metavar="PATH")
    download: bool = setting(False, "let PML download cub200/cars196/sop into --data-root", Boolean())
    losses: Tuple[loss_specs.LossSpec, ...] = setting(
        loss_registry.DEFAULT_LOSSES, "losses to compare (default: the dataset's tuned losses, "
        f"benchmarks/tuned/configs/<dataset>.toml, where present, else {loss_registry.DEFAULT_LOSSES})", LossList(),
        metavar="SPECS")
    epochs: int = setting(None, "maximum training epochs per run (epoch 0 = untrained model is always evaluated)",
                          Integer(0), identity=True, per_dataset=True, metavar="N")
    patience: Optional[int] = setting(None, "stop a run once validation MAP@R has not improved for more than N "
                                      "evaluations (one per epoch; -1 = never: a fixed budget of --epochs)",
                                      Integer(-1, note=" (-1 = never stop early)"), identity=True, per_dataset=True,
                                      metavar="N")
    seeds: Tuple[int, ...] = setting(5, "seeds per loss: a count K for seeds 0..K-1, or seeds such as 3,4 to add "
                                     "to an --out folder (default 5)", SeedList(), metavar="K|S,S")
    out: str = setting(None, "output folder (default: results/<dataset>)", PathText(), metavar="DIR")
    model: str = setting("auto", "trunk; auto = the dataset's default model", OneOf(("auto",) + MODELS, noun="model"),
                         identity=True)
    pretrained: bool = setting(True, "random trunk weights instead of ImageNet ones", Boolean(cli="off"),
                               identity=True)
    freeze_trunk: bool = setting(None, "keep the trunk fixed and train only the embedder on cached trunk features",
                                 Boolean(cli="both"), identity=True, per_dataset=True)
    embedding_size: int = setting(None, "output size of the linear embedder", Integer(1, maximum=65536), identity=True,
                                  per_dataset=True, metavar="D")
    batch_size: int = setting(None, "global batch size (split across processes)", Integer(1), identity=True,
                              per_dataset=True, metavar="B")
    m_per_class: int = setting(None, "images per class in a batch (MPerClassSampler; at least 2, or no pair is "
                               "positive)", Integer(2, note=" (a batch needs positive pairs)"), identity=True,
                               per_dataset=True, metavar="M")
    passes_per_epoch: int = setting(None, "passes over the training split between two evaluations (one epoch)",
                                    Integer(1, maximum=1000), identity=True, per_dataset=True, metavar="P")
    lr: float = setting(None, "Adam learning rate of trunk and embedder", Number(above_zero=True), identity=True,
                        per_dataset=True)
    lr_decay: Optional[float] = setting(None, "multiply every learning rate by F once validation MAP@R has not improved "
                                        "for more than --lr-patience evaluations (PyTorch's ReduceLROnPlateau; "
                                        "default: per dataset)", Fraction(optional=True), identity=True,
                                        per_dataset=True, metavar="F")
    lr_patience: int = setting(None, "evaluations without improvement that --lr-decay tolerates before it decays "
                               "the learning rates", Integer(0), identity=True, per_dataset=True, metavar="N")
    loss_lr: float = setting(1e-2, "Adam learning rate of a loss's own parameters (proxies, class weights; "
                             "default 0.01)", Number(above_zero=True), identity=True)
    weight_decay: float = setting(0.0, "Adam weight decay of trunk and embedder (default 0)",
                                  Number(above_zero=False), identity=True)
    image_size: Optional[int] = setting(None, "image side for RGB datasets", Integer(1, optional=True),
                                        identity=True, per_dataset=True, metavar="PX")
    limit_per_class: Optional[int] = setting(None, "keep the first N images of each class (quick runs)",
                                             Integer(1, optional=True), identity=True, metavar="N")
    val: str = setting("auto", "validation split: a fifth of the training classes, or every fifth image of each "
                       "(auto: classes when >= 10 training classes)", OneOf(("auto", "classes", "samples")),
                       identity=True)
    amp: Optional[str] = setting(None, "mixed precision: autocast the forward pass and the loss (fp16 adds a "
                                 "GradScaler)", OneOf(("bf16", "fp16"), optional=True), identity=True)
    cache_chunk: Optional[int] = setting(None, "gradient caching: the trunk and embedder see N samples of a process's "
                                         "batch at a time, the loss the whole batch (BatchNorm normalises each "
                                         "chunk by its own statistics; default: no caching)",
                                         Integer(1, optional=True), identity=True, metavar="N")
    eval_batch_size: int = setting(256, "batch size when computing embeddings for evaluation (default 256)",
                                   Integer(1, maximum=2**20), metavar="B")
    device: str = setting("auto", "cpu, cuda, cuda:1, ... (default: cuda when available)", Device())
    jobs: int = setting("auto", "runs trained at a time, each in a process of its own with an equal share of torch's "
                        f"threads (auto: on a CPU, one run per thread, at most {AUTO_JOBS}; 1 on a GPU or under "
                        "torchrun)", JobCount(), metavar="N")
    num_workers: int = setting(0, "data-loader worker processes (default 0)", Integer(0), identity=True, metavar="N")
    timeout: int = setting(600, "seconds a process of a torchrun launch waits for the others before it stops with "
                           "an error (default 600)", Integer(1), metavar="SECONDS")
    verbose: bool = setting(False, "also print a line per evaluated epoch", Boolean())
    quiet: bool = setting(False, "print only the final table", Boolean())

    def identity(self) -> dict:
        """The fields that identify an --out folder (config.json)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["identity"]}


# Identity fields added after folders were made, with the value those folders were made with.
VALUES_BEFORE_FIELD = {"passes_per_epoch": 1, "num_workers": 0, "cache_chunk": None, "lr_decay": None, "lr_patience": 0}


def stored_identity(stored: dict) -> dict:
    """An identity written by an earlier harness, completed with the values of fields it lacks."""
    return {**VALUES_BEFORE_FIELD, **stored}


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def build_parser() -> argparse.ArgumentParser:
    """The command line, one option per field of ``Settings`` plus --config and --list-losses."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train and evaluate embedding models with ICE and PML's losses "
        "(class-disjoint protocol: first half of the classes trains, second half tests).",
        epilog=(
            "Losses (--losses takes a comma-separated list; parameters follow a colon, e.g.\n"
            "'ice:scale=32,lam=1,ntxent:temperature=0.05'; miner parameters start with miner_):\n"
            + loss_specs.losses_help()
            + "\n\nDatasets and their defaults (any option overrides them):\n" + help_text()
            + "\n\nOutputs under --out: results.csv, summary.md, plots/*.png, "
            "runs/<loss>/seed<k>/ (checkpoint, record-keeper logs, tensorboard).\nMulti-process: "
            "torchrun --nproc_per_node=N -m benchmarks.run ... (only rank 0 writes)."
        ),
    )
    parser.add_argument("--config", metavar="FILE",
                        help="TOML file with any of these options as keys (dashes or underscores); the command line wins")
    parser.add_argument("--list-losses", action="store_true", help="print the losses and their parameters, then exit")
    for name, field in FIELDS.items():
        _add_option(parser, name, field.metadata)
    return parser


def _add_option(parser: argparse.ArgumentParser, name: str, meta) -> None:
    """The command-line option of one field; absent options stay None so that defaults can be merged."""
    check = meta["check"]
    help_line = meta["help"] + (" (default: per dataset)" if meta["per_dataset"] else "")
    if isinstance(check, Boolean) and check.cli == "off":
        parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false", default=None,
                            help=help_line)
    elif isinstance(check, Boolean):
        action = argparse.BooleanOptionalAction if check.cli == "both" else "store_true"
        parser.add_argument(flag(name), action=action, default=None, help=help_line)
    else:
        choices = check.choices if isinstance(check, OneOf) else None
        parser.add_argument(flag(name), type=check.cli_type, choices=choices, metavar=meta["metavar"], help=help_line)


def _read_toml(path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - depends on the interpreter
        try:
            import tomli as tomllib
        except ImportError as error:
            raise UsageError("--config needs Python >= 3.11 or `pip install tomli`") from error
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (FileNotFoundError, IsADirectoryError) as error:
        raise UsageError(f"config file {path} does not exist") from error
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"config file {path} is not valid TOML: {error}") from error
    except UnicodeDecodeError as error:
        raise UsageError(f"config file {path} is not UTF-8 text, as TOML must be ({error}); save it as UTF-8") from error


def default_losses(dataset: str) -> str:
    """The dataset's tuned losses, ``benchmarks/tuned/configs/<dataset>.toml``, which holds only
    ``losses`` (those of a ``best.toml`` of ``python -m benchmarks.tune``), else every loss at its
    library defaults."""
    path = TUNED_FOLDER / f"{dataset}.toml"
    if not path.is_file():
        return loss_registry.DEFAULT_LOSSES
    values = _read_toml(path)
    if set(values) != {"losses"}:
        raise UsageError(f"{path} must hold only 'losses' (the dataset's tuned losses; the other settings "
                         f"come from the command line or --config), found: {', '.join(sorted(values))}")
    return values["losses"]


def config_file_values(path) -> dict:
    """The settings a TOML file sets, checked as the command line would check them."""
    values, keys = {}, {}
    for key, value in _read_toml(path).items():
        name = key.replace("-", "_")
        if name == "no_pretrained":
            name, value = "pretrained", not Boolean()(key, value)
        if name not in FIELDS:
            raise UsageError(f"unknown key '{key}' in {path}; valid keys: "
                             + ", ".join(sorted(n.replace("_", "-") for n in FIELDS)))
        if name in values:
            raise UsageError(f"{path} sets one setting twice, as '{keys[name]}' and as '{key}'; keep one of them")
        values[name], keys[name] = value, key
    return values


def default_out(dataset: str, command: Optional[str] = None) -> str:
    """A command's default output folder: ``results/<dataset>`` for ``benchmarks.run``,
    ``results/<command>-<dataset>`` for another command that works on one dataset."""
    return os.path.join("results", dataset if command is None else f"{command}-{dataset}")


def _resolve_auto(values: dict) -> dict:
    """Fill what 'auto' and the absent values stand for; one time only, before freezing."""
    entry = DATASETS[values["dataset"]]
    if values["jobs"] == "auto":
        alone_on_cpu = values["device"] == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) <= 1
        values["jobs"] = min(torch.get_num_threads(), AUTO_JOBS) if alone_on_cpu else 1
    if values["model"] == "auto":
        values["model"] = entry.default_model
    if values["out"] is None:
        values["out"] = default_out(values["dataset"])
    if values["data_root"] is not None:
        values["data_root"] = str(Path(values["data_root"]).resolve())
    if values["patience"] < 0:
        values["patience"] = None
    return values


def _check_together(settings: Settings) -> None:
    """Checks that involve several settings."""
    if settings.batch_size % settings.m_per_class:
        raise UsageError(f"--batch-size {settings.batch_size} must be a multiple of --m-per-class {settings.m_per_class}")
    channels = DATASETS[settings.dataset].channels
    if settings.model not in FROM_SCRATCH_MODELS and channels != 3:
        raise UsageError(f"model '{settings.model}' takes RGB images, dataset '{settings.dataset}' has {channels} "
                         f"channel(s); use --model {' or '.join(FROM_SCRATCH_MODELS)}")
    if settings.verbose and settings.quiet:
        raise UsageError("--verbose and --quiet exclude each other")
    check_out_folder(settings.out)


def check_out_folder(out: str) -> None:
    """Refuse an output folder that is a file, the repository's root or inside a source folder."""
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; choose another --out")
    resolved, elsewhere = Path(out).resolve(), "choose a folder outside the source tree, such as results/<name>"
    if resolved == REPOSITORY:
        raise UsageError(f"--out {out} is the repository's root; {elsewhere}")
    for name in SOURCE_FOLDERS:
        if resolved == REPOSITORY / name or REPOSITORY / name in resolved.parents:
            raise UsageError(f"--out {out} is inside the repository's {name}/ folder; {elsewhere}")


def resolve(argv=None) -> Settings:
    """Parse the command line and config file, merge with the defaults, check; exit on --list-losses."""
    args = vars(build_parser().parse_args(argv))
    if args.pop("list_losses"):
        print(loss_specs.losses_help())
        raise SystemExit(0)
    config = args.pop("config")
    given = config_file_values(config) if config else {}
    given.update({k: v for k, v in args.items() if v is not None})
    dataset = FIELDS["dataset"].metadata["check"]("dataset", given.get("dataset", FIELDS["dataset"].default))
    entry = DATASETS[dataset]
    dataset_defaults = dict(entry.training, image_size=entry.image_size, losses=default_losses(dataset))
    values = {name: given.get(name, dataset_defaults.get(name, field.default)) for name, field in FIELDS.items()}
    checked = {name: FIELDS[name].metadata["check"](name, value) for name, value in values.items()}
    settings = Settings(**_resolve_auto(checked))
    _check_together(settings)
    return settings
