"""Tuning each loss on validation MAP@R with Optuna's TPE sampler and successive halving:
search spaces, studies, trials.

A trial trains one run per seed with the harness (to convergence: early stopping on
validation MAP@R, the epoch cap a safety net) and scores it by the best validation MAP@R
over its trained epochs, averaged over seeds. After each epoch of its first seed, the best
validation MAP@R so far is reported to Optuna's ``SuccessiveHalvingPruner``, which stops
the trial once it is not in the best third of the trials that reached the same epoch
(``PRUNER``); a run still warming up (no trained epoch yet beats the untrained model) is not
pruned, since its values say nothing yet about where it will plateau. Every loss gets the
same sampler, pruner and number of trials. The test split is dropped when the data is
loaded: tuning never embeds it. A trial whose loss became NaN or infinite is recorded as
pruned, with the error, as "diverged"; it counts toward the budget.
Only distinct settings count: a trial proposing a setting already tried fails without training,
and a trial left running by a dead process (on this host: at once; elsewhere: once its heartbeat
stops) is marked failed and its setting retried.
"""

import dataclasses
import json
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import optuna

from ..data.splits import BenchmarkData
from .metrics import PRIMARY_METRIC
from . import loss_specs
from .convergence import warming_up
from .features import cached_features
from .launch import prepare_data
from .loss_registry import LOSSES, TUNABLE_LOSSES
from .models import fresh_models
from .run_store import RunStore, StoredRun
from .settings import FIELDS, Settings, UsageError, check_out_folder, stored_identity
from .training import NonFiniteLossError, Run

COUNTED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # pruned = diverged


# run settings written to best.toml: the training budget every loss was tuned with (the settings
# that identify a run's --out folder but the machine's data path).
BUDGET_KEYS = tuple(name for name, field in FIELDS.items() if field.metadata["identity"] and name != "data_root")
FINAL_SEEDS = 5  # seeds of the final runs, as the protocol asks


# ---- Harness adapter: the only code that knows how the harness loads data and trains. ----

def load_validation_data(settings: Settings, out: Path, log) -> BenchmarkData:
    """The dataset of ``settings``, checked as ``benchmarks.run`` checks it, without its test
    split (``test=None``): the split is dropped before anything runs, so neither the frozen
    trunk's feature cache (under ``out``) nor training can embed it."""
    data = dataclasses.replace(prepare_data(settings, 1), test=None)
    return cached_features(settings, data, out, 0, 1, log) if settings.freeze_trunk else data


def best_validation_map_at_r(rows) -> float:
    """The best validation MAP@R over a run's trained epochs (epoch 0 when none was trained)."""
    trained = [r["val_" + PRIMARY_METRIC] for r in rows if r["epoch"] > 0] or [rows[0]["val_" + PRIMARY_METRIC]]
    if not np.isfinite(trained).any():
        raise UsageError("validation MAP@R is undefined (no validation image has another of its class); "
                         "change --val or --limit-per-class")
    return float(np.nanmax(trained))


def ignore_epoch(epoch: int, best_so_far: float, warming: bool) -> None:
    """An ``on_epoch`` of ``validation_map_at_r`` that reports nowhere."""


def validation_map_at_r(settings: Settings, data: BenchmarkData, spec: loss_specs.LossSpec, seed: int,
                        run_dir: Path, on_epoch: Callable[[int, float, bool], None] = ignore_epoch) -> float:
    """Train one new run of ``spec`` (``training.Run``, evaluating the validation split only as
    ``data`` has no test split) in ``run_dir`` and return its best validation MAP@R over the
    trained epochs. After each trained epoch ``on_epoch(epoch, best so far, still warming up)``
    is called (it may raise to stop the run). Raises ``NonFiniteLossError`` when the loss diverges."""
    feature_size = data.train.images.shape[1] if settings.freeze_trunk else None
    trunk, embedder = fresh_models(settings, feature_size, seed)
    reported = [0]

    def report(rows):
        if rows[-1]["epoch"] > reported[0]:
            reported[0] = rows[-1]["epoch"]
            on_epoch(reported[0], best_validation_map_at_r(rows), warming_up(rows))

    result = Run(data, trunk, embedder, spec, seed, settings, RunStore(run_dir), StoredRun("new", []),
                 on_rows=report).execute()
    if result.error:
        raise NonFiniteLossError(result.error)
    return best_validation_map_at_r(result.rows)

# ---- end of the harness adapter ----


def parse_loss_names(text: str) -> List[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in TUNABLE_LOSSES]
    if unknown or not names:
        raise UsageError(f"no search space for {', '.join(unknown) or 'an empty list'}; --losses takes "
                         f"names of losses that can be tuned: {', '.join(TUNABLE_LOSSES)}")
    if len(set(names)) < len(names):
        raise UsageError(f"loss given twice in --losses {text!r}")
    return names


def trial_spec(loss: str, trial) -> loss_specs.LossSpec:
    """The loss spec a trial trains."""
    params = {}
    for parameter in LOSSES[loss].search_space:
        value = parameter.suggest(trial)
        for key in (parameter.name, *parameter.tied):
            params[key] = value
    return loss_specs.make_loss_spec(loss, params)


CREDENTIALS = re.compile(r"(\b[A-Za-z][\w+.-]*://[^\s:/@]*:)[^\s@]*@")


def mask_credentials(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL replaced by ``***``."""
    return CREDENTIALS.sub(r"\1***@", text)


# A running trial beats every HEARTBEAT_S seconds; one silent for STALE_AFTER_S (its process died,
# on any host) is failed and its setting queued again by the next trial of any process.
HEARTBEAT_S, STALE_AFTER_S = 60, 600


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of the SQLite database file ``path``, quoted so that a '?', '#' or '%'
    in a folder name stays part of the path."""
    from sqlalchemy.engine import URL

    return URL.create("sqlite", database=str(path.resolve())).render_as_string(hide_password=False)


def open_storage(url: str):
    """An Optuna RDB storage with trial heartbeats (SQLite waits up to a minute for a lock
    held by another process)."""
    from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for _ in range(3):
        try:
            with warnings.catch_warnings():  # heartbeats and retries are marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=STALE_AFTER_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
        except (IntegrityError, OperationalError) as error:  # also seen while another process creates the same new database
            failure = error
            time.sleep(1)
        except DatabaseError as error:  # the URL is right, the database behind it is not one Optuna can read
            raise UsageError(f"--storage {url!r}: the database cannot be read ({str(error).splitlines()[0]}); "
                             "it is damaged or not an Optuna database: restore it, or move it aside to start "
                             "new studies") from error
        except Exception as error:  # ArgumentError for a malformed URL, ImportError for a missing driver, ...
            failure = error
            break
    raise UsageError(f"--storage {url!r}: optuna cannot open this database ({type(failure).__name__}: {failure}); "
                     "give a SQLAlchemy URL such as sqlite:////abs/path/tuning.db or "
                     "postgresql://user:password@host/database") from failure


# Successive halving (asynchronous): a trial goes on past epoch 3, 9, 27, ... only while its best
# validation MAP@R so far is in the best third of those the study's trials had at that epoch.
PRUNER_MIN_EPOCHS, PRUNER_REDUCTION = 3, 3
PRUNER = (f"Optuna SuccessiveHalvingPruner(min_resource={PRUNER_MIN_EPOCHS}, reduction_factor={PRUNER_REDUCTION}) "
          "on the best validation MAP@R so far, after every epoch")


def make_pruner() -> optuna.pruners.BasePruner:
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=PRUNER_MIN_EPOCHS, reduction_factor=PRUNER_REDUCTION)


def budget(settings: Settings) -> Dict[str, object]:
    """The run options that define a trial's training (what best.toml repeats)."""
    values = {key: getattr(settings, key) for key in BUDGET_KEYS}
    values["patience"] = -1 if settings.patience is None else settings.patience
    return values


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE seeded from ``seed`` and the trial number: a resumed process or one sharing the study
    proposes new settings instead of replaying the first ones."""

    def __init__(self, seed: int):
        self.seed = seed
        self.tpe = optuna.samplers.TPESampler(seed=seed)

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def before_trial(self, study, trial):
        self.tpe = optuna.samplers.TPESampler(seed=int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0]))

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.tpe.sample_independent(study, trial, param_name, param_distribution)


def check_reported_studies(storage, out: Path, dataset: str, losses: List[str]) -> None:
    """Refuse to tune into ``out`` when its tuning.md reports losses whose studies the storage
    lacks (an emptied or replaced database): tuning would overwrite tuning.md and best.toml."""
    report = out / "tuning.md"
    if not report.is_file():
        return
    reported = {line[3:].strip() for line in report.read_text(encoding="utf-8", errors="replace").splitlines()
                if line.startswith("## ")}
    held = set(optuna.get_all_study_names(storage))
    lost = [loss for loss in losses if loss in reported and f"{dataset}-{loss}" not in held]
    if lost:
        raise UsageError(f"{report} reports trials of {', '.join(lost)} that the storage does not hold (an empty or "
                         "replaced tuning.db?); restore the database, or choose another --out (tuning here would "
                         "overwrite tuning.md and best.toml)")


def open_study(storage, settings: Settings, loss: str, sampler_seed: int, seeds: int):
    """Create or load the study ``<dataset>-<loss>``; refuse one whose trials were made with
    another budget (a study without trials takes the current one)."""
    study = optuna.create_study(
        study_name=f"{settings.dataset}-{loss}", storage=storage, direction="maximize", load_if_exists=True,
        sampler=TrialSeededTPE(sampler_seed), pruner=make_pruner(),
    )
    identity = {**budget(settings), "seeds_per_trial": seeds, "pruner": PRUNER,
                "search_space": [p.describe() for p in LOSSES[loss].search_space]}
    identity = json.loads(json.dumps(identity))
    stored = study.user_attrs.get("settings")
    if stored is None or not study.get_trials(deepcopy=False):
        study.set_user_attr("settings", identity)
    elif (stored := stored_identity(stored)) != identity:
        differing = ", ".join(f"{k}: {stored.get(k)!r} there, {v!r} now" for k, v in identity.items() if stored.get(k) != v)
        raise UsageError(f"study '{study.study_name}' in the storage was tuned with other settings ({differing}); "
                         "choose another --out or --storage")
    return study


def counted_trials(study, trials: int) -> list:
    """The first ``trials`` finished trials by number (complete, or pruned by divergence) with
    distinct settings: the budget, even when concurrent processes finished a few more."""
    distinct = {}
    for t in sorted(study.get_trials(deepcopy=False, states=COUNTED_STATES), key=lambda t: t.number):
        distinct.setdefault(t.user_attrs.get("loss"), t)
    return list(distinct.values())[:trials]


class DuplicateSetting(Exception):
    """A trial proposed a setting that another trial has tried or is trying."""


def process_is_dead(process: str) -> bool:
    """Whether ``host:pid`` names a process of this host that no longer runs."""
    host, _, pid = process.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def setting_key(trial) -> str:
    """A trial's setting as text: its parameters, or those a queued (waiting) trial will get."""
    return json.dumps(trial.params or trial.system_attrs.get("fixed_params", {}), sort_keys=True)


def recover_killed_trials(storage, study, loss: str, out: Path, log) -> None:
    """Mark the running trials of dead processes of this host failed, queue their settings
    again (unless another trial holds them) and remove trial folders no running trial owns."""
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if process_is_dead(t.user_attrs.get("process", "")):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            try:
                storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:  # finished meanwhile, or another process marked it first
                continue
            log(f"  {loss} trial {t.number}: its process {t.user_attrs['process']} is gone; marked failed")
    trials = study.get_trials(deepcopy=False)
    held = {setting_key(t) for t in trials if t.state != optuna.trial.TrialState.FAIL}
    for t in trials:
        killed = t.state == optuna.trial.TrialState.FAIL and "error" not in t.user_attrs  # not a duplicate
        if killed and t.params and setting_key(t) not in held:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            held.add(setting_key(t))
    running = {t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING}
    for folder in (out / "trials").glob(f"{loss}-*-*"):
        number = folder.name[len(loss) + 1:].split("-")[0]
        if number.isdigit() and int(number) not in running:
            shutil.rmtree(folder, ignore_errors=True)


def best_trial(study, trials: int):
    complete = [t for t in counted_trials(study, trials) if t.state == optuna.trial.TrialState.COMPLETE]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def tune_loss(storage, study, loss: str, settings: Settings, data: BenchmarkData, trials: int, seeds: int, out: Path, log) -> None:
    """Run trials until the study holds ``trials`` finished ones (shared with other processes)."""
    def objective(trial):
        trial.set_user_attr("process", f"{socket.gethostname()}:{os.getpid()}")
        spec = trial_spec(loss, trial)
        trial.set_user_attr("loss", spec.label)
        same = [t.number for t in study.get_trials(deepcopy=False, states=COUNTED_STATES + (optuna.trial.TrialState.RUNNING,))
                if t.number != trial.number and t.user_attrs.get("loss") == spec.label]
        if same:
            trial.set_user_attr("error", f"same setting as trial {same[0]}")
            raise DuplicateSetting(f"same setting as trial {same[0]}")
        def prune_early(epoch, best_so_far, warming):
            trial.report(best_so_far, step=epoch)
            if not warming and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        try:
            with tempfile.TemporaryDirectory(prefix=f"{loss}-{trial.number}-", dir=out / "trials") as run_dir:
                return float(np.mean([
                    validation_map_at_r(settings, data, spec, s, Path(run_dir) / f"seed{s}",
                                        prune_early if s == 0 else ignore_epoch)
                    for s in range(seeds)]))
        except NonFiniteLossError as error:
            trial.set_user_attr("error", str(error))
            raise optuna.TrialPruned(str(error)) from error

    def report(study, trial):
        if trial.state == optuna.trial.TrialState.FAIL:
            log(f"  {loss} trial {trial.number}: not trained, {trial.user_attrs.get('error')}")
            return
        if trial.state == optuna.trial.TrialState.COMPLETE:
            value = f"val MAP@R {100 * trial.value:.2f}"
        elif trial.user_attrs.get("error"):
            value = "diverged"
        else:  # Optuna keeps a pruned trial's last report as its value
            value = f"pruned after epoch {trial.last_step} at val MAP@R {100 * trial.value:.2f}"
        log(f"  {loss} trial {trial.number}: {value}  {trial.user_attrs.get('loss')}")
        if len(counted_trials(study, trials)) >= trials:
            study.stop()

    (out / "trials").mkdir(parents=True, exist_ok=True)
    recover_killed_trials(storage, study, loss, out, log)
    if len(counted_trials(study, trials)) < trials:
        study.optimize(objective, callbacks=[report], catch=(DuplicateSetting,), gc_after_trial=True)


@dataclasses.dataclass
class Tuning:
    """A finished tuning: its budget (``settings``), data (no test split), studies by loss, and
    the trials and seeds per trial each loss got."""

    settings: Settings
    data: BenchmarkData
    studies: Dict[str, optuna.Study]
    trials: int
    seeds: int

    def best_specs(self) -> Optional[Dict[str, loss_specs.LossSpec]]:
        """Each loss's best completed trial as a spec; None while a loss has none."""
        best = {loss: best_trial(study, self.trials) for loss, study in self.studies.items()}
        if any(trial is None for trial in best.values()):
            return None
        return {loss: loss_specs.parse_loss_spec(trial.user_attrs["loss"]) for loss, trial in best.items()}


def tune(settings: Settings, losses: List[str], trials: int, seeds: int, out: Path, storage_url: Optional[str] = None,
         sampler_seed: int = 0, log: Callable[[str], None] = print) -> Tuning:
    """Tune every loss of ``losses`` with ``settings``'s budget until its study holds ``trials``
    finished trials of ``seeds`` seeds each (a study shared with other processes, or resumed,
    counts what it holds). Studies live in ``storage_url`` (default: SQLite ``out/tuning.db``),
    trial folders under ``out``. Raises ``UsageError`` before any trial for a request or a
    storage it cannot use, and for an undefined validation metric."""
    if trials < 1 or seeds < 1:
        raise UsageError(f"--trials and --seeds must be at least 1, got {trials} and {seeds}")
    check_out_folder(str(out))
    out.mkdir(parents=True, exist_ok=True)
    storage = open_storage(storage_url or sqlite_url(out / "tuning.db"))
    data = load_validation_data(settings, out, log)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_reported_studies(storage, out, settings.dataset, losses)
    studies = {loss: open_study(storage, settings, loss, sampler_seed, seeds) for loss in losses}
    for loss, study in studies.items():
        log(f"tuning {loss}: {len(counted_trials(study, trials))}/{trials} trials finished")
        tune_loss(storage, study, loss, settings, data, trials, seeds, out, log)
    return Tuning(settings, data, studies, trials, seeds)
