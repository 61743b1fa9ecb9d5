"""What ``python -m benchmarks.tune`` writes: best.toml, tuning.md and one plot per loss."""

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import optuna

from ..core.files import atomic_write_text
from ..core.settings import Settings
from ..core.loss_registry import LOSSES
from ..core.tuning import FINAL_SEEDS, best_trial, budget, counted_trials
from ..data.splits import BenchmarkData
from .plots import save_figure

def write_best_toml(path: Path, settings: Settings, studies: Dict[str, object], trials: int, command: str) -> Optional[str]:
    """best.toml: the budget options and the best spec of each loss; None when a loss has no completed trial."""
    best = {loss: best_trial(study, trials) for loss, study in studies.items()}
    if any(t is None for t in best.values()):
        return None
    values = budget(settings)
    values["seeds"] = FINAL_SEEDS
    values["losses"] = ",".join(t.user_attrs["loss"] for t in best.values())
    lines = [f"# Written by: {command}",
             f"# Best of {trials} trials per loss on validation MAP@R (test split never evaluated); see tuning.md.",
             "# Run the final comparison with: python -m benchmarks.run --config " + path.name]
    for key, value in values.items():
        if value is not None:
            lines.append(f"{key} = {json.dumps(value)}")  # JSON scalars are valid TOML values
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return text


def write_report(out: Path, settings: Settings, data: BenchmarkData, studies: Dict[str, object], trials: int, seeds: int, command: str) -> None:
    """tuning.md (every trial of every study) and one plot per loss."""
    parts = ["# Tuning on validation MAP@R", "", f"Command: `{command}`", "",
             f"- dataset: {settings.dataset} (train {len(data.train)} images, validation {len(data.val)} images; "
             "test split not loaded)",
             f"- budget per trial: {seeds} seed(s), " + ", ".join(f"{k}={v}" for k, v in budget(settings).items()),
             f"- Optuna TPE, {trials} trials per loss; value = best validation MAP@R over the trained epochs, mean over seeds",
             ""]
    for loss, study in studies.items():
        counted = {t.number for t in counted_trials(study, trials)}
        best = best_trial(study, trials)
        parts += [f"## {loss}", "", "Search space: " + "; ".join(p.describe() for p in LOSSES[loss].search_space) + ".", "",
                  f"Best: `{best.user_attrs['loss']}`, val MAP@R {100 * best.value:.2f}" if best else "Best: none yet", "",
                  "| trial | state | val MAP@R | settings | seconds | process |", "|---|---|---|---|---|---|"]
        for t in study.get_trials(deepcopy=False):
            state = t.state.name.lower()
            if t.state == optuna.trial.TrialState.PRUNED:
                state = "diverged"
            elif t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL):
                state += " (not counted)"
            elif t.number not in counted:
                state += " (beyond the budget, not counted)"
            value = f"{100 * t.value:.2f}" if t.value is not None else "-"
            seconds = f"{t.duration.total_seconds():.0f}" if t.duration else "-"
            parts.append(f"| {t.number} | {state} | {value} | `{t.user_attrs.get('loss', '?')}` | {seconds} | {t.user_attrs.get('process', '-')} |")
        parts.append("")
        write_plot(out / "plots" / f"{loss}.png", loss, counted_trials(study, trials))
    atomic_write_text(out / "tuning.md", "\n".join(parts))


def write_plot(path: Path, loss: str, trials: Sequence) -> None:
    """Validation MAP@R against the trial number (with the running best) and against the main parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = [t for t in trials if t.value is not None]
    main = LOSSES[loss].search_space[0]
    fig, (by_trial, by_param) = plt.subplots(1, 2, figsize=(10, 4))
    numbers, values = [t.number for t in complete], [100 * t.value for t in complete]
    by_trial.plot(numbers, values, "o", label="trial")
    by_trial.step(numbers, np.maximum.accumulate(values) if values else [], where="post", label="best so far")
    by_trial.set_xlabel("trial")
    by_trial.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    by_trial.legend(fontsize=8)
    by_param.plot([t.params[main.name] for t in complete], values, "o")
    if main.log:
        by_param.set_xscale("log")
    by_param.set_xlabel(main.name)
    for ax in (by_trial, by_param):
        ax.set_ylabel("validation MAP@R (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{loss}: {len(complete)} completed trials")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
