"""What ``python -m benchmarks.tune`` writes: best.toml, tuning.md and one plot per loss."""

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import optuna

from ..storage.files import atomic_write_text
from ..core.loss_registry import LOSSES
from ..core.tuning import FINAL_SEEDS, PRUNER, Tuning, best_trial, budget, counted_trials
from .plots import save_figure

def write_tuning(out: Path, tuning: Tuning, command: str) -> Optional[str]:
    """tuning.md, plots/<loss>.png and best.toml of a tuning; returns best.toml's text (None, and no
    best.toml, while a loss has no completed trial)."""
    write_report(out, tuning, command)
    return write_best_toml(out / "best.toml", tuning, command)


def write_best_toml(path: Path, tuning: Tuning, command: str) -> Optional[str]:
    """best.toml: the budget options and the best spec of each loss; None when a loss has no completed trial."""
    best = tuning.best_specs()
    if best is None:
        return None
    values = budget(tuning.settings)
    values["seeds"] = FINAL_SEEDS
    values["losses"] = ",".join(spec.label for spec in best.values())
    lines = [f"# Written by: {command}",
             f"# Best of {tuning.trials} trials per loss on validation MAP@R (test split never evaluated); see tuning.md.",
             "# Run the final comparison with: python -m benchmarks.run --config " + path.name]
    for key, value in values.items():
        if value is not None:
            lines.append(f"{key} = {json.dumps(value)}")  # JSON scalars are valid TOML values
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return text


def write_report(out: Path, tuning: Tuning, command: str) -> None:
    """tuning.md (every trial of every study) and one plot per loss."""
    settings, data, studies, trials, seeds = tuning.settings, tuning.data, tuning.studies, tuning.trials, tuning.seeds
    parts = ["# Tuning on validation MAP@R", "", f"Command: `{command}`", "",
             f"- dataset: {settings.dataset} (train {len(data.train)} images, validation {len(data.val)} images; "
             "test split not loaded)",
             f"- budget per trial: {seeds} seed(s), " + ", ".join(f"{k}={v}" for k, v in budget(settings).items()),
             f"- Optuna TPE (the same seed for every loss), {PRUNER}; value = best validation MAP@R over the "
             "trained epochs, mean over seeds; a pruned trial's value is the best validation MAP@R it had reached",
             "", f"trials per loss: {trials}", "", *trial_counts_table(studies, trials, settings.m_per_class), ""]
    for loss, study in studies.items():
        counted = {t.number for t in counted_trials(study, trials)}
        best = best_trial(study, trials)
        parts += [f"## {loss}", "", "Search space: " + "; ".join(p.describe() for p in LOSSES[loss].search_space) + ".", "",
                  f"Best: `{best.user_attrs['loss']}`, val MAP@R {100 * best.value:.2f}" if best else "Best: none yet", "",
                  *([f"At an edge of its space: {edges}; widen the space and tune {loss} again.", ""]
                    if (edges := edge_text(loss, best, settings.m_per_class)) else []),
                  *([f"No effect at the best trial: {inert}.", ""]
                    if (inert := inert_text(loss, best, settings.m_per_class)) else []),
                  "| trial | state | val MAP@R | epochs | settings | seconds | process |", "|---|---|---|---|---|---|---|"]
        for t in study.get_trials(deepcopy=False):
            state = trial_outcome(t)
            if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL):
                state += " (not counted)"
            elif t.number not in counted:
                state += " (beyond the budget, not counted)"
            value = trial_value(t)
            shown = f"{100 * value:.2f}" if value is not None else "-"
            seconds = f"{t.duration.total_seconds():.0f}" if t.duration else "-"
            epochs = "-" if t.last_step is None else str(t.last_step)
            parts.append(f"| {t.number} | {state} | {shown} | {epochs} | `{t.user_attrs.get('loss', '?')}` | {seconds} "
                         f"| {t.user_attrs.get('process', '-')} |")
        parts.append("")
        write_plot(out / "plots" / f"{loss}.png", loss, counted_trials(study, trials))
    atomic_write_text(out / "tuning.md", "\n".join(parts))


def edge_text(loss: str, best, m_per_class: int) -> str:
    """The parameters of the best trial that sit at an edge of the loss's search space, except those
    that cannot change the loss in that trial (widening their range would change nothing)."""
    if best is None:
        return ""
    found = [(p, p.edge(best.params[p.name])) for p in LOSSES[loss].search_space
             if not p.inert(best.params, m_per_class)]
    return ", ".join(f"{p.name} {best.params[p.name]:g} (the {where} end of {p.describe()})"
                     for p, where in found if where)


def inert_text(loss: str, best, m_per_class: int) -> str:
    """The parameters of the best trial that cannot change the loss there, and why."""
    if best is None:
        return ""
    found = [(p, p.inert(best.params, m_per_class)) for p in LOSSES[loss].search_space]
    return "; ".join(f"{p.name} {best.params[p.name]:g} ({why})" for p, why in found if why)


def trial_outcome(trial) -> str:
    """complete, pruned (by successive halving), diverged (a non-finite loss), running or fail."""
    if trial.state == optuna.trial.TrialState.PRUNED:
        return "diverged" if trial.user_attrs.get("error") else "pruned"
    return trial.state.name.lower()


def trial_value(trial) -> Optional[float]:
    """A completed trial's value; a pruned one's best validation MAP@R reached (its last report,
    which Optuna keeps as its value); None for a diverged, running or failed trial."""
    return trial.value if trial_outcome(trial) in ("complete", "pruned") else None


def trial_counts_table(studies: Dict[str, object], trials: int, m_per_class: int) -> List[str]:
    """Per loss: the counted trials that completed, were pruned or diverged, the best value and its
    parameters at an edge of the space."""
    lines = ["| loss | completed | pruned | diverged | best val MAP@R | best at an edge of the space |",
             "|---|---|---|---|---|---|"]
    for loss, study in studies.items():
        outcomes = [trial_outcome(t) for t in counted_trials(study, trials)]
        best = best_trial(study, trials)
        lines.append(f"| {loss} | {outcomes.count('complete')} | {outcomes.count('pruned')} | "
                     f"{outcomes.count('diverged')} | {'-' if best is None else f'{100 * best.value:.2f}'} | "
                     f"{edge_text(loss, best, m_per_class) or 'no'} |")
    return lines


def write_plot(path: Path, loss: str, trials: Sequence) -> None:
    """Validation MAP@R against the trial number (with the running best) and against the main parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = [t for t in trials if trial_outcome(t) == "complete"]
    pruned = [t for t in trials if trial_outcome(t) == "pruned"]
    main = LOSSES[loss].search_space[0]
    fig, (by_trial, by_param) = plt.subplots(1, 2, figsize=(10, 4))
    numbers, values = [t.number for t in complete], [100 * t.value for t in complete]
    pruned_values = [100 * trial_value(t) for t in pruned]
    by_trial.plot(numbers, values, "o", label="completed")
    by_trial.plot([t.number for t in pruned], pruned_values, "x", color="grey", label="pruned (value reached)")
    by_trial.step(numbers, np.maximum.accumulate(values) if values else [], where="post", label="best completed so far")
    by_trial.set_xlabel("trial")
    by_trial.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    by_trial.legend(fontsize=8)
    by_param.plot([t.params[main.name] for t in complete], values, "o")
    by_param.plot([t.params[main.name] for t in pruned], pruned_values, "x", color="grey")
    if main.log:
        by_param.set_xscale("log")
    by_param.set_xlabel(main.name)
    for ax in (by_trial, by_param):
        ax.set_ylabel("validation MAP@R (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{loss}: {len(complete)} completed and {len(pruned)} pruned trials")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
