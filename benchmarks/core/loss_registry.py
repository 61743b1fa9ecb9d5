"""The loss registry: every fact the harness knows about a loss, in one entry.

Adding a PML loss to the harness means adding one ``LossEntry`` to ``LOSSES`` below: its
class, its miner, its defaults, the values its parameters may take, its tuning search space
and whether the default comparison runs it. ``--losses``, ``--list-losses``,
``benchmarks.tune`` and ``benchmarks.speed`` all read it.
"""

import dataclasses
import inspect
import math
from typing import Any, Callable, Dict, Optional, Tuple

from pml_ice.reducers.ice_reweight_reducer import NORMALIZATIONS
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners


EDGE = 0.05  # the outer share of a searched range that counts as its edge


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One searched hyperparameter: a float range (log-uniform when ``log``) or ``choices``.
    ``tied`` keys get the same value (the triplet miner's margin follows the loss's). ``inert``,
    given a trial's parameters and its images per class in a batch, says why this parameter
    cannot change the loss there (None where it can)."""

    name: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    choices: Tuple[str, ...] = ()
    tied: Tuple[str, ...] = ()
    inert: Callable[[Dict[str, Any], int], Optional[str]] = lambda params, m_per_class: None

    def suggest(self, trial):
        if self.choices:
            return trial.suggest_categorical(self.name, self.choices)
        return float(f"{trial.suggest_float(self.name, self.low, self.high, log=self.log):.3g}")

    def edge(self, value) -> Optional[str]:
        """"low" or "high" when ``value`` lies in the outer 5 % of the range (on a log scale for a
        log-uniform parameter): a best trial there asks for a wider space. None otherwise."""
        if self.choices:
            return None
        position = ((math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low)) if self.log
                    else (value - self.low) / (self.high - self.low))
        return "low" if position < EDGE else "high" if position > 1 - EDGE else None

    def describe(self) -> str:
        if self.choices:
            text = "{" + ", ".join(self.choices) + "}"
        else:
            text = f"[{self.low:g}, {self.high:g}]" + (" log-uniform" if self.log else " uniform")
        return f"{self.name} in {text}" + "".join(f", {t} = {self.name}" for t in self.tied)


TRIPLET_TYPES = ("all", "hard", "semihard", "easy")  # PML's TripletMarginMiner

# Arguments the harness supplies itself or that are not hyperparameters.
_NOT_HYPERPARAMETERS = {
    "self",
    "num_classes",
    "embedding_size",
    "distance",
    "reducer",
    "embedding_regularizer",
    "weight_regularizer",
    "weight_init_func",
    "collect_stats",
}


def _ice_loss_class():
    from pml_ice import losses as ice_losses

    return ice_losses.ICELoss


def _ice_reducer_class():
    from pml_ice import reducers as ice_reducers

    return ice_reducers.ICEReweightReducer


def _ntxent_class():
    from .ntxent_as_ice import NTXentAsICE

    return NTXentAsICE


@dataclasses.dataclass(frozen=True)
class LossEntry:
    """A registered loss: its class, default hyperparameters, optional miner and reducer, the
    values of its enumerated, positive and count parameters, its tuning search space and whether
    the default comparison includes it."""

    description: str
    loss_class: Callable[[], type]
    defaults: Dict[str, Any] = dataclasses.field(default_factory=dict)
    miner_class: Optional[Callable[[], type]] = None
    miner_defaults: Dict[str, Any] = dataclasses.field(default_factory=dict)
    reducer_class: Optional[Callable[[], type]] = None
    own_parameters: bool = False  # trains proxies or class weights with its own optimizer (``loss_lr``)
    search_space: Tuple[Parameter, ...] = ()  # what ``benchmarks.tune`` searches; the first is the main one
    compared_by_default: bool = False  # in the default --losses of ``benchmarks.run`` and ``benchmarks.tune``
    choices: Dict[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)  # values of enumerated parameters
    positive: Tuple[str, ...] = ()  # parameters that must be > 0 (a temperature divides)
    counts: Tuple[str, ...] = ()  # parameters that are "all" or an integer >= 1 (tuples per anchor)

    def loss_parameters(self):
        return _hyperparameters(self.loss_class())

    def miner_parameters(self):
        return _hyperparameters(self.miner_class()) if self.miner_class else {}

    def reducer_parameters(self):
        return _hyperparameters(self.reducer_class()) if self.reducer_class else {}

    def parameter_defaults(self) -> Dict[str, Any]:
        """Every parameter a spec may set (miner ones prefixed ``miner_``) with its class default."""
        values = dict(self.loss_parameters())
        values.update({"miner_" + n: v for n, v in self.miner_parameters().items()})
        values.update(self.reducer_parameters())
        return values

    def valid_parameters(self):
        return list(self.parameter_defaults()) + [LOSS_LR] * self.own_parameters


def _hyperparameters(cls) -> Dict[str, Any]:
    """Constructor parameters of ``cls`` that are hyperparameters, with their defaults."""
    result = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name in _NOT_HYPERPARAMETERS or param.kind in (
            param.VAR_KEYWORD,
            param.VAR_POSITIONAL,
        ):
            continue
        result[name] = None if param.default is param.empty else param.default
    return result


LOSS_LR = "loss_lr"


def _pml(name):
    return lambda: getattr(pml_losses, name)


def _miner(name):
    return lambda: getattr(pml_miners, name)


def _lam_inert(params: Dict[str, Any], m_per_class: int) -> Optional[str]:
    """With one positive per anchor, anchor normalisation divides each anchor's only weight by itself."""
    if params.get("normalize") == "anchor" and m_per_class == 2:
        return "anchor normalisation with one positive per anchor gives every pair weight 1"
    return None


def _margin_inert(params: Dict[str, Any], m_per_class: int) -> Optional[str]:
    """A hard triplet (negative no farther than the positive) violates every margin, by a constant gradient."""
    if params.get("miner_type_of_triplets") == "hard":
        return "every hard triplet violates the margin, so its gradient does not depend on it"
    return None


LOSSES: Dict[str, LossEntry] = {
    "ice": LossEntry(
        "Instance Cross Entropy (pml_ice.losses.ICELoss) with ICEReweightReducer",
        _ice_loss_class,
        reducer_class=_ice_reducer_class,
        search_space=(Parameter("scale", 1, 1e4, log=True), Parameter("lam", 0.0, 4.0, inert=_lam_inert),
                      Parameter("normalize", choices=NORMALIZATIONS)),
        compared_by_default=True,
        choices={"normalize": NORMALIZATIONS},
    ),
    "ntxent": LossEntry(
        "NTXent: PML NTXentLoss's value and gradient on labels, computed as ICELoss at scale 1 / temperature "
        "with lam 0 and batch normalisation (benchmarks/core/ntxent_as_ice.py; PML's own class builds a "
        "positive-pair by negative-pair matrix)",
        _ntxent_class, positive=("temperature",),
        search_space=(Parameter("temperature", 1e-4, 1.0, log=True),), compared_by_default=True),
    "pml_ntxent": LossEntry("PML NTXentLoss itself, for speed and memory measurements (the harness's ntxent is "
                            "the same loss on labels)", _pml("NTXentLoss"), positive=("temperature",)),
    "supcon": LossEntry("PML SupConLoss", _pml("SupConLoss"), positive=("temperature",),
                        search_space=(Parameter("temperature", 1e-4, 1.0, log=True),), compared_by_default=True),
    "multisimilarity": LossEntry(
        "PML MultiSimilarityLoss with MultiSimilarityMiner",
        _pml("MultiSimilarityLoss"),
        miner_class=_miner("MultiSimilarityMiner"),
        miner_defaults={"epsilon": 0.1},
        search_space=(Parameter("alpha", 0.01, 1000, log=True), Parameter("beta", 1e-4, 1000, log=True),
                      Parameter("base", 0.0, 2.0), Parameter("miner_epsilon", 0.0, 1.0)),
        compared_by_default=True,
    ),
    "triplet": LossEntry(
        "PML TripletMarginLoss with a semi-hard TripletMarginMiner",
        _pml("TripletMarginLoss"),
        defaults={"margin": 0.2},
        miner_class=_miner("TripletMarginMiner"),
        miner_defaults={"margin": 0.2, "type_of_triplets": "semihard"},
        search_space=(Parameter("margin", 0.0, 1.0, tied=("miner_margin",), inert=_margin_inert),
                      Parameter("miner_type_of_triplets", choices=("all", "hard", "semihard"))),
        compared_by_default=True,
        choices={"miner_type_of_triplets": TRIPLET_TYPES},
        counts=("triplets_per_anchor",),
    ),
    "contrastive": LossEntry("PML ContrastiveLoss", _pml("ContrastiveLoss"),
                             search_space=(Parameter("pos_margin", 0.0, 1.0), Parameter("neg_margin", 0.0, 2.0)),
                             compared_by_default=True),
    "circle": LossEntry("PML CircleLoss", _pml("CircleLoss")),
    "lifted": LossEntry("PML LiftedStructureLoss", _pml("LiftedStructureLoss"),
                        search_space=(Parameter("neg_margin", 0.0, 2.0), Parameter("pos_margin", 0.0, 1.0))),
    "proxyanchor": LossEntry("PML ProxyAnchorLoss (trainable proxies)", _pml("ProxyAnchorLoss"), own_parameters=True,
                             search_space=(Parameter("margin", 0.0, 1.0), Parameter("alpha", 1, 128, log=True),
                                           Parameter(LOSS_LR, 1e-4, 1e-1, log=True))),
    "arcface": LossEntry("PML ArcFaceLoss (trainable class weights)", _pml("ArcFaceLoss"), own_parameters=True,
                         search_space=(Parameter("margin", 0.0, 90.0), Parameter("scale", 1, 128, log=True),
                                       Parameter(LOSS_LR, 1e-4, 1.0, log=True))),
    "normsoftmax": LossEntry(
        "PML NormalizedSoftmaxLoss (trainable class weights)", _pml("NormalizedSoftmaxLoss"), own_parameters=True,
        positive=("temperature",),
    ),
}

DEFAULT_LOSSES = ",".join(name for name, entry in LOSSES.items() if entry.compared_by_default)
TUNABLE_LOSSES = tuple(name for name, entry in LOSSES.items() if entry.search_space)
