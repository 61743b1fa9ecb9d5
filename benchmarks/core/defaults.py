"""ICE's library defaults from validation over several datasets: the setting whose worst-case
shortfall is smallest.

For datasets ``d`` (each a finished ``benchmarks.tune`` folder with an ICE study) and ICE
settings ``c`` (scale, lam, normalize):

    shortfall(c, d) = best_d - value(c, d)

where ``best_d`` is the best completed ICE trial of ``d``'s study and ``value(c, d)`` the
validation MAP@R of ``c`` trained on ``d`` with ``d``'s tuning budget (its trial value when
``d``'s study completed ``c``, else one run with seed 0, as a trial but not pruned). The
candidates are the best ``top`` completed ICE trials of every study; the chosen default
minimises ``max_d shortfall(c, d)`` (ties: the mean shortfall). Validation only: the test
split is never loaded.
"""

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import optuna

from . import loss_specs
from ..storage.files import atomic_write_json, read_json
from .settings import Settings, resolve
from .tuning import load_validation_data, open_storage, sqlite_url, validation_map_at_r

@dataclasses.dataclass(frozen=True)
class TunedDataset:
    """A tuning folder: its settings (``best.toml``) and its ICE study's completed trials."""

    folder: Path
    settings: Settings
    trials: Dict[str, float]  # ICE spec label -> validation MAP@R

    @property
    def name(self) -> str:
        return self.settings.dataset

    @property
    def best(self) -> float:
        return max(self.trials.values())


def read_tuned_dataset(folder: Path) -> TunedDataset:
    """The settings and completed ICE trials of a ``benchmarks.tune`` folder."""
    settings = resolve(["--config", str(folder / "best.toml")])
    storage = open_storage(sqlite_url(folder / "tuning.db"))
    study = optuna.load_study(study_name=f"{settings.dataset}-ice", storage=storage)
    trials = {t.user_attrs["loss"]: t.value for t in study.get_trials(deepcopy=False)
              if t.state == optuna.trial.TrialState.COMPLETE}
    if not trials:
        raise ValueError(f"{folder}: the ICE study has no completed trial")
    return TunedDataset(folder, settings, trials)


def candidates(datasets: Sequence[TunedDataset], top: int) -> List[str]:
    """The best ``top`` completed ICE trials of each dataset, in that order, without repeats."""
    chosen = []
    for dataset in datasets:
        chosen += sorted(dataset.trials, key=dataset.trials.get, reverse=True)[:top]
    return list(dict.fromkeys(chosen))


def validation_values(datasets: Sequence[TunedDataset], labels: Sequence[str], cache: Path,
                      log: Callable[[str], None]) -> Dict[str, Dict[str, float]]:
    """``value(c, d)`` for every candidate label and dataset name; runs not among a study's
    trials are trained once and kept in ``cache`` (JSON, rewritten after each run)."""
    stored = read_json(cache, default={})
    values = {label: {} for label in labels}
    for dataset in datasets:
        data = None
        for label in labels:
            if label in dataset.trials:
                values[label][dataset.name] = dataset.trials[label]
                continue
            key = f"{dataset.name} {label}"
            if key not in stored:
                data = data or load_validation_data(dataset.settings, dataset.folder, log)
                with tempfile.TemporaryDirectory(prefix="default-candidate-") as run_dir:
                    stored[key] = validation_map_at_r(dataset.settings, data, loss_specs.parse_loss_spec(label), 0,
                                                      Path(run_dir))
                atomic_write_json(cache, stored)
                log(f"  {dataset.name}: {label} val MAP@R {100 * stored[key]:.2f}")
            values[label][dataset.name] = stored[key]
    return values


def shortfalls(datasets: Sequence[TunedDataset], values: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    return {label: {d.name: d.best - by_dataset[d.name] for d in datasets} for label, by_dataset in values.items()}


def choose(falls: Dict[str, Dict[str, float]]) -> str:
    """The label with the smallest worst-case shortfall (then the smallest mean)."""
    return min(falls, key=lambda label: (max(falls[label].values()),
                                         sum(falls[label].values()) / len(falls[label])))
