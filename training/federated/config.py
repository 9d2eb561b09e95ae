"""The federated job's frozen values: its config, and the payload the zone hands the apps.

The zone's service builds a ``FederatedPayload`` after policy allowed the job and the ledger
reserved each site's budget, writes it as JSON (``FederatedPayload.write``) and passes the
file's absolute path to Flower's apps as the run-config string ``"job-payload"``
(``RUN_CONFIG_KEY``). Every app reads the same file; nothing else configures a run.

Payload JSON (``version`` 1; unknown keys are refused)::

    {
      "version": 1,
      "job_id": "job-1234",                 # the DatasetHandle authorization of every read
      "dataset": "cohort",                  # dataset name (for messages and the card)
      "dataset_path": "/zone/datasets/cohort",   # governed dataset dir (or its data.parquet)
      "contract": {...},                    # SchemaContract.to_dict()
      "config": {                           # FederatedConfig.to_dict()
        "rounds": 3, "sites": ["hospital-a", ...], "clients_per_round": 3, "min_sites": 2,
        "local_epochs": 1, "strategy": "fedavg", "mu": 0.0, "secure_aggregation": false,
        "client_dp": null | {"noise_multiplier": 1.0, "clipping_norm": 0.5},
        "epsilon": 1.0, "delta": 1e-6, "max_grad_norm": 1.0, "batch_size": 64, "lr": 0.5,
        "seed": 0, "model": {"kind": "mlp", "hidden": [16]}, "label": "readmitted_30d",
        "features": ["age", ...], "min_site_rows": 200, "num_cpus": 1.0, "num_gpus": 0.0,
        "round_timeout_s": 600.0, "evaluate": true      # optional; false: no DP evaluation
      },
      "out_dir": "/zone/jobs/job-1234",     # the ServerApp writes its files here
      "noise_secret_hex": "…64 hex…",       # per-job secret the zone derives (>= 16 bytes)
      "site_data_paths": {"hospital-b": "/zone/sites/b/data.parquet"}   # optional
    }

``site_data_paths`` lets a simulation read a site from its own governed file, the way a
SuperNode's ``data-path`` node config does under the Deployment Engine; a site without an
entry reads its rows from ``dataset_path`` filtered to that site.

Randomness: the public ``seed`` fixes the model's initial weights, the person-level
train/test split and which sites a round samples. Every DP draw (Poisson batches, gradient
noise, the evaluation histogram's noise, the server's client-level noise) is seeded from
``noise_secret_hex`` mixed with the site name and the round (``derive_seed``), so a
researcher who knows the seed cannot predict or subtract the noise, while the zone can
replay a job exactly.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from connectors.schema import SchemaContract
from foundation.errors import SpecError
from training.model_config import ModelConfig, ModelKind

#: the run-config key under which Flower's apps find the payload file's absolute path
RUN_CONFIG_KEY = "job-payload"
PAYLOAD_VERSION = 1

#: files the ServerApp writes into ``out_dir``
ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.json"
WEIGHTS_FILE = "global.safetensors"
STATUS_FILE = "status.json"

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
#: secrets shorter than this could be brute-forced; the zone derives 32 bytes
MIN_SECRET_BYTES = 16


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


_PAYLOAD_KEYS = frozenset(
    {
        "version",
        "job_id",
        "dataset",
        "dataset_path",
        "contract",
        "config",
        "out_dir",
        "noise_secret_hex",
        "site_data_paths",
    }
)


@dataclass(frozen=True, kw_only=True)
class FederatedPayload:
    """Everything the ServerApp and every ClientApp need for one job (see the module doc)."""

    job_id: str
    dataset: str
    dataset_path: Path
    contract: SchemaContract
    config: FederatedConfig
    out_dir: Path
    #: never printed: repr=False keeps it out of logs and tracebacks
    noise_secret_hex: str = field(repr=False)
    site_data_paths: Mapping[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("job_id", "dataset"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise SpecError(f"payload.{name}", "must be a non-empty string")
        if not isinstance(self.contract, SchemaContract):
            raise SpecError("payload.contract", "must be a SchemaContract")
        if not isinstance(self.config, FederatedConfig):
            raise SpecError("payload.config", "must be a FederatedConfig")
        for name in ("dataset_path", "out_dir"):
            path = Path(getattr(self, name))
            if not path.is_absolute():
                raise SpecError(f"payload.{name}", "must be an absolute path", "resolve it first")
            object.__setattr__(self, name, path)
        secret = self.noise_secret_hex
        try:
            raw = bytes.fromhex(secret) if isinstance(secret, str) else b""
        except ValueError:
            raw = b""
        if len(raw) < MIN_SECRET_BYTES:
            raise SpecError(
                "payload.noise_secret_hex",
                f"must be hex of at least {MIN_SECRET_BYTES} bytes",
                "derive 32 bytes per job from the zone's secret",
            )
        paths = {}
        for site, path in dict(self.site_data_paths).items():
            if site not in self.config.sites:
                raise SpecError(
                    "payload.site_data_paths", f"names site {site!r}, which is not in the job"
                )
            if not Path(path).is_absolute():
                raise SpecError("payload.site_data_paths", "must hold absolute paths")
            paths[site] = Path(path)
        object.__setattr__(self, "site_data_paths", MappingProxyType(paths))
        self._check_against_contract()

    def _check_against_contract(self) -> None:
        from connectors.preprocess import FeaturePlan

        cfg, contract = self.config, self.contract
        if cfg.label not in contract.label_names():
            raise SpecError(
                "federated.label",
                "is not a label column of the dataset",
                "use one of: " + (", ".join(contract.label_names()) or "(none declared)"),
            )
        FeaturePlan.from_contract(contract, cfg.features)  # names the bad feature
        if contract.site is None:
            raise SpecError(
                "payload.contract",
                "the dataset has no site column",
                "federate a multi-site dataset",
            )
        declared = contract.column(contract.site).categories
        if declared is not None:
            unknown = [s for s in cfg.sites if s not in declared]
            if unknown:
                raise SpecError(
                    "federated.sites",
                    f"{unknown[0]!r} is not a declared site of the dataset",
                    "use: " + ", ".join(declared),
                )

    @property
    def secret(self) -> bytes:
        return bytes.fromhex(self.noise_secret_hex)

    def data_path(self, site: str) -> Path:
        """Where ``site``'s rows are read from in simulation (its own file, or the dataset)."""
        return self.site_data_paths.get(site, self.dataset_path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PAYLOAD_VERSION,
            "job_id": self.job_id,
            "dataset": self.dataset,
            "dataset_path": str(self.dataset_path),
            "contract": self.contract.to_dict(),
            "config": self.config.to_dict(),
            "out_dir": str(self.out_dir),
            "noise_secret_hex": self.noise_secret_hex,
            "site_data_paths": {k: str(v) for k, v in self.site_data_paths.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FederatedPayload:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise SpecError("payload", "is not valid JSON", "write it with to_json") from None
        if not isinstance(data, dict):
            raise SpecError("payload", "must be a JSON object")
        extra = sorted(set(data) - _PAYLOAD_KEYS)
        if extra:
            raise SpecError(f"payload.{extra[0]}", "is not a known field")
        if data.get("version") != PAYLOAD_VERSION:
            raise SpecError("payload.version", f"must be {PAYLOAD_VERSION}", "rebuild the payload")
        missing = sorted(_PAYLOAD_KEYS - {"site_data_paths"} - set(data))
        if missing:
            raise SpecError(f"payload.{missing[0]}", "is required")
        return cls(
            job_id=data["job_id"],
            dataset=data["dataset"],
            dataset_path=Path(data["dataset_path"]),
            contract=SchemaContract.from_dict(data["contract"]),
            config=FederatedConfig.from_dict(data["config"]),
            out_dir=Path(data["out_dir"]),
            noise_secret_hex=data["noise_secret_hex"],
            site_data_paths={k: Path(v) for k, v in (data.get("site_data_paths") or {}).items()},
        )

    def write(self, path: str | Path) -> Path:
        """Write the payload atomically (owner-readable only: it holds the noise secret)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".payload-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self.to_json())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path.resolve()


def load_payload(path: str | Path) -> FederatedPayload:
    """Read the payload file named by the run config."""
    path = Path(path)
    if not path.is_absolute():
        raise SpecError(
            f"run_config.{RUN_CONFIG_KEY}", "must be an absolute path", "pass the resolved path"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        raise SpecError(
            f"run_config.{RUN_CONFIG_KEY}", "names no readable payload file", "check the path"
        ) from None
    return FederatedPayload.from_json(text)


def derive_seed(secret: bytes, *parts: object) -> int:
    """A 63-bit seed for one DP draw: HMAC-SHA256 of the parts under the job's secret.

    Distinct parts give independent streams (each site, round and purpose its own); the
    same secret and parts replay exactly; without the secret the seed is unpredictable.
    """
    label = "\x1f".join(str(p) for p in ("safe-zone/federated/v1", *parts))
    digest = hmac.new(secret, label.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF
