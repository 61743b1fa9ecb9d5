"""Speed and memory of the large-batch tools, on the CPU:

    python -m benchmarks.scale_speed [--processes 4] [--global-batch 8192] ...

(a) Sharded loss: ``--processes`` gloo processes, global batch ``--global-batch`` of
    D = ``--dim`` embeddings (4 per class), ICELoss under DistributedLossWrapper:
    each process's forward + backward time of the loss alone (leaf embeddings) with
    ``efficient=True`` (exact sharding, n x N logits) and PML's ``efficient=False``
    (N x N logits on every process), and each process's peak resident memory
    (``measuring.memory``) over the measured steps, above its resident size before them.
(b) Cached training: the glyphs harness's model (``cnn4`` and a 64-d linear embedder, on
    1 x 32 x 32 inputs; ``--model module:function`` substitutes any factory of a model) trained
    with ICELoss(memory_efficient=True, chunk_size=``--loss-chunk-size``), so that the
    loss's memory is linear in the batch and small: an uncached step at ``--small-batch``, an uncached step at
    ``--large-batch`` and a cached step (cached_backward, ``--chunk-size``) at
    ``--large-batch``, each in a fresh process: peak memory above the process's
    resident size before the step, the median wall time, and the cached gradients
    against the uncached ones at the large batch. BatchNorm runs in eval mode in
    all three (``freeze_batchnorm``), where caching is exact; the inputs are random;
    glibc's ``MALLOC_MMAP_THRESHOLD_`` is 128 KiB in these processes.

Every process uses one thread (``torch.set_num_threads(1)``). The results go to
``results/scale/scale_speed.json``; ``--part sharded`` or ``--part cached`` measures one
part and replaces only its entry there.
"""

import argparse
import importlib
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning.utils import distributed as pml_distributed

from pml_ice import losses
from pml_ice.utils import cached_backward
from pml_ice.utils.distributed import DistributedLossWrapper

from .core.models import build_embedder, build_trunk
from .measuring.inputs import class_labels
from .measuring.memory import MIB, current_rss_bytes, peak_rss_bytes, run_in_fresh_process
from .storage.files import atomic_write_json

RESULTS = os.path.join("results", "scale", "scale_speed.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Speed and memory of sharded ICE and gradient caching")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--small-batch", type=int, default=512)
    parser.add_argument("--large-batch", type=int, default=4096)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument(
        "--loss-chunk-size", type=int, default=256,
        help="anchors per chunk of ICELoss(memory_efficient=True) in (b)",
    )
    parser.add_argument("--part", choices=("all", "sharded", "cached"), default="all")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--model", default=None, help="module:function returning the CNN")
    parser.add_argument("--output", default=RESULTS)
    return parser.parse_args(argv)


def timed_steps(step, repeats):
    """Median wall time of ``repeats`` calls of ``step`` after one warm-up, and the
    peak memory above the resident size before the warm-up."""
    before = current_rss_bytes()
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_mib": (peak_rss_bytes() - before) / MIB}


def sharded_worker(rank, world_size, port, variant, args, out_dir):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        generator = torch.Generator().manual_seed(0)
        embeddings = torch.randn(args.global_batch, args.dim, generator=generator)
        labels = class_labels(args.global_batch, 4, generator)
        local = slice(
            rank * args.global_batch // world_size, (rank + 1) * args.global_batch // world_size
        )
        local_embeddings, local_labels = embeddings[local].clone().requires_grad_(), labels[local]
        del embeddings
        if variant == "efficient":
            wrapper = DistributedLossWrapper(losses.ICELoss(), efficient=True)
        else:
            wrapper = pml_distributed.DistributedLossWrapper(losses.ICELoss(), efficient=False)

        def step():
            local_embeddings.grad = None
            wrapper(local_embeddings, local_labels).backward()
            dist.barrier()

        result = timed_steps(step, args.repeats)
        with open(os.path.join(out_dir, f"{variant}-{rank}.json"), "w") as out:
            json.dump(result, out)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_sharded(args):
    per_variant = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for variant in ("efficient", "pml"):
            mp.spawn(
                sharded_worker,
                args=(args.processes, free_port(), variant, args, out_dir),
                nprocs=args.processes,
            )
            ranks = []
            for rank in range(args.processes):
                with open(os.path.join(out_dir, f"{variant}-{rank}.json")) as result:
                    ranks.append(json.load(result))
            per_variant[variant] = {
                "seconds_per_process": max(r["seconds"] for r in ranks),
                "peak_mib_per_process": max(r["peak_mib"] for r in ranks),
                "ranks": ranks,
            }
    efficient, pml = per_variant["efficient"], per_variant["pml"]
    return {
        "processes": args.processes,
        "global_batch": args.global_batch,
        "dim": args.dim,
        "efficient_true": efficient,
        "pml_efficient_false": pml,
        "time_ratio": efficient["seconds_per_process"] / pml["seconds_per_process"],
        "memory_ratio": efficient["peak_mib_per_process"] / pml["peak_mib_per_process"],
    }


def build_model(spec):
    """The harness's glyphs model (``cnn4`` and a 64-d linear embedder), or ``module:function``'s."""
    if spec is None:
        trunk = build_trunk("cnn4", 1, pretrained=False)
        return torch.nn.Sequential(trunk, build_embedder(trunk.output_size, 64))
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)()


def cached_worker(mode, batch, args, out_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(args.model)
    model.train()
    model.apply(lambda layer: layer.eval() if "BatchNorm" in type(layer).__name__ else None)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(args.large_batch, 1, 32, 32, generator=generator)[:batch]
    labels = class_labels(args.large_batch, 4, generator)[:batch]
    loss_func = losses.ICELoss(memory_efficient=True, chunk_size=args.loss_chunk_size)

    def step():
        model.zero_grad()
        if mode == "cached":
            cached_backward(model, inputs, labels, loss_func, args.chunk_size, freeze_batchnorm=True)
        else:
            loss_func(model(inputs), labels).backward()

    result = timed_steps(step, args.repeats)
    torch.save({"result": result, "grads": [p.grad for p in model.parameters()]}, out_path)


def measure_cached(args):
    # freed blocks of 128 KiB and more go back to the system (glibc), so that the
    # resident size follows the tensors' memory; read when each fresh process starts
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    runs = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for mode, batch in (
            ("uncached", args.small_batch),
            ("uncached", args.large_batch),
            ("cached", args.large_batch),
        ):
            path = os.path.join(out_dir, f"{mode}-{batch}.pt")
            run_in_fresh_process(cached_worker, mode, batch, args, path)
            runs[f"{mode}_{batch}"] = torch.load(path)
    small = runs[f"uncached_{args.small_batch}"]["result"]
    large = runs[f"uncached_{args.large_batch}"]
    cached = runs[f"cached_{args.large_batch}"]
    grad_error = max(
        ((c - u).abs().max() / u.abs().max()).item()
        for c, u in zip(cached["grads"], large["grads"])
    )
    return {
        "model": args.model or "cnn4",
        "chunk_size": args.chunk_size,
        f"uncached_{args.small_batch}": small,
        f"uncached_{args.large_batch}": large["result"],
        f"cached_{args.large_batch}": cached["result"],
        "memory_vs_small_uncached": cached["result"]["peak_mib"] / small["peak_mib"],
        "time_vs_large_uncached": cached["result"]["seconds"] / large["result"]["seconds"],
        "max_relative_grad_error": grad_error,
    }


def main(argv=None):
    args = parse_args(argv)
    results = {}
    if args.part != "all" and os.path.exists(args.output):
        with open(args.output) as previous:
            results = json.load(previous)
    parts = {"sharded": ("sharded_loss", measure_sharded), "cached": ("cached_training", measure_cached)}
    for part, (key, measure) in parts.items():
        if args.part in ("all", part):
            load = os.getloadavg()
            results[key] = {"load_average_at_start": load, **measure(args)}
            print(json.dumps(results[key], indent=2))
    atomic_write_json(args.output, results)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
