"""Forward+backward time and peak memory of ICELoss against the floor and PML losses.

The "floor" is the least any loss of this kind can cost: L2-normalise the embeddings,
take the similarity matrix product S = X X^T (or X R^T against a memory bank) and run
its backward with a ready-made gradient of S's shape, nothing else. ICELoss is compared
with it and with PML's SupConLoss, MultiSimilarityLoss (default reducer, no miner) and
NTXentLoss, over a list of batch sizes.

Timing: every candidate is warmed up, then the candidates run round-robin (the starting
candidate rotates each repeat) so machine noise hits all of them alike; the table gives
medians (and minimums) and the medians' ratios to the floor and to SupConLoss, all from
one run.

Memory: on CUDA, torch.cuda.max_memory_allocated of one step (peak reset before it); on
CPU, the peak resident memory (VmHWM) of a whole fresh process that runs one step,
so each (loss, batch) is measured in a subprocess of this script. A candidate whose
estimated memory exceeds what the machine has is skipped and reported as such.

Examples:
    python -m benchmarks.speed --device cpu --batches 256,1024,4096 --dim 256
    python -m benchmarks.speed --device cpu --batches 16384 --dim 128 --memory-only --losses ice
    python -m benchmarks.speed --device cuda --batches 4096 --dim 512 --ref-size 1048576 --losses floor,ice
    python -m benchmarks.speed --batches 4096 --losses floor,ice --ice memory_efficient=True,chunk_size=256
"""

import argparse
import ast
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LOSS_NAMES = ("floor", "ice", "supcon", "multisim", "ntxent")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GIB = 2**30
# Fraction of the free memory a single step may be estimated to need before it is skipped.
MEMORY_SAFETY_FRACTION = 0.7


def parse_batches(text):
    """Parse '256,1024,...' into a list of positive ints."""
    try:
        batches = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad batch list {text!r}: expected integers like 256,1024")
    if not batches or any(b < 2 for b in batches):
        raise argparse.ArgumentTypeError(f"bad batch list {text!r}: every batch size must be >= 2")
    return batches


def parse_losses(text):
    """Parse 'floor,ice,...' into a list of known loss names."""
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in LOSS_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown loss name(s) {unknown or text!r}; choose from {', '.join(LOSS_NAMES)}"
        )
    return names


def parse_ice_kwargs(text):
    """Parse 'memory_efficient=True,chunk_size=256' into ICELoss keyword arguments."""
    kwargs = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"bad --ice item {item!r}: expected key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return kwargs


def ice_label(kwargs):
    """Table label of an ICELoss variant, e.g. 'ice(memory_efficient=True,chunk_size=256)'."""
    if not kwargs:
        return "ice"
    return "ice(" + ",".join(f"{key}={value!r}" for key, value in kwargs.items()) + ")"


def label_to_loss(label):
    """Inverse of the labels used in tables: (loss name, ICE kwargs)."""
    if label.startswith("ice("):
        return "ice", parse_ice_kwargs(label[4:-1])
    return label, {}


def make_inputs(batch, dim, per_class, ref_size, device, dtype, seed=0):
    """Random embeddings (requiring grad) with `per_class` samples per class, and an
    optional memory bank of `ref_size` embeddings whose first classes are the batch's."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(batch) // per_class)[torch.randperm(batch, generator=generator)]
    embeddings = torch.randn(batch, dim, generator=generator).to(device, dtype)
    inputs = {"embeddings": embeddings.requires_grad_(), "labels": labels.to(device)}
    inputs["ref_emb"] = inputs["ref_labels"] = None
    if ref_size:
        ref_labels = (torch.arange(ref_size) // per_class)[torch.randperm(ref_size, generator=generator)]
        inputs["ref_emb"] = torch.randn(ref_size, dim, generator=generator).to(device, dtype)
        inputs["ref_labels"] = ref_labels.to(device)
    return inputs


def build_step(label, inputs):
    """A function running one forward+backward of `label` on `inputs`."""
    name, ice_kwargs = label_to_loss(label)
    embeddings, ref_emb = inputs["embeddings"], inputs["ref_emb"]
    if name == "floor":
        ref_rows = len(embeddings) if ref_emb is None else len(ref_emb)
        upstream_grad = torch.randn(len(embeddings), ref_rows, device=embeddings.device, dtype=embeddings.dtype)

        def floor_step():
            normalized = F.normalize(embeddings, dim=1)
            ref = normalized if ref_emb is None else F.normalize(ref_emb, dim=1)
            (normalized @ ref.T).backward(upstream_grad)

        return floor_step

    loss_func = make_loss(name, ice_kwargs)

    def loss_step():
        loss = loss_func(embeddings, inputs["labels"], ref_emb=ref_emb, ref_labels=inputs["ref_labels"])
        loss.backward()

    return loss_step


def make_loss(name, ice_kwargs):
    """The loss object of a (non-floor) candidate."""
    from pytorch_metric_learning import losses as pml_losses

    if name == "ice":
        from pml_ice import losses as ice_losses

        return ice_losses.ICELoss(**ice_kwargs)
    return {
        "supcon": pml_losses.SupConLoss,
        "multisim": pml_losses.MultiSimilarityLoss,
        "ntxent": pml_losses.NTXentLoss,
    }[name]()


def estimate_step_bytes(label, batch, ref_size, dim, per_class, dtype, device):
    """Rough upper estimate of the memory one step of `label` needs, from its O(...) terms.

    The per-element byte counts are calibrated on measured peaks (CPU RSS, H100
    allocations): PML's pair-based losses hold int64 pair indices (16 bytes per pair)
    next to several float (batch x ref) matrices; NTXentLoss holds a
    (positive pairs x negative pairs) matrix with a mask.
    """
    elem = torch.finfo(dtype).bits // 8
    ref = ref_size or batch
    pairs = batch * ref
    vectors = 4 * (batch + ref) * dim * 4  # embeddings, normalised copies, gradients
    if label == "floor":
        return vectors + 4 * pairs * elem
    if label == "supcon":
        return vectors + pairs * (28 + 7 * elem)
    if label == "multisim":
        return vectors + pairs * (28 + 8 * elem)
    if label == "ntxent":
        positives = batch * per_class if ref_size else batch * (per_class - 1)
        negatives = pairs - positives - (0 if ref_size else batch)
        return vectors + pairs * 40 + positives * negatives * (4 * elem + 2)
    return vectors + estimate_ice_work_bytes(label_to_loss(label)[1], batch, ref, per_class, elem, device)


def estimate_ice_work_bytes(ice_kwargs, batch, ref, per_class, elem, device):
    """ICELoss's (rows x ref) logits buffers, float32 plus a copy in the input dtype, for
    all rows on the dense path or one chunk of rows on the memory-efficient path (decided
    as ICELoss decides), plus its int64 pair lists."""
    from pml_ice.losses.ice_function import default_chunk_rows
    from pml_ice.losses.ice_loss import DENSE_LOGITS_LIMIT

    memory_efficient = ice_kwargs.get("memory_efficient")
    if memory_efficient is None:
        memory_efficient = batch * ref > DENSE_LOGITS_LIMIT
    rows = batch
    if memory_efficient:
        rows = min(batch, ice_kwargs.get("chunk_size") or default_chunk_rows(ref, torch.device(device)))
    return rows * ref * (8 + 2 * elem) + 64 * batch * per_class


def available_bytes(device):
    """Memory a step may use: free RAM on CPU, free device memory on CUDA."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def format_bytes(num_bytes):
    """'512 MiB' / '1.23 GiB'."""
    if num_bytes >= GIB:
        return f"{num_bytes / GIB:.2f} GiB"
    return f"{num_bytes / 2**20:.0f} MiB"


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def is_out_of_memory(error):
    """Whether `error` is an allocation failure (CUDA OOM or a refused CPU allocation)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(error)


def time_candidates(steps, inputs, device, warmup, repeats):
    """Median-ready step times (seconds) per label, candidates interleaved round-robin.
    A candidate that runs out of memory is dropped and reported in `failures`."""
    embeddings = inputs["embeddings"]
    times = {label: [] for label in steps}
    failures = {}

    def run(label):
        embeddings.grad = None
        synchronize(device)
        start = time.perf_counter()
        try:
            steps[label]()
            synchronize(device)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            if not is_out_of_memory(error):
                raise
            failures[label] = "out of memory"
            return None
        return time.perf_counter() - start

    for round_index in range(warmup + repeats):
        labels = [label for label in steps if label not in failures]
        shift = round_index % max(len(labels), 1)
        for label in labels[shift:] + labels[:shift]:
            elapsed = run(label)
            if elapsed is not None and round_index >= warmup:
                times[label].append(elapsed)
        gc.collect()
    return {label: t for label, t in times.items() if label not in failures}, failures


def cuda_peak_bytes(label, inputs):
    """Peak CUDA allocation of one step of `label`, the inputs included."""
    inputs["embeddings"].grad = None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step = build_step(label, inputs)
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del step
    inputs["embeddings"].grad = None
    return peak


def child_peak_rss(label, args, batch):
    """Run one step of `label` in a fresh process of this script; its peak RSS in bytes
    (or an error string when the process failed or was killed)."""
    command = [
        sys.executable, "-m", "benchmarks.speed", "--child", label,
        "--device", "cpu", "--dtype", args.dtype, "--batches", str(batch), "--dim", str(args.dim),
        "--per-class", str(args.per_class), "--ref-size", str(args.ref_size),
    ] + (["--threads", str(args.threads)] if args.threads else [])
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if result.returncode != 0:
        last_error_line = (result.stderr.strip().splitlines() or [""])[-1]
        return f"{'killed' if result.returncode < 0 else 'failed'} (exit {result.returncode}) {last_error_line}"
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return measured.get("error", measured)


def cap_address_space():
    """On CPU, make an allocation beyond the free RAM fail with an error instead of
    getting the process OOM-killed: cap the address space at what is used now plus
    a safe share of the free RAM."""
    import psutil

    headroom = int(psutil.virtual_memory().available * MEMORY_SAFETY_FRACTION)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = psutil.Process().memory_info().vms + headroom
    resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def peak_rss_bytes():
    """Peak resident memory of this process since it started. Linux: VmHWM, which,
    unlike ru_maxrss, does not inherit the RSS of the parent that spawned us."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS


def run_child(args):
    """Body of the --child process: one step, then report the process's peak RSS as JSON."""
    import psutil

    inputs = make_inputs(args.batches[0], args.dim, args.per_class, args.ref_size, "cpu", DTYPES[args.dtype])
    step = build_step(args.child, inputs)
    baseline = psutil.Process().memory_info().rss
    cap_address_space()
    try:
        step()
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        print(json.dumps({"error": "out of memory"}))
        return
    print(json.dumps({"peak_rss": peak_rss_bytes(), "baseline_rss": baseline}))


def benchmark_batch(batch, labels, args):
    """Time and memory of every candidate at one batch size: a list of result rows."""
    device, dtype = args.device, DTYPES[args.dtype]
    inputs = make_inputs(batch, args.dim, args.per_class, args.ref_size, device, dtype)
    free = available_bytes(device) if args.max_memory is None else args.max_memory * GIB
    rows = {label: {"batch": batch, "loss": label} for label in labels}
    runnable = []
    for label in labels:
        needed = estimate_step_bytes(label, batch, args.ref_size, args.dim, args.per_class, dtype, device)
        rows[label]["estimated_bytes"] = needed
        if needed > free * MEMORY_SAFETY_FRACTION:
            rows[label]["skipped"] = f"skipped (needs ~{needed / GIB:.1f} GiB)"
        else:
            runnable.append(label)

    if device == "cpu" and not args.time_only:
        for label in runnable[:]:  # the subprocess also probes that the step fits
            measured = child_peak_rss(label, args, batch)
            if isinstance(measured, str):
                rows[label]["skipped"] = measured
                runnable.remove(label)
            else:
                rows[label].update(peak_bytes=measured["peak_rss"], baseline_bytes=measured["baseline_rss"])

    if not args.memory_only:
        if device == "cpu":
            cap_address_space()
        steps = {label: build_step(label, inputs) for label in runnable}
        times, failures = time_candidates(steps, inputs, device, args.warmup, args.repeats)
        del steps
        for label, reason in failures.items():
            rows[label]["skipped"] = reason
        for label, seconds in times.items():
            rows[label].update(median_ms=1e3 * statistics.median(seconds), times_ms=[1e3 * s for s in seconds])

    if device == "cuda" and not args.time_only:
        for label in runnable:
            if "skipped" not in rows[label]:
                try:
                    rows[label]["peak_bytes"] = cuda_peak_bytes(label, inputs)
                except torch.cuda.OutOfMemoryError:
                    rows[label]["skipped"] = "out of memory"

    add_ratios(rows)
    return list(rows.values())


def add_ratios(rows):
    """Median time of each row relative to the floor's and SupConLoss's at the same batch."""
    for reference in ("floor", "supcon"):
        base = rows.get(reference, {}).get("median_ms")
        for row in rows.values():
            if base and "median_ms" in row:
                row[f"x_{reference}"] = row["median_ms"] / base


def table_lines(rows, device):
    """Markdown table lines, one row per (batch, loss)."""
    memory_kind = "peak alloc" if device == "cuda" else "peak RSS"
    lines = [
        f"| batch | loss | median ms | min ms | x floor | x SupCon | {memory_kind} |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        median = f"{row['median_ms']:.2f}" if "median_ms" in row else row.get("skipped", "-")
        fastest = f"{min(row['times_ms']):.2f}" if "times_ms" in row else "-"
        ratios = [f"{row[key]:.2f}" if key in row else "-" for key in ("x_floor", "x_supcon")]
        memory = format_bytes(row["peak_bytes"]) if "peak_bytes" in row else "-"
        lines.append(f"| {row['batch']} | {row['loss']} | {median} | {fastest} | {ratios[0]} | {ratios[1]} | {memory} |")
    return lines


def plot(rows, title, path):
    """Time and peak memory against batch size, log-log, one line per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label in dict.fromkeys(row["loss"] for row in rows):
        mine = [row for row in rows if row["loss"] == label]
        for axis, key, scale in ((time_axis, "median_ms", 1), (memory_axis, "peak_bytes", 1 / 2**20)):
            points = [(row["batch"], row[key] * scale) for row in mine if key in row]
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
    batches = sorted({row["batch"] for row in rows})
    for axis, ylabel in ((time_axis, "forward+backward time (ms, median)"), (memory_axis, "peak memory (MiB)")):
        axis.set(xscale="log", yscale="log", xlabel="batch size", ylabel=ylabel)
        axis.set_xticks(batches, labels=[str(batch) for batch in batches])
        axis.set_xticks([], minor=True)
        axis.grid(True, which="both", alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def machine_description(device):
    """The device in words, for the report."""
    if device == "cuda":
        return f"cuda: {torch.cuda.get_device_name()}"
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, load average at start {load}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speed",
        description=__doc__.split("Examples:")[0],
        epilog="Examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--batches", type=parse_batches, default=parse_batches("256,1024,4096"),
                        help="comma-separated batch sizes (default 256,1024,4096)")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension D (default 256)")
    parser.add_argument("--per-class", type=int, default=4,
                        help="samples per class in a batch, >= 2 (default 4)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default cuda when present, else cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice, "
                             f"{torch.get_num_threads()} here)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="dtype of the embeddings (default float32)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed forward+backward runs per candidate, interleaved (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per candidate first (default 2)")
    parser.add_argument("--losses", type=parse_losses, default=list(LOSS_NAMES),
                        help=f"comma-separated candidates from {', '.join(LOSS_NAMES)} (default all); "
                             "floor: normalise + similarity matrix product + its backward; "
                             "multisim: MultiSimilarityLoss")
    parser.add_argument("--ice", type=parse_ice_kwargs, action="append", default=[], metavar="KEY=VALUE,...",
                        help="add an ICELoss variant with these keyword arguments, e.g. "
                             "memory_efficient=True,chunk_size=256 (repeatable)")
    parser.add_argument("--ref-size", type=int, default=0,
                        help="compare against a memory bank (ref_emb, ref_labels) of this many "
                             "embeddings instead of the batch itself (default 0: no bank)")
    parser.add_argument("--memory-only", action="store_true", help="measure peak memory, no timing")
    parser.add_argument("--time-only", action="store_true", help="measure time, no peak memory")
    parser.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                        help="memory budget for the skip rule, in GiB (default: free RAM or free GPU memory); "
                             f"a candidate estimated above {MEMORY_SAFETY_FRACTION} of it is skipped")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed"),
                        help="folder for the .md table, .json raw numbers and .png plot "
                             "(default benchmarks/results/speed)")
    parser.add_argument("--name", default=None,
                        help="file name stem of the outputs (default from device, dtype, D, batches, bank)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.per_class < 2:
        parser.error(f"--per-class must be >= 2 (a class needs a positive pair), got {args.per_class}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    for option, value, least in (("--dim", args.dim, 1), ("--repeats", args.repeats, 1),
                                 ("--warmup", args.warmup, 0), ("--ref-size", args.ref_size, 0)):
        if value < least:
            parser.error(f"{option} must be >= {least}, got {value}")
    if args.memory_only and args.time_only:
        parser.error("--memory-only and --time-only exclude each other")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        run_child(args)
        return
    labels = list(dict.fromkeys(args.losses + [ice_label(kwargs) for kwargs in args.ice]))
    bank = f", against a bank of {args.ref_size} embeddings" if args.ref_size else ""
    header = [
        machine_description(args.device),
        f"torch {torch.__version__}, {args.dtype}, D={args.dim}, {args.per_class} per class{bank}",
        f"median and min of {args.repeats} interleaved runs after {args.warmup} warm-up runs"
        if not args.memory_only else "memory only",
    ]
    if args.device == "cpu" and not args.time_only:
        header.append("peak RSS: whole fresh process (imports, inputs, one step)")
    print("\n".join(header), flush=True)

    rows = []
    for batch in args.batches:
        started = time.perf_counter()
        batch_rows = benchmark_batch(batch, labels, args)
        rows += batch_rows
        print("\n".join(table_lines(batch_rows, args.device)), flush=True)
        print(f"  (batch {batch} took {time.perf_counter() - started:.0f} s)", flush=True)

    if args.device == "cpu":
        header.append("load average at end " + ", ".join(f"{value:.1f}" for value in os.getloadavg()))
    args.out.mkdir(parents=True, exist_ok=True)
    bank_tag = f"_M{args.ref_size}" if args.ref_size else ""
    stem = args.name or f"{args.device}_{args.dtype}_D{args.dim}_B{args.batches[0]}-{args.batches[-1]}{bank_tag}"
    table = "\n".join([f"- {line}" for line in header] + [""] + table_lines(rows, args.device)) + "\n"
    (args.out / f"{stem}.md").write_text(table)
    (args.out / f"{stem}.json").write_text(json.dumps({"config": vars(args) | {"out": str(args.out)},
                                                      "header": header, "rows": rows}, indent=1))
    plot(rows, " | ".join(header[:2]), args.out / f"{stem}.png")
    print("\n" + table)
    print(f"wrote {args.out / stem}.md, .json, .png")


if __name__ == "__main__":
    main()
