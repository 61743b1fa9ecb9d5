"""Compare ICE with PML's losses: ``python -m benchmarks.run [options]``.

Trains one embedding model per (loss, seed) with PML's MetricLossOnly trainer, evaluates
it with PML's GlobalEmbeddingSpaceTester after every epoch, and writes results.csv,
summary.md, plots and per-run record-keeper logs under --out. Rerunning the same command
skips finished runs and resumes interrupted ones. Under ``torchrun --nproc_per_node=N``
it trains with DistributedDataParallel and PML's DistributedLossWrapper.
"""

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import loss_specs, significance
from .datasets import DATASETS, BenchmarkData, DatasetNotInstalled, TensorImageDataset, load_dataset, split_sizes
from .files import atomic_torch_save, atomic_write_json, read_json
from .models import MODELS, WeightsUnavailable, build_embedder, build_trunk
from .reporting import sort_rows, write_plots, write_results_csv, write_summary
from .training import TrainSettings, load_run, seed_everything, train_one

# Per-dataset defaults of the settings whose good value depends on the data.
DATASET_DEFAULTS = {
    "digits": dict(epochs=15, batch_size=64, m_per_class=16, embedding_size=64, lr=1e-3, freeze_trunk=False),
    "fashion-mnist": dict(epochs=5, batch_size=128, m_per_class=32, embedding_size=64, lr=1e-3, freeze_trunk=False),
    "emoji": dict(epochs=30, batch_size=128, m_per_class=2, embedding_size=128, lr=1e-4, freeze_trunk=True, image_size=128),
    "cub200": dict(epochs=50, batch_size=128, m_per_class=4, embedding_size=128, lr=1e-5, freeze_trunk=False),
    "cars196": dict(epochs=50, batch_size=128, m_per_class=4, embedding_size=128, lr=1e-5, freeze_trunk=False),
    "sop": dict(epochs=50, batch_size=128, m_per_class=4, embedding_size=128, lr=1e-5, freeze_trunk=False),
    "folder": dict(epochs=20, batch_size=64, m_per_class=4, embedding_size=128, lr=1e-4, freeze_trunk=False),
}
COMMON_DEFAULTS = dict(
    dataset="digits", losses=loss_specs.DEFAULT_LOSSES, seeds=3, patience=5, model="auto",
    pretrained=True, loss_lr=1e-2, weight_decay=0.0, eval_batch_size=256, device="auto",
    num_workers=0, val="auto", limit_per_class=None, image_size=None, data_root=None,
    download=False, out=None,
)
# Settings that change what a run computes: an --out folder holds one value of each.
IDENTITY_KEYS = (
    "dataset", "data_root", "limit_per_class", "val", "model", "pretrained", "freeze_trunk", "embedding_size",
    "batch_size", "m_per_class", "lr", "loss_lr", "weight_decay", "image_size", "processes",
)
VAL_MODES = ("auto", "classes", "samples")


class UsageError(ValueError):
    """A bad command line or config file; the message names the problem."""


def build_parser() -> argparse.ArgumentParser:
    dataset_lines = "\n".join(
        f"  {name}: " + ", ".join(f"{k.replace('_', '-')}={v}" for k, v in d.items())
        for name, d in DATASET_DEFAULTS.items()
    )
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train and evaluate embedding models with ICE and PML's losses "
        "(class-disjoint protocol: first half of the classes trains, second half tests).",
        epilog=(
            "Losses (--losses takes a comma-separated list; parameters follow a colon, e.g.\n"
            "'ice:scale=32,lam=1,ntxent:temperature=0.05'; miner parameters start with miner_):\n"
            + loss_specs.losses_help()
            + "\n\nPer-dataset defaults (any option overrides them):\n" + dataset_lines
            + "\n\nDatasets: digits (bundled with scikit-learn); fashion-mnist (apt-get install "
            "dataset-fashion-mnist, or --data-root);\nemoji (npm install emoji-datasource-google@16.0.0 "
            "emoji-datasource-twitter@16.0.0, found under node_modules or --data-root);\ncub200, cars196, "
            "sop (PML datasets: --data-root DIR, --download to fetch); folder (--data-root with one "
            "sub-folder per class).\n\nOutputs under --out: results.csv, summary.md, plots/*.png, "
            "runs/<loss>/seed<k>/ (checkpoint, record-keeper logs, tensorboard).\nMulti-process: "
            "torchrun --nproc_per_node=N -m benchmarks.run ... (only rank 0 writes)."
        ),
    )
    add = parser.add_argument
    add("--config", metavar="FILE", help="TOML file with any of these options as keys (dashes or underscores); the command line wins")
    add("--dataset", choices=DATASETS, help="dataset (default: digits)")
    add("--data-root", metavar="PATH", help="where the dataset lives (fashion-mnist, emoji, cub200, cars196, sop, folder)")
    add("--download", action="store_true", default=None, help="let PML download cub200/cars196/sop into --data-root")
    add("--losses", metavar="SPECS", help=f"losses to compare (default: {loss_specs.DEFAULT_LOSSES})")
    add("--list-losses", action="store_true", help="print the losses and their parameters, then exit")
    add("--epochs", type=int, metavar="N", help="maximum training epochs per run (epoch 0 = untrained model is always evaluated)")
    add("--patience", type=int, metavar="N", help="stop a run when validation MAP@R has not improved for N epochs (default 5; -1 = never)")
    add("--seeds", type=int, metavar="K", help="seeds 0..K-1 per loss (default 3)")
    add("--out", metavar="DIR", help="output folder (default: results/<dataset>)")
    add("--model", choices=("auto",) + MODELS, help="trunk; auto = cnn for grey-scale sets, efficientnet-lite0 for emoji/folder, resnet50 for cub200/cars196/sop")
    add("--no-pretrained", dest="pretrained", action="store_false", default=None, help="random trunk weights instead of ImageNet ones")
    add("--freeze-trunk", action=argparse.BooleanOptionalAction, default=None,
        help="keep the trunk fixed and train only the embedder on cached trunk features (default: on for emoji)")
    add("--embedding-size", type=int, metavar="D", help="output size of the linear embedder")
    add("--batch-size", type=int, metavar="B", help="global batch size (split across processes)")
    add("--m-per-class", type=int, metavar="M", help="images per class in a batch (MPerClassSampler)")
    add("--lr", type=float, help="Adam learning rate of trunk and embedder")
    add("--loss-lr", type=float, help="Adam learning rate of a loss's own parameters (proxies, class weights; default 0.01)")
    add("--weight-decay", type=float, help="Adam weight decay of trunk and embedder (default 0)")
    add("--image-size", type=int, metavar="PX", help="image side for RGB datasets (default 128 for emoji, 224 otherwise)")
    add("--limit-per-class", type=int, metavar="N", help="keep the first N images of each class (quick runs)")
    add("--val", choices=VAL_MODES, help="validation split: a fifth of the training classes, or every fifth image of each (auto: classes when >= 10 training classes)")
    add("--eval-batch-size", type=int, metavar="B", help="batch size when computing embeddings for evaluation (default 256)")
    add("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    add("--num-workers", type=int, metavar="N", help="data-loader worker processes (default 0)")
    return parser


def _load_config_file(path) -> dict:
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
    except FileNotFoundError as error:
        raise UsageError(f"config file {path} does not exist") from error
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"config file {path} is not valid TOML: {error}") from error


def resolve_options(argv=None) -> argparse.Namespace:
    """Parse the command line, merge the config file and the per-dataset defaults, validate."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_losses:
        print(loss_specs.losses_help())
        raise SystemExit(0)
    options = {}
    if args.config:
        valid = {a.dest for a in parser._actions if a.dest not in ("help", "config", "list_losses")}
        for key, value in _load_config_file(args.config).items():
            dest = key.replace("-", "_")
            if dest == "no_pretrained":
                dest, value = "pretrained", not value
            if dest not in valid:
                raise UsageError(
                    f"unknown key '{key}' in {args.config}; valid keys: "
                    + ", ".join(sorted(v.replace("_", "-") for v in valid))
                )
            if dest == "losses" and isinstance(value, list):
                value = ",".join(value)
            options[dest] = value
    for key, value in vars(args).items():
        if value is not None and key not in ("config", "list_losses"):
            options[key] = value
    dataset = options.get("dataset", COMMON_DEFAULTS["dataset"])
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    merged = dict(COMMON_DEFAULTS)
    merged.update(DATASET_DEFAULTS[dataset])
    merged.update(options)
    opts = argparse.Namespace(**merged)
    _validate(opts)
    return opts


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(opts) -> None:
    def option(name):
        return "--" + name.replace("_", "-")

    def integer(name, minimum, optional=False):
        value = getattr(opts, name)
        if not (optional and value is None) and not (_is_int(value) and value >= minimum):
            raise UsageError(f"{option(name)} must be an integer >= {minimum}, got {value!r}")

    def number(name, above_zero):
        value = getattr(opts, name)
        if not (_is_int(value) or isinstance(value, float)) or not (value > 0 if above_zero else value >= 0):
            raise UsageError(f"{option(name)} must be a number {'>' if above_zero else '>='} 0, got {value!r}")

    for name in ("seeds", "batch_size", "m_per_class", "embedding_size", "eval_batch_size"):
        integer(name, 1)
    integer("epochs", 0)
    integer("num_workers", 0)
    integer("image_size", 1, optional=True)
    integer("limit_per_class", 1, optional=True)
    if not _is_int(opts.patience):
        raise UsageError(f"--patience must be an integer (-1 = never stop early), got {opts.patience!r}")
    if opts.patience < 0:
        opts.patience = None
    if opts.batch_size % opts.m_per_class:
        raise UsageError(f"--batch-size {opts.batch_size} must be a multiple of --m-per-class {opts.m_per_class}")
    number("lr", above_zero=True)
    number("loss_lr", above_zero=True)
    number("weight_decay", above_zero=False)
    for name in ("pretrained", "freeze_trunk", "download"):
        if not isinstance(getattr(opts, name), bool):
            raise UsageError(f"'{name.replace('_', '-')}' must be true or false, got {getattr(opts, name)!r}")
    if opts.val not in VAL_MODES:
        raise UsageError(f"--val must be one of {', '.join(VAL_MODES)}, got {opts.val!r}")
    if opts.model not in ("auto",) + MODELS:
        raise UsageError(f"unknown model '{opts.model}'; valid models: auto, {', '.join(MODELS)}")
    if opts.data_root is not None:
        if not isinstance(opts.data_root, str):
            raise UsageError(f"--data-root must be a path, got {opts.data_root!r}")
        opts.data_root = str(Path(opts.data_root).resolve())
    try:
        opts.loss_specs = loss_specs.parse_loss_list(opts.losses)
    except loss_specs.LossSpecError as error:
        raise UsageError(str(error)) from error
    if opts.out is None:
        opts.out = os.path.join("results", opts.dataset)
    if opts.device == "auto":
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"


def _init_distributed(opts):
    """Start torch.distributed when launched by torchrun; return (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if opts.device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        opts.device = f"cuda:{local_rank}"
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend=backend)
    return torch.distributed.get_rank(), world


def _check_out_folder(opts, out: Path) -> None:
    """An --out folder holds one experiment: refuse to mix runs of different settings."""
    stored = read_json(out / "config.json")
    if stored is not None:
        differing = [k for k in IDENTITY_KEYS if stored.get(k) != getattr(opts, k)]
        if differing:
            details = ", ".join(f"{k}: {stored.get(k)!r} there, {getattr(opts, k)!r} now" for k in differing)
            raise UsageError(f"{out} holds runs made with other settings ({details}); choose another --out")


def _check_batches(opts, data: BenchmarkData, world: int) -> None:
    """Each process's share of the batch must be whole classes that the training split can fill."""
    share = opts.batch_size // world
    if opts.batch_size % world or share % opts.m_per_class:
        raise UsageError(f"--batch-size {opts.batch_size} must split into {world} process(es) whose share "
                         f"is a multiple of --m-per-class {opts.m_per_class}")
    classes = len(np.unique(data.train.labels))
    if opts.m_per_class * classes < share:
        raise UsageError(f"--m-per-class {opts.m_per_class} x {classes} training classes cannot fill a batch "
                         f"of {share}; raise --m-per-class or lower --batch-size")


def _cached_features(opts, data: BenchmarkData, out: Path, rank: int, world: int) -> BenchmarkData:
    """Replace images by fixed trunk features, computed once per --out folder."""
    cache = out / "cache" / "trunk_features.pt"
    if rank == 0 and not cache.is_file():
        print(f"computing {opts.model} features of {len(data.train) + len(data.val) + len(data.test)} images once", flush=True)
        seed_everything(0)
        trunk = build_trunk(opts.model, data.in_channels, opts.pretrained).to(opts.device).eval()
        from pytorch_metric_learning import testers

        tester = testers.GlobalEmbeddingSpaceTester(
            normalize_embeddings=False, batch_size=opts.eval_batch_size,
            dataloader_num_workers=opts.num_workers, data_device=torch.device(opts.device),
        )
        features = {}
        for split in ("train", "val", "test"):
            emb, _ = tester.get_all_embeddings(getattr(data, split), trunk)
            features[split] = emb.cpu()
        atomic_torch_save(cache, features)
    if world > 1:
        torch.distributed.barrier()
    features = torch.load(cache, map_location="cpu")
    return BenchmarkData(
        train=TensorImageDataset(features["train"], data.train.labels),
        val=TensorImageDataset(features["val"], data.val.labels),
        test=TensorImageDataset(features["test"], data.test.labels),
        in_channels=data.in_channels,
        default_model=data.default_model,
    )


class FrozenFeatures(torch.nn.Identity):
    """Trunk stand-in when features are cached: passes them through."""

    def __init__(self, output_size: int):
        super().__init__()
        self.output_size = output_size


class _DropFrozenTrunkWarning(logging.Filter):
    """A frozen (cached-feature) trunk has no optimizer by design; PML warns about it."""

    def filter(self, record):
        return 'missing "trunk_optimizer"' not in record.getMessage()


def _quiet_known_warnings() -> None:
    # PML's progress bar formats the loss tensor itself; DDP's buffers are kept rank-local on purpose.
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated")
    pml_logger = logging.getLogger("PML")
    if not any(isinstance(f, _DropFrozenTrunkWarning) for f in pml_logger.filters):
        pml_logger.addFilter(_DropFrozenTrunkWarning())


def main(argv=None) -> int:
    _quiet_known_warnings()
    try:
        opts = resolve_options(argv)
    except UsageError as error:
        print(f"python -m benchmarks.run: error: {error}", file=sys.stderr)
        return 2
    rank, world = _init_distributed(opts)
    opts.processes = world
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    out = Path(opts.out)
    try:
        data = load_dataset(opts.dataset, opts.data_root, opts.download, opts.image_size, opts.val, opts.limit_per_class)
        if opts.model == "auto":
            opts.model = data.default_model
        _check_out_folder(opts, out)
        _check_batches(opts, data, world)
        if opts.freeze_trunk:
            data = _cached_features(opts, data, out, rank, world)
            feature_size = data.train.images.shape[1]
        else:
            build_trunk(opts.model, data.in_channels, opts.pretrained)  # fail early on missing weights
    except (DatasetNotInstalled, WeightsUnavailable, UsageError, ValueError) as error:
        print(f"python -m benchmarks.run: error: {error}", file=sys.stderr)
        return 2
    if rank == 0 and not (out / "config.json").is_file():
        atomic_write_json(out / "config.json", {k: getattr(opts, k) for k in IDENTITY_KEYS})

    settings = TrainSettings(
        epochs=opts.epochs, patience=opts.patience, batch_size=opts.batch_size, m_per_class=opts.m_per_class,
        lr=opts.lr, loss_lr=opts.loss_lr, weight_decay=opts.weight_decay, eval_batch_size=opts.eval_batch_size,
        device=opts.device, num_workers=opts.num_workers,
    )
    labels = [s.label for s in opts.loss_specs]
    header = [
        f"- dataset: {opts.dataset} ({'; '.join(split_sizes(data))})",
        f"- model: {opts.model}{' (pretrained)' if opts.pretrained and opts.model != 'cnn' else ''}"
        f"{', trunk frozen' if opts.freeze_trunk else ''}, embedding {opts.embedding_size}",
        f"- training: up to {opts.epochs} epochs, patience {opts.patience}, batch {opts.batch_size} "
        f"({opts.m_per_class} per class), Adam lr {opts.lr}, {world} process(es), device {opts.device}",
        f"- seeds: {', '.join(str(s) for s in range(opts.seeds))}",
    ] + [
        f"- `{spec.label}`: " + ", ".join(f"{k}={v!r}" for k, v in spec.describe_values().items())
        for spec in opts.loss_specs
    ]
    log("\n".join(header))

    runs = [(spec, seed) for spec in opts.loss_specs for seed in range(opts.seeds)]
    run_dirs = {(spec.label, seed): out / "runs" / spec.folder_name / f"seed{seed}" for spec, seed in runs}
    # Every stored run's rows, so that each rewrite of results.csv keeps the runs not reached yet.
    statuses, rows_by_run, failures = {}, {}, {}
    for key, run_dir in run_dirs.items():
        stored = load_run(run_dir, opts.epochs)
        statuses[key], rows_by_run[key] = stored.status, stored.rows
        if stored.error:
            failures[key] = stored.error
    results_csv = out / "results.csv"

    def publish(run_key, rows):
        rows_by_run[run_key] = list(rows)
        write_results_csv(results_csv, sort_rows([r for rs in rows_by_run.values() for r in rs], labels))

    started = time.time()
    for index, (spec, seed) in enumerate(runs, 1):
        key = (spec.label, seed)
        status = statuses[key]
        verb = {"new": "training", "partial": "resuming", "finished": "already done:", "failed": "failed before:"}[status]
        log(f"[{index}/{len(runs)}] {verb} {spec.label} seed {seed}")
        if status in ("new", "partial"):
            checkpoint = load_run(run_dirs[key], opts.epochs).checkpoint if status == "partial" else None
            seed_everything(seed, rank)
            if opts.freeze_trunk:
                trunk = FrozenFeatures(feature_size)
            else:
                trunk = build_trunk(opts.model, data.in_channels, opts.pretrained)
            embedder = build_embedder(trunk.output_size, opts.embedding_size)
            result = train_one(data, trunk, embedder, spec, seed, settings, run_dirs[key], checkpoint,
                               on_rows=lambda rows, key=key: publish(key, rows))
            rows_by_run[key] = result.rows
            if result.error:
                failures[key] = result.error
        if key in failures:
            log(f"    run failed: {failures[key]}")

    if rank == 0:
        write_results_csv(results_csv, sort_rows([r for rs in rows_by_run.values() for r in rs], labels))
        # Failed runs keep their rows in results.csv but are no results: the table and plots leave them out.
        kept_rows = sort_rows([r for key, rs in rows_by_run.items() if key not in failures for r in rs], labels)
        header.append(f"- wall time of this invocation: {time.time() - started:.0f} s")
        # significance: each loss against ICE and against the best loss, paired over test queries
        scores = significance.load_run_scores({key: d for key, d in run_dirs.items() if key not in failures})
        ice_label = next((spec.label for spec in opts.loss_specs if spec.name == "ice"), None)
        comparison = significance.comparison_table(scores, ice_label)
        table = write_summary(out / "summary.md", kept_rows, labels, header, failures, comparison)
        plots = write_plots(out / "plots", kept_rows, labels) if kept_rows else []
        log("\nTest metrics (%) at each run's best validation epoch, mean ± std over seeds:\n")
        log(table)
        if comparison:
            log("\n" + comparison)
        if failures:
            log("\nFailed runs (left out of the table and plots):\n"
                + "\n".join(f"  {label} seed {seed}: {error}" for (label, seed), error in failures.items()))
        log(f"\nWrote {results_csv}, {out / 'summary.md'}, " + ", ".join(str(p) for p in plots))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
