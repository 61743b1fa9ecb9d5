"""Loss specifications such as ``ice:scale=32,lam=1``: parsing, validation and construction.

A spec names a registered loss and optionally sets its hyperparameters. Parameters are
those of the PML loss class, of its miner (prefixed ``miner_``), for ICE of its reducer
(``lam``, ``normalize``) and, for a loss with its own parameters (proxies, class weights),
``loss_lr``: the learning rate of its optimizer (default: the run's ``--loss-lr``).
Everything is checked when the spec is parsed, so a typo fails before any training starts.
"""

import ast
import dataclasses
import inspect
import math
from typing import Any, Dict, Optional, Tuple

from .loss_registry import LOSS_LR, LOSSES, LossEntry

class LossSpecError(ValueError):
    """A loss specification names an unknown loss or parameter, or a bad value."""


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A parsed loss specification: registered name plus explicitly set parameters."""

    name: str
    params: Tuple[Tuple[str, Any], ...]

    @property
    def entry(self) -> LossEntry:
        return LOSSES[self.name]

    @property
    def label(self) -> str:
        """Canonical text of the spec, used in results and folder names."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in self.params)

    @property
    def folder_name(self) -> str:
        keep = "".join(c if c.isalnum() or c in "._-" else "_" for c in self.label)
        return keep

    def _split_params(self):
        loss_kw = dict(self.entry.defaults)
        miner_kw = dict(self.entry.miner_defaults)
        reducer_kw = {}
        reducer_names = self.entry.reducer_parameters()
        for key, value in self.params:
            if key == LOSS_LR:
                continue
            if key.startswith("miner_") and key[len("miner_"):] in self.entry.miner_parameters():
                miner_kw[key[len("miner_"):]] = value
            elif key in reducer_names:
                reducer_kw[key] = value
            else:
                loss_kw[key] = value
        return loss_kw, miner_kw, reducer_kw

    @property
    def loss_lr(self) -> Optional[float]:
        """The learning rate this spec sets for the loss's own parameters, or None."""
        return dict(self.params).get(LOSS_LR)

    def build(self, num_classes: int, embedding_size: int, collect_stats: bool = False):
        """Return ``(loss, miner or None)`` built from this spec; ``collect_stats`` makes the
        loss, its reducer and its miner keep PML's statistics of the last batch (for
        record-keeper: ICE's weight spread, a miner's pair counts, ...)."""
        entry = self.entry
        loss_kw, miner_kw, reducer_kw = self._split_params()
        if collect_stats:
            loss_kw["collect_stats"] = miner_kw["collect_stats"] = True
            reducer_kw = dict(reducer_kw, collect_stats=True) if entry.reducer_class else reducer_kw
        loss_class = entry.loss_class()
        accepted = inspect.signature(loss_class.__init__).parameters
        if "num_classes" in accepted:
            loss_kw["num_classes"] = num_classes
        if "embedding_size" in accepted:
            loss_kw["embedding_size"] = embedding_size
        try:
            if reducer_kw:
                loss_kw["reducer"] = entry.reducer_class()(**reducer_kw)
            loss = loss_class(**loss_kw)
            miner = entry.miner_class()(**miner_kw) if entry.miner_class else None
        except (TypeError, ValueError) as error:
            raise LossSpecError(f"loss '{self.label}' cannot be built: {error}") from error
        return loss, miner

    def describe_values(self) -> Dict[str, Any]:
        """Every hyperparameter with the value this spec uses (explicit or default)."""
        loss_kw, miner_kw, reducer_kw = self._split_params()
        values = dict(self.entry.loss_parameters())
        values.update(loss_kw)
        for k, v in self.entry.miner_parameters().items():
            values["miner_" + k] = miner_kw.get(k, v)
        for k, v in self.entry.reducer_parameters().items():
            values[k] = reducer_kw.get(k, v)
        if self.entry.own_parameters:
            values[LOSS_LR] = self.loss_lr  # None: the run's --loss-lr
        return values


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _canonical(value):
    """One value per number: an integral float is its int (``scale=32.0`` is ``scale=32``)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def make_loss_spec(name: str, params: Dict[str, Any]) -> LossSpec:
    """The spec of registered loss ``name`` with ``params``, checked by building it once;
    raise ``LossSpecError`` naming an unknown loss or parameter or a bad value."""
    if name not in LOSSES:
        raise LossSpecError(
            f"unknown loss '{name}'; valid losses: {', '.join(sorted(LOSSES))}"
        )
    entry = LOSSES[name]
    try:
        valid = entry.valid_parameters()
        defaults = entry.parameter_defaults()
    except ImportError as error:
        raise LossSpecError(f"loss '{name}' is not available: {error}") from error
    for key, value in params.items():
        if key not in valid:
            raise LossSpecError(
                f"unknown parameter '{key}' for loss '{name}'; valid parameters: "
                + (", ".join(valid) if valid else "(none)")
            )
        allowed = entry.choices.get(key)
        if allowed and value not in allowed:
            raise LossSpecError(f"{key} of loss '{name}' must be one of {', '.join(allowed)}; got {value!r}")
        default = defaults.get(key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise LossSpecError(f"{key} of loss '{name}' must be true or false; got {value!r}")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, (int, float)) and not isinstance(default, bool) and not (number and math.isfinite(value)):
            raise LossSpecError(f"{key} of loss '{name}' must be a finite number; got {value!r}")
        if key in entry.positive and not (number and value > 0):
            raise LossSpecError(f"{key} of loss '{name}' must be a number > 0; got {value!r}")
        if key in entry.counts and not (value == "all" or (isinstance(value, int) and not isinstance(value, bool)
                                                          and value >= 1)):
            raise LossSpecError(f"{key} of loss '{name}' must be 'all' or an integer >= 1; got {value!r}")
    loss_lr = params.get(LOSS_LR)
    if LOSS_LR in params and not (isinstance(loss_lr, (int, float)) and not isinstance(loss_lr, bool) and 0 < loss_lr < math.inf):
        raise LossSpecError(f"loss_lr of loss '{name}' must be a finite number > 0, got {loss_lr!r}")
    spec = LossSpec(name, tuple(sorted((k, _canonical(v)) for k, v in params.items())))
    # Fail now on bad values (e.g. a negative scale), not after hours of other runs.
    spec.build(num_classes=2, embedding_size=8)
    return spec


def parse_loss_spec(text: str) -> LossSpec:
    """Parse ``name`` or ``name:key=value,key=value``; raise ``LossSpecError`` if invalid."""
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    params = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise LossSpecError(
                f"parameter '{item}' of loss '{name}' must be written key=value"
            )
        if key in params:
            raise LossSpecError(f"parameter '{key}' of loss '{name}' is given twice")
        params[key] = _parse_value(value.strip())
    return make_loss_spec(name, params)


def split_spec_texts(text: str):
    """Split a comma-separated list of specs where a new name starts: the parameters of a
    loss follow its colon, so ``ice:scale=32,lam=1,ntxent`` is two specs."""
    specs, current = [], []
    for piece in text.split(","):
        starts_new = ":" in piece or "=" not in piece
        if starts_new and current:
            specs.append(",".join(current))
            current = []
        if not starts_new and not current:
            raise LossSpecError(f"parameter '{piece}' comes before any loss name")
        current.append(piece)
    if current:
        specs.append(",".join(current))
    return [s for s in specs if s.strip()]


def parse_loss_list(text: str):
    """Parse a comma-separated list of specs (see ``split_spec_texts``)."""
    parsed = [parse_loss_spec(s) for s in split_spec_texts(text)]
    if not parsed:
        raise LossSpecError("no loss given; valid losses: " + ", ".join(sorted(LOSSES)))
    labels = [p.label for p in parsed]
    duplicates = sorted({l for l in labels if labels.count(l) > 1})
    if duplicates:
        raise LossSpecError(f"loss given twice: {', '.join(duplicates)}")
    return parsed


def losses_help() -> str:
    """Text listing every registered loss with its parameters and defaults."""
    lines = []
    for name, entry in LOSSES.items():
        try:
            values = LossSpec(name, ()).describe_values()
            params = ", ".join(f"{k}={v!r}" for k, v in values.items())
        except ImportError as error:
            params = f"(not importable: {error})"
        lines.append(f"  {name}: {entry.description}\n      {params}")
    return "\n".join(lines)


def has_trainable_parameters(loss) -> bool:
    return any(p.requires_grad for p in loss.parameters())
