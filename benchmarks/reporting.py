"""results.csv, summary.md and the plots, rebuilt from the rows of every run."""

import csv
import io
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from .files import atomic_write_bytes, atomic_write_text
from .metrics import METRICS, PRIMARY_METRIC

COLUMNS = ["loss", "seed", "epoch", *METRICS, *("val_" + m for m in METRICS)]
SHORT_NAMES = {
    "precision_at_1": "P@1",
    "recall_at_1": "R@1",
    "recall_at_2": "R@2",
    "recall_at_4": "R@4",
    "recall_at_8": "R@8",
    "r_precision": "RP",
    "mean_average_precision_at_r": "MAP@R",
    "NMI": "NMI",
}


def sort_rows(rows: Sequence[dict], loss_order: Sequence[str]) -> List[dict]:
    order = {label: i for i, label in enumerate(loss_order)}
    return sorted(rows, key=lambda r: (order[r["loss"]], r["seed"], r["epoch"]))


def write_results_csv(path, rows: Sequence[dict]) -> None:
    """Write ``rows`` (one per loss, seed and evaluated epoch) atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in COLUMNS})
    atomic_write_text(path, buffer.getvalue())


def best_epoch_rows(rows: Sequence[dict]) -> Dict[str, List[dict]]:
    """Per loss, the row of each seed's best validation epoch (earliest on ties)."""
    by_run: Dict[tuple, List[dict]] = {}
    for row in rows:
        by_run.setdefault((row["loss"], row["seed"]), []).append(row)
    best: Dict[str, List[dict]] = {}
    for (loss, _), run_rows in by_run.items():
        key = "val_" + PRIMARY_METRIC
        top = max(run_rows, key=lambda r: (_finite(r[key]), -r["epoch"]))
        best.setdefault(loss, []).append(top)
    return best


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def mean_std(values: Sequence[float]):
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def mean_std_text(rows: Sequence[dict], metric: str) -> str:
    """``"mean ± std"`` of a metric over rows, in %."""
    mean, std = mean_std([100 * r[metric] for r in rows])
    return f"{mean:.1f} ± {std:.1f}"


def summary_table(rows: Sequence[dict], loss_order: Sequence[str]) -> str:
    """Markdown table: mean ± std over seeds of the test metrics at the best validation epoch."""
    best = best_epoch_rows(rows)
    header = ["loss", "seeds", "best epoch"] + [SHORT_NAMES[m] for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    def line(name, chosen, epoch_text):
        cells = [name, str(len(chosen)), epoch_text]
        for metric in METRICS:
            mean, std = mean_std([r[metric] * 100 for r in chosen])
            cells.append(f"{mean:.1f} ± {std:.1f}")
        return "| " + " | ".join(cells) + " |"

    # The untrained model (epoch 0) is the same for every loss of a seed: one baseline row.
    untrained = {r["seed"]: r for r in rows if r["epoch"] == 0}
    if untrained:
        lines.append(line("untrained model", list(untrained.values()), "0"))
    for loss in [l for l in loss_order if l in best]:
        chosen = best[loss]
        lines.append(line(f"`{loss}`", chosen, f"{mean_std([r['epoch'] for r in chosen])[0]:.1f}"))
    return "\n".join(lines)


def write_summary(path, rows, loss_order, header_lines: Sequence[str], failures: Dict[Tuple[str, int], str],
                  comparison: str = "") -> str:
    """Write summary.md atomically and return the table of ``rows``; ``failures`` maps
    (loss, seed) of each failed run, whose rows the caller leaves out, to its error;
    ``comparison`` is the markdown of ``significance.comparison_table``."""
    table = summary_table(rows, loss_order)
    parts = ["# Benchmark summary", "", *header_lines, "",
             "Test metrics (%) at each run's best validation epoch (validation MAP@R), "
             "mean ± standard deviation over seeds.", "", table, ""]
    if comparison:  # significance: paired tests over test queries
        parts += ["## Paired comparisons (test queries, best validation epoch)", "", comparison, ""]
    if failures:
        parts += ["## Failed runs (left out of the table)", ""]
        parts += [f"- `{loss}` seed {seed}: {error}" for (loss, seed), error in sorted(failures.items())] + [""]
    atomic_write_text(path, "\n".join(parts))
    return table


def write_plots(folder, rows: Sequence[dict], loss_order: Sequence[str]) -> List[Path]:
    """Metric-against-epoch curves per loss and a bar chart with error bars (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    losses = [l for l in loss_order if any(r["loss"] == l for r in rows)]
    written = []
    for draw, name in ((_draw_curves, "curves.png"), (_draw_bars, "summary_bars.png")):
        fig = draw(plt, rows, losses)
        fig.tight_layout()
        written.append(_save_figure(fig, folder / name))
        plt.close(fig)
    return written


def _draw_curves(plt, rows: Sequence[dict], losses: Sequence[str]):
    """Test MAP@R, R@1, NMI and validation MAP@R against epoch; band = std over seeds."""
    curve_metrics = ["mean_average_precision_at_r", "recall_at_1", "NMI", "val_" + PRIMARY_METRIC]
    fig, axes = plt.subplots(1, len(curve_metrics), figsize=(5 * len(curve_metrics), 4))
    for ax, metric in zip(axes, curve_metrics):
        for loss in losses:
            by_epoch: Dict[int, List[float]] = {}
            for r in rows:
                if r["loss"] == loss:
                    by_epoch.setdefault(r["epoch"], []).append(r[metric] * 100)
            epochs = sorted(by_epoch)
            stats = [mean_std(by_epoch[e]) for e in epochs]
            means = [m for m, _ in stats]
            line, = ax.plot(epochs, means, marker=".", label=loss)
            ax.fill_between(epochs, [m - s for m, s in stats], [m + s for m, s in stats],
                            color=line.get_color(), alpha=0.15)
        name = metric.replace("val_", "")
        ax.set_title(("validation " if metric.startswith("val_") else "test ") + SHORT_NAMES[name])
        ax.set_xlabel("epoch")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def _draw_bars(plt, rows: Sequence[dict], losses: Sequence[str]):
    """Test metrics at the best validation epoch, with error bars (std over seeds)."""
    best = best_epoch_rows(rows)
    bar_metrics = ["precision_at_1", "recall_at_8", "r_precision", "mean_average_precision_at_r", "NMI"]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(bar_metrics), 4))
    width = 0.8 / max(1, len(losses))
    for i, loss in enumerate(losses):
        stats = [mean_std([r[m] * 100 for r in best[loss]]) for m in bar_metrics]
        xs = [j + i * width for j in range(len(bar_metrics))]
        ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=3, label=loss)
    ax.set_xticks([j + width * (len(losses) - 1) / 2 for j in range(len(bar_metrics))])
    ax.set_xticklabels([SHORT_NAMES[m] for m in bar_metrics])
    ax.set_ylabel("% (test, best validation epoch)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _save_figure(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
    return path
