"""The figures of the harness, each written by ``save_figure`` (atomically, as PNG)."""

import io
from pathlib import Path
from typing import Dict, List, Sequence

from ..storage.files import atomic_write_bytes
from ..core.metrics import PRIMARY_METRIC, SHORT_NAMES
from ..core.results import best_epoch_rows
from .mean_std import mean_std


def save_figure(fig, path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` as PNG atomically (a reader sees the old file or the new one)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


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
        written.append(save_figure(fig, folder / name, dpi=110))
        plt.close(fig)
    return written


def _draw_curves(plt, rows: Sequence[dict], losses: Sequence[str]):
    """Validation MAP@R, R@1 and NMI against epoch (the test split is evaluated at the best
    validation epoch only: ``_draw_bars``); band = std over seeds."""
    curve_metrics = ["val_" + PRIMARY_METRIC, "val_recall_at_1", "val_NMI"]
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
