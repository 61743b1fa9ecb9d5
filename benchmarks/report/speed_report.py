"""Reporting of ``benchmarks/speed.py``'s measurements: ratios, a Markdown table, the raw
numbers as JSON and a log-log plot of time and memory against the batch size."""

import json
import os
import platform

import torch

from ..storage.files import atomic_write_text
from .plots import save_figure

GIB = 2**30


def format_bytes(num_bytes):
    """'512 MiB' / '1.23 GiB'."""
    if num_bytes >= GIB:
        return f"{num_bytes / GIB:.2f} GiB"
    return f"{num_bytes / 2**20:.0f} MiB"


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


def machine_description(device):
    """The device in words."""
    if device == "cuda":
        return f"cuda: {torch.cuda.get_device_name()}"
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, load average at start {load}")


def header_lines(args):
    """What was measured, where and how: the report's first lines."""
    bank = f", against a bank of {args.ref_size} embeddings" if args.ref_size else ""
    lines = [
        machine_description(args.device),
        f"torch {torch.__version__}, {args.dtype}, D={args.dim}, {args.per_class} per class{bank}",
        f"median and min of {args.repeats} interleaved runs after {args.warmup} warm-up runs"
        if not args.memory_only else "memory only",
    ]
    if args.device == "cpu" and not args.time_only:
        lines.append("peak RSS: whole fresh process (imports, inputs, one step)")
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
    save_figure(figure, path, dpi=120)
    plt.close(figure)


def write_report(rows, header, args):
    """``<stem>.md`` (table), ``<stem>.json`` (every timing) and ``<stem>.png`` under --out."""
    if args.device == "cpu":
        header = header + ["load average at end " + ", ".join(f"{v:.1f}" for v in os.getloadavg())]
    args.out.mkdir(parents=True, exist_ok=True)
    bank_tag = f"_M{args.ref_size}" if args.ref_size else ""
    stem = args.name or f"{args.device}_{args.dtype}_D{args.dim}_B{args.batches[0]}-{args.batches[-1]}{bank_tag}"
    table = "\n".join([f"- {line}" for line in header] + [""] + table_lines(rows, args.device)) + "\n"
    atomic_write_text(args.out / f"{stem}.md", table)
    config = {key: str(value) if key in ("out", "losses") else value for key, value in vars(args).items()}
    atomic_write_text(args.out / f"{stem}.json", json.dumps({"config": config, "header": header, "rows": rows}, indent=1))
    plot(rows, " | ".join(header[:2]), args.out / f"{stem}.png")
    print("\n" + table)
    print(f"wrote {args.out / stem}.md, .json, .png")
