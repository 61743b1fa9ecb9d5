"""Forward+backward time and peak memory of ICELoss against the floor and PML's losses.

The "floor" is the least any loss of this kind can cost: L2-normalise the embeddings,
take the similarity matrix product S = X X^T (or X R^T against a memory bank) and run
its backward with a ready-made gradient of S's shape, nothing else. Losses are named as
in ``python -m benchmarks.run`` (the same registry, ``benchmarks/core/loss_registry.py``), with
their miners, parameters after a colon, and ``floor`` as a pseudo-loss.

Timing: every candidate is warmed up, then the candidates run round-robin (the starting
candidate rotates each repeat) so machine noise hits all of them alike; the table gives
medians (and minimums) and the medians' ratios to the floor and to SupConLoss, all from
one run.

Memory: on CUDA, torch.cuda.max_memory_allocated of one step (peak reset before it); on
CPU, the peak resident memory (VmHWM) of a whole fresh process that runs one step,
so each (loss, batch) is measured in a subprocess of this script. A candidate whose
estimated memory exceeds what the machine has is skipped and reported as such.

Examples:
    python -m benchmarks.speed --device cpu --batches 512 --losses floor,ice,multisimilarity
    python -m benchmarks.speed --device cpu --batches 16384 --dim 128 --memory-only --losses ice
    python -m benchmarks.speed --device cuda --batches 4096 --dim 512 --ref-size 1048576 --losses floor,ice
    python -m benchmarks.speed --batches 4096 --losses floor,ice,ice:memory_efficient=True,chunk_size=256
"""

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pml_ice.losses import ICELoss

from .core import loss_specs
from .core.settings import integer_list
from .measuring.inputs import class_labels
from .measuring.memory import peak_rss_bytes
from .report.speed_report import GIB, add_ratios, header_lines, table_lines, write_report

FLOOR = "floor"
DEFAULT_CANDIDATES = "floor,ice,supcon,multisimilarity,pml_ntxent"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Fraction of the free memory a single step may be estimated to need before it is skipped.
MEMORY_SAFETY_FRACTION = 0.7


def parse_candidates(text):
    """'floor,ice:chunk_size=256,multisimilarity' -> ['floor', LossSpec, LossSpec]: the
    run harness's loss specs, plus the pseudo-loss 'floor'."""
    try:
        pieces = loss_specs.split_spec_texts(text)
        candidates = [FLOOR if p.strip() == FLOOR else loss_specs.parse_loss_spec(p) for p in pieces]
    except loss_specs.LossSpecError as error:
        raise argparse.ArgumentTypeError(f"{error} (or '{FLOOR}')")
    labels = [candidate_label(c) for c in candidates]
    if not candidates or len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"--losses {text!r}: give each candidate once")
    return candidates


def candidate_label(candidate):
    return FLOOR if candidate == FLOOR else candidate.label


def make_inputs(batch, dim, per_class, ref_size, device, dtype, seed=0):
    """Random embeddings (requiring grad) with `per_class` samples per class, and an
    optional memory bank of `ref_size` embeddings whose first classes are the batch's."""
    generator = torch.Generator().manual_seed(seed)
    labels = class_labels(batch, per_class, generator)
    embeddings = torch.randn(batch, dim, generator=generator).to(device, dtype)
    inputs = {"embeddings": embeddings.requires_grad_(), "labels": labels.to(device)}
    inputs["ref_emb"] = inputs["ref_labels"] = None
    if ref_size:
        ref_labels = class_labels(ref_size, per_class, generator)
        inputs["ref_emb"] = torch.randn(ref_size, dim, generator=generator).to(device, dtype)
        inputs["ref_labels"] = ref_labels.to(device)
    return inputs


def build_step(candidate, inputs):
    """A function running one forward+backward of `candidate` on `inputs`."""
    embeddings, ref_emb = inputs["embeddings"], inputs["ref_emb"]
    if candidate == FLOOR:
        ref_rows = len(embeddings) if ref_emb is None else len(ref_emb)
        upstream_grad = torch.randn(len(embeddings), ref_rows, device=embeddings.device, dtype=embeddings.dtype)

        def floor_step():
            normalized = F.normalize(embeddings, dim=1)
            ref = normalized if ref_emb is None else F.normalize(ref_emb, dim=1)
            (normalized @ ref.T).backward(upstream_grad)

        return floor_step

    all_labels = inputs["labels"] if ref_emb is None else torch.cat([inputs["labels"], inputs["ref_labels"]])
    loss_func, miner = candidate.build(int(all_labels.max()) + 1, embeddings.shape[1])
    loss_func.to(embeddings.device)
    pair_args = dict(ref_emb=ref_emb, ref_labels=inputs["ref_labels"])

    def loss_step():
        indices_tuple = miner(embeddings, inputs["labels"], **pair_args) if miner else None
        loss_func(embeddings, inputs["labels"], indices_tuple, **pair_args).backward()

    return loss_step


def estimate_step_bytes(candidate, batch, ref_size, dim, per_class, dtype, device):
    """Rough upper estimate of the memory one step needs, from its O(...) terms.

    The per-element byte counts are calibrated on measured peaks (CPU RSS, H100/H200
    allocations): PML's pair-based losses hold int64 pair indices (16 bytes per pair)
    next to several float (batch x ref) matrices; NTXentLoss holds a
    (positive pairs x negative pairs) matrix with a mask; ICE holds the logits its
    ``computation_plan`` says it holds at its peak.
    """
    elem = torch.finfo(dtype).bits // 8
    ref = ref_size or batch
    pairs = batch * ref
    vectors = 4 * (batch + ref) * dim * 4  # embeddings, normalised copies, gradients
    if candidate == FLOOR:
        return vectors + 4 * pairs * elem
    if issubclass(candidate.entry.loss_class(), ICELoss):
        loss_func, miner = candidate.build(max(1, batch // per_class), dim)
        plan = loss_func.computation_plan(batch, ref_size or None, miner is not None, device, dtype)
        return vectors + plan.peak_logits * (9 + 2 * elem) + 64 * batch * per_class
    if candidate.name == "pml_ntxent":
        positives = batch * per_class if ref_size else batch * (per_class - 1)
        negatives = pairs - positives - (0 if ref_size else batch)
        return vectors + pairs * 40 + positives * negatives * (4 * elem + 2)
    return vectors + pairs * (28 + 8 * elem)


def available_bytes(device):
    """Memory a step may use: free RAM on CPU, free device memory on CUDA."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def is_out_of_memory(error):
    """Whether `error` is an allocation failure (CUDA OOM or a refused CPU allocation)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(error)


def time_candidates(steps, inputs, device, warmup, repeats):
    """Step times (seconds) per label, candidates interleaved round-robin.
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


def cuda_peak_bytes(candidate, inputs):
    """Peak CUDA allocation of one step of `candidate`, the inputs included."""
    inputs["embeddings"].grad = None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    build_step(candidate, inputs)()
    torch.cuda.synchronize()
    inputs["embeddings"].grad = None
    return torch.cuda.max_memory_allocated()


def child_peak_rss(label, args, batch):
    """Run one step of `label` in a fresh process of this script; its peak RSS in bytes
    (or an error string when the process failed or was killed)."""
    command = [
        sys.executable, "-m", "benchmarks.speed", "--child", "--losses", label,
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


def run_child(args):
    """Body of the --child process: one step, then report the process's peak RSS as JSON."""
    import psutil

    inputs = make_inputs(args.batches[0], args.dim, args.per_class, args.ref_size, "cpu", DTYPES[args.dtype])
    step = build_step(args.losses[0], inputs)
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


def runnable_candidates(rows, candidates, batch, args):
    """Candidates whose estimated memory fits; the others' rows say why they were skipped."""
    dtype = DTYPES[args.dtype]
    free = available_bytes(args.device) if args.max_memory is None else args.max_memory * GIB
    runnable = []
    for candidate in candidates:
        row = rows[candidate_label(candidate)]
        row["estimated_bytes"] = estimate_step_bytes(
            candidate, batch, args.ref_size, args.dim, args.per_class, dtype, args.device
        )
        if row["estimated_bytes"] > free * MEMORY_SAFETY_FRACTION:
            row["skipped"] = f"skipped (needs ~{row['estimated_bytes'] / GIB:.1f} GiB)"
        else:
            runnable.append(candidate)
    return runnable


def measure_cpu_memory(rows, runnable, batch, args):
    """Peak RSS of each candidate in a fresh process (which also probes that it fits)."""
    for candidate in list(runnable):
        label = candidate_label(candidate)
        measured = child_peak_rss(label, args, batch)
        if isinstance(measured, str):
            rows[label]["skipped"] = measured
            runnable.remove(candidate)
        else:
            rows[label].update(peak_bytes=measured["peak_rss"], baseline_bytes=measured["baseline_rss"])


def measure_times(rows, runnable, inputs, args):
    if args.device == "cpu":
        cap_address_space()
    steps = {candidate_label(c): build_step(c, inputs) for c in runnable}
    times, failures = time_candidates(steps, inputs, args.device, args.warmup, args.repeats)
    for label, reason in failures.items():
        rows[label]["skipped"] = reason
    for label, seconds in times.items():
        rows[label].update(median_ms=1e3 * statistics.median(seconds), times_ms=[1e3 * s for s in seconds])


def measure_cuda_memory(rows, runnable, inputs):
    for candidate in runnable:
        row = rows[candidate_label(candidate)]
        if "skipped" not in row:
            try:
                row["peak_bytes"] = cuda_peak_bytes(candidate, inputs)
            except torch.cuda.OutOfMemoryError:
                row["skipped"] = "out of memory"


def benchmark_batch(batch, candidates, args):
    """Time and memory of every candidate at one batch size: a list of result rows."""
    rows = {candidate_label(c): {"batch": batch, "loss": candidate_label(c)} for c in candidates}
    runnable = runnable_candidates(rows, candidates, batch, args)
    if args.device == "cpu" and not args.time_only:
        measure_cpu_memory(rows, runnable, batch, args)
    inputs = make_inputs(batch, args.dim, args.per_class, args.ref_size, args.device, DTYPES[args.dtype])
    if not args.memory_only:
        measure_times(rows, runnable, inputs, args)
    if args.device == "cuda" and not args.time_only:
        measure_cuda_memory(rows, runnable, inputs)
    add_ratios(rows)
    return list(rows.values())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speed",
        description=__doc__.split("Examples:")[0],
        epilog="Examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--batches", type=integer_list(2), default=integer_list(2)("256,1024,4096"),
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
    parser.add_argument("--losses", type=parse_candidates, default=parse_candidates(DEFAULT_CANDIDATES),
                        help=f"candidates, named as in benchmarks.run (default {DEFAULT_CANDIDATES}); "
                             "parameters follow a colon (ice:memory_efficient=True,chunk_size=256); "
                             "floor: normalise + similarity matrix product + its backward")
    parser.add_argument("--ref-size", type=int, default=0,
                        help="compare against a memory bank (ref_emb, ref_labels) of this many "
                             "embeddings instead of the batch itself (default 0: no bank)")
    parser.add_argument("--memory-only", action="store_true", help="measure peak memory, no timing")
    parser.add_argument("--time-only", action="store_true", help="measure time, no peak memory")
    parser.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                        help="memory budget for the skip rule, in GiB (default: free RAM or free GPU memory); "
                             f"a candidate estimated above {MEMORY_SAFETY_FRACTION} of it is skipped")
    parser.add_argument("--out", type=Path, default=Path("results/speed"),
                        help="folder for the .md table, .json raw numbers and .png plot "
                             "(default results/speed)")
    parser.add_argument("--name", default=None,
                        help="file name stem of the outputs (default from device, dtype, D, batches, bank)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
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
    header = header_lines(args)
    print("\n".join(header), flush=True)
    rows = []
    for batch in args.batches:
        started = time.perf_counter()
        batch_rows = benchmark_batch(batch, args.losses, args)
        rows += batch_rows
        print("\n".join(table_lines(batch_rows, args.device)), flush=True)
        print(f"  (batch {batch} took {time.perf_counter() - started:.0f} s)", flush=True)
    write_report(rows, header, args)


if __name__ == "__main__":
    main()
