"""The federated job's config: ``Strategy``, ``ClientDPConfig`` and ``FederatedConfig``.

``FederatedConfig`` is validated on construction (errors name ``federated.<field>``) and
round-trips through ``to_dict``/``from_dict``, the ``"config"`` entry of the job's payload
(``training.federated.payload``, the file the zone hands Flower's apps). The limits and
shares the config and the sites' plans use (``DEFAULT_MIN_SITE_ROWS``, ``EVAL_SHARE``,
``MAX_ROUNDS``) live here too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from foundation.errors import SpecError
from training.dpsgd_config import Optimizer
from training.model_config import ModelConfig, ModelKind

#: A site with fewer training persons than this is left out. Why 200: a site's DP-SGD step
#: adds noise of standard deviation z*C to a clipped sum of about q*n gradients of norm <= C;
#: at the epsilons stewards grant (<= 10 over tens of steps) z is >= ~1, so with q*n of a few
#: dozen the noise is as large as the signal and the site's update mostly drags the global
#: model around while spending its patients' budget. Its evaluation is no better: ~50 test
#: persons spread over a 2 x 20 histogram under noise of sigma ~ 20-40 (the evaluation share
#: of the budget) give metrics that are noise. 200 keeps sites where both mean something.
DEFAULT_MIN_SITE_ROWS = 200
#: share of each site's epsilon that its one DP evaluation release may use (plan_dpsgd's)
EVAL_SHARE = 0.1
#: what the summary says of the evaluation: each site's noisy histogram, pooled by the server
EVALUATION_DONE = "one DP histogram per site (test split), pooled by the server"
EVALUATION_SKIPPED = "skipped"
#: the most rounds a job may ask for: each round is a message exchange with every sampled
#: site, and a DP budget spread over more rounds than this leaves no signal per step
MAX_ROUNDS = 10_000


class Strategy(StrEnum):
    """How the server combines the sites' models (Flower's strategies of the same name)."""

    #: weighted average of the sites' models, weights = training persons
    FEDAVG = "fedavg"
    #: FedAvg plus a proximal term mu/2 ||w - w_global||^2 in each site's local objective
    FEDPROX = "fedprox"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _whole(name: str, value: object, low: int, high: int | None = None) -> int:
    if not _is_int(value) or value < low or (high is not None and value > high):  # type: ignore[operator]
        limit = f">= {low}" if high is None else f"between {low} and {high}"
        raise SpecError(f"federated.{name}", f"must be a whole number {limit}", f"e.g. {low}")
    return int(value)  # type: ignore[call-overload]


def _positive(name: str, value: object, fix: str) -> float:
    if not _is_number(value) or value <= 0:  # type: ignore[operator]
        raise SpecError(f"federated.{name}", "must be a finite number > 0", fix)
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ClientDPConfig:
    """Server-side client-level DP (DP-FedAvg, McMahan et al. 2018): the server clips each
    site's model update to ``clipping_norm``, averages them with equal weights and adds
    Gaussian noise of standard deviation ``noise_multiplier * clipping_norm / sampled sites``.
    The unit is the site (add/remove one hospital's whole contribution), accounted over the
    rounds by its own RDP accountant; it composes with nothing else."""

    noise_multiplier: float
    clipping_norm: float

    def __post_init__(self) -> None:
        _positive("client_dp.noise_multiplier", self.noise_multiplier, "e.g. 1.0")
        _positive("client_dp.clipping_norm", self.clipping_norm, "e.g. 0.5")
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))
        object.__setattr__(self, "clipping_norm", float(self.clipping_norm))

    def to_dict(self) -> dict[str, float]:
        return {"noise_multiplier": self.noise_multiplier, "clipping_norm": self.clipping_norm}


_CONFIG_KEYS = frozenset(
    {
        "rounds",
        "sites",
        "clients_per_round",
        "min_sites",
        "local_epochs",
        "strategy",
        "mu",
        "secure_aggregation",
        "client_dp",
        "epsilon",
        "delta",
        "max_grad_norm",
        "batch_size",
        "lr",
        "seed",
        "model",
        "label",
        "features",
        "min_site_rows",
        "num_cpus",
        "num_gpus",
        "round_timeout_s",
        "evaluate",
        "optimizer",
        "weight_decay",
        "plan_sizes",
    }
)


@dataclass(frozen=True, kw_only=True)
class FederatedConfig:
    """One federated DP job. Validated on construction; errors name ``federated.<field>``.

    ``epsilon``/``delta`` are each site's patient-level budget for the whole job: every
    site's DP-SGD noise is calibrated for ``rounds x local_epochs`` epochs of its own
    training split plus one DP evaluation release, so a site that takes part in every
    round ends at or below ``epsilon`` (sites compose in parallel: disjoint patients)."""

    rounds: int
    #: site names (the dataset's ``site`` column values), already resolved; none twice
    sites: tuple[str, ...]
    label: str
    features: tuple[str, ...]
    model: ModelConfig
    epsilon: float
    delta: float
    max_grad_norm: float
    batch_size: int
    lr: float
    #: None: every site in every round (resolved on construction, always an int after)
    clients_per_round: int | None = None
    #: a round goes on while at least this many sites answer; None: min(2, sites)
    min_sites: int | None = None
    local_epochs: int = 1
    strategy: Strategy = Strategy.FEDAVG
    #: FedProx's proximal weight (> 0 for fedprox, 0 for fedavg)
    mu: float = 0.0
    #: SecAgg+ (Flower's legacy path): the server sees only the sum of the sites' models
    secure_aggregation: bool = False
    client_dp: ClientDPConfig | None = None
    seed: int = 0
    min_site_rows: int = DEFAULT_MIN_SITE_ROWS
    #: Ray resources per simulated client (docs/engines.md: Flower's default of 2 CPUs runs one
    #: client at a time on a 2-core machine)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    #: how long the server waits for a round's replies before counting a site as dropped
    round_timeout_s: float = 600.0
    #: False (the spec's ``privacy.evaluate = false``): no DP evaluation at any site, no
    #: evaluation charge; each site's whole budget goes to training
    evaluate: bool = True
    #: each site's update rule on its privatized gradient (post-processing; the spec's
    #: default is adam, a config without it, e.g. a payload written before it, means sgd)
    optimizer: Optimizer = Optimizer.SGD
    #: AdamW's decoupled weight decay (0 for the other optimizers)
    weight_decay: float = 0.0
    #: site -> the training persons the service plans the site on (its dataset card's
    #: count x the training fraction): every site plans its DP-SGD on this size, so the
    #: quote's, the run's and the charge's figures are one. The Poisson sample rate, the
    #: noise and the steps bound a person's loss whatever the exact split, which the site
    #: still counts for its participation checks. None (configs made outside the service:
    #: the reference loop, the harness): each site plans on the persons it counts.
    plan_sizes: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        _whole("rounds", self.rounds, 1, MAX_ROUNDS)
        sites = self.sites
        if isinstance(sites, str) or not isinstance(sites, tuple | list) or not sites:
            raise SpecError(
                "federated.sites", "must be a non-empty list of site names", 'e.g. ["hospital-a"]'
            )
        if not all(isinstance(s, str) and s.strip() for s in sites):
            raise SpecError("federated.sites", "must hold non-empty site names", "check the list")
        if len(set(sites)) != len(sites):
            raise SpecError("federated.sites", "names a site twice", "list each site once")
        object.__setattr__(self, "sites", tuple(sites))
        n_sites = len(sites)
        cpr = n_sites if self.clients_per_round is None else self.clients_per_round
        _whole("clients_per_round", cpr, 1, n_sites)
        object.__setattr__(self, "clients_per_round", int(cpr))
        min_sites = min(2, n_sites) if self.min_sites is None else self.min_sites
        if not _is_int(min_sites) or not 1 <= min_sites <= int(cpr):
            raise SpecError(
                "federated.min_sites",
                f"must be a whole number between 1 and clients_per_round ({cpr})",
                "lower min_sites or raise clients_per_round",
            )
        object.__setattr__(self, "min_sites", int(min_sites))
        _whole("local_epochs", self.local_epochs, 1, 1000)
        try:
            object.__setattr__(self, "strategy", Strategy(self.strategy))
        except ValueError:
            raise SpecError(
                "federated.strategy",
                "is not a known strategy",
                f"use one of: {', '.join(s.value for s in Strategy)}",
            ) from None
        if not _is_number(self.mu) or self.mu < 0:
            raise SpecError("federated.mu", "must be a finite number >= 0", "e.g. 0.01")
        object.__setattr__(self, "mu", float(self.mu))
        if self.strategy is Strategy.FEDPROX and self.mu <= 0:
            raise SpecError(
                "federated.mu", "must be > 0 for fedprox", "e.g. mu = 0.01, or use fedavg"
            )
        if self.strategy is Strategy.FEDAVG and self.mu != 0:
            raise SpecError(
                "federated.mu", "applies to fedprox only", "set strategy = fedprox or mu = 0"
            )
        if not isinstance(self.secure_aggregation, bool):
            raise SpecError("federated.secure_aggregation", "must be true or false")
        if self.client_dp is not None and not isinstance(self.client_dp, ClientDPConfig):
            raise SpecError("federated.client_dp", "must be a ClientDPConfig or None")
        if self.secure_aggregation and self.client_dp is not None:
            # server-side clipping needs each site's update; SecAgg+ shows only their sum
            raise SpecError(
                "federated.client_dp",
                "cannot be combined with secure_aggregation (the server must see each "
                "site's update to clip it, which secure aggregation hides)",
                "turn off one of client_dp and secure_aggregation",
            )
        if self.secure_aggregation and int(cpr) < 2:
            raise SpecError(
                "federated.clients_per_round",
                "must be >= 2 with secure_aggregation (a sum of one site is that site)",
                "raise clients_per_round",
            )
        if not _is_number(self.epsilon) or not 0 < self.epsilon <= 100:
            raise SpecError("federated.epsilon", "must be a number in (0, 100]", "e.g. 1.0")
        if not _is_number(self.delta) or not 0 < self.delta < 1:
            raise SpecError("federated.delta", "must be in (0, 1)", "e.g. 1e-6")
        _positive("max_grad_norm", self.max_grad_norm, "e.g. 1.0")
        _whole("batch_size", self.batch_size, 1)
        _positive("lr", self.lr, "e.g. 0.5")
        _whole("seed", self.seed, 0)
        if not isinstance(self.model, ModelConfig):
            raise SpecError("federated.model", "must be a ModelConfig", "e.g. kind = mlp")
        if not isinstance(self.label, str) or not self.label:
            raise SpecError("federated.label", "must name the label column")
        features = self.features
        if isinstance(features, str) or not isinstance(features, tuple | list) or not features:
            raise SpecError("federated.features", "must be a non-empty list of column names")
        object.__setattr__(self, "features", tuple(features))
        _whole("min_site_rows", self.min_site_rows, 1)
        _positive("num_cpus", self.num_cpus, "e.g. 1")
        if not _is_number(self.num_gpus) or self.num_gpus < 0:
            raise SpecError("federated.num_gpus", "must be a finite number >= 0", "e.g. 0")
        _positive("round_timeout_s", self.round_timeout_s, "e.g. 600")
        if not isinstance(self.evaluate, bool):
            raise SpecError("federated.evaluate", "must be true or false")
        try:
            object.__setattr__(self, "optimizer", Optimizer(self.optimizer))
        except ValueError:
            raise SpecError(
                "federated.optimizer",
                "is not a known optimizer",
                f"use one of: {', '.join(o.value for o in Optimizer)}",
            ) from None
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise SpecError("federated.weight_decay", "must be a finite number >= 0", "e.g. 0.01")
        if self.weight_decay and self.optimizer is not Optimizer.ADAMW:
            raise SpecError(
                "federated.weight_decay", "applies to adamw only", "set it to 0 or use adamw"
            )
        object.__setattr__(self, "weight_decay", float(self.weight_decay))
        if self.plan_sizes is not None:
            sizes = self.plan_sizes
            if not isinstance(sizes, Mapping) or set(sizes) != set(self.sites):
                raise SpecError(
                    "federated.plan_sizes",
                    "must give a training size for every site and no other",
                    "make the config with the service (federated_plan.plan_sites)",
                )
            for site in self.sites:
                _whole("plan_sizes", sizes[site], 1)
            object.__setattr__(self, "plan_sizes", {s: int(sizes[s]) for s in self.sites})
        for name in ("epsilon", "delta", "max_grad_norm", "lr", "num_cpus", "num_gpus"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "round_timeout_s", float(self.round_timeout_s))

    @property
    def per_round(self) -> int:
        """``clients_per_round`` as resolved on construction (never None after it)."""
        return int(self.clients_per_round or len(self.sites))

    @property
    def quorum(self) -> int:
        """``min_sites`` as resolved on construction (never None after it)."""
        return int(self.min_sites or 1)

    def plan_size(self, site: str, counted: int) -> int:
        """The training size ``site`` plans on: the service's, else the persons it counted."""
        return counted if self.plan_sizes is None else int(self.plan_sizes[site])

    @property
    def local_training_epochs(self) -> int:
        """Epochs of its own data a site trains at most over the job (what its noise is
        calibrated for)."""
        return self.rounds * self.local_epochs

    def to_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "sites": list(self.sites),
            "clients_per_round": self.clients_per_round,
            "min_sites": self.min_sites,
            "local_epochs": self.local_epochs,
            "strategy": self.strategy.value,
            "mu": self.mu,
            "secure_aggregation": self.secure_aggregation,
            "client_dp": None if self.client_dp is None else self.client_dp.to_dict(),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "max_grad_norm": self.max_grad_norm,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "seed": self.seed,
            "model": {"kind": self.model.kind.value, "hidden": list(self.model.hidden)},
            "label": self.label,
            "features": list(self.features),
            "min_site_rows": self.min_site_rows,
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "round_timeout_s": self.round_timeout_s,
            "evaluate": self.evaluate,
            "optimizer": self.optimizer.value,
            "weight_decay": self.weight_decay,
            "plan_sizes": None if self.plan_sizes is None else dict(self.plan_sizes),
        }

    @classmethod
    def from_dict(cls, data: object) -> FederatedConfig:
        if not isinstance(data, Mapping):
            raise SpecError("federated", "must be a table of settings")
        extra = sorted(set(data) - _CONFIG_KEYS)
        if extra:
            raise SpecError(
                f"federated.{extra[0]}",
                "is not a known field",
                f"known fields: {', '.join(sorted(_CONFIG_KEYS))}",
            )
        values = dict(data)
        model = values.get("model")
        if not isinstance(model, Mapping) or set(model) - {"kind", "hidden"}:
            raise SpecError("federated.model", "must be {kind, hidden}", 'e.g. {"kind": "mlp"}')
        hidden = model.get("hidden", [])
        if not isinstance(hidden, list | tuple):
            raise SpecError("federated.model.hidden", "must be a list of widths", "e.g. [16]")
        try:
            kind = ModelKind(str(model.get("kind")))
        except ValueError:
            raise SpecError(
                "federated.model.kind",
                "is not a known model",
                f"use one of: {', '.join(k.value for k in ModelKind)}",
            ) from None
        values["model"] = ModelConfig(kind=kind, hidden=tuple(hidden))
        dp = values.get("client_dp")
        if dp is not None:
            if not isinstance(dp, Mapping) or set(dp) != {"noise_multiplier", "clipping_norm"}:
                raise SpecError(
                    "federated.client_dp",
                    "must be null or {noise_multiplier, clipping_norm}",
                    'e.g. {"noise_multiplier": 1.0, "clipping_norm": 0.5}',
                )
            values["client_dp"] = ClientDPConfig(**dp)
        for key in ("sites", "features"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        missing = sorted(
            k
            for k in (
                "rounds",
                "sites",
                "label",
                "features",
                "model",
                "epsilon",
                "delta",
                "max_grad_norm",
                "batch_size",
                "lr",
            )
            if k not in values
        )
        if missing:
            raise SpecError(f"federated.{missing[0]}", "is required")
        return cls(**values)
