"""The job spec a researcher writes (``job.toml``): parsed once into frozen values.

Every problem is a ``SpecError`` naming the field (``privacy.epsilon``) and the fix; unknown
keys are refused so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from foundation.errors import SpecError
from training.model_config import ModelConfig, ModelKind


class Mode(StrEnum):
    DP_SGD = "dp-sgd"
    FEDERATED = "federated"


@dataclass(frozen=True)
class PrivacySpec:
    epsilon: float
    delta: float
    max_grad_norm: float
    #: ``evaluate = false``: no DP evaluation release (no charge, no metrics); the whole
    #: epsilon goes to training. Default true.
    evaluate: bool = True


@dataclass(frozen=True)
class TrainingSpec:
    epochs: int
    batch_size: int
    lr: float
    seed: int


@dataclass(frozen=True)
class ResourceSpec:
    gpus: float
    cpus: float


class FedStrategy(StrEnum):
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"


@dataclass(frozen=True)
class FederatedSpec:
    """``[federated]``: Flower across the dataset's sites (hospitals)."""

    rounds: int
    #: () = every site of the dataset
    sites: tuple[str, ...]
    clients_per_round: int | None
    min_sites: int
    local_epochs: int
    strategy: FedStrategy
    mu: float
    secure_aggregation: bool
    #: server-side client-level DP: noise multiplier and clipping norm of the update (None = off)
    server_noise_multiplier: float | None
    server_clipping_norm: float | None
    min_site_rows: int


@dataclass(frozen=True)
class JobSpec:
    project: str
    dataset: str
    label: str
    features: tuple[str, ...]
    mode: Mode
    model: ModelConfig
    privacy: PrivacySpec
    training: TrainingSpec
    resources: ResourceSpec
    federated: FederatedSpec | None = None

    @property
    def columns(self) -> frozenset[str]:
        """Every column the job reads: what the grant must cover."""
        return frozenset((*self.features, self.label))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = list(self.features)
        d["mode"] = str(self.mode)
        d["model"] = {"kind": str(self.model.kind), "hidden": list(self.model.hidden)}
        if self.privacy.evaluate:
            # the default is left out, so a spec that does not mention it hashes as before
            d["privacy"].pop("evaluate")
        if self.federated is None:
            d.pop("federated")
        else:
            f = self.federated
            fed: dict[str, Any] = {
                "rounds": f.rounds,
                "sites": list(f.sites) if f.sites else "all",
                "min_sites": f.min_sites,
                "local_epochs": f.local_epochs,
                "strategy": str(f.strategy),
                "secure_aggregation": f.secure_aggregation,
                "min_site_rows": f.min_site_rows,
            }
            if f.strategy is FedStrategy.FEDPROX:
                # the parser refuses mu with any other strategy: the record must parse back
                fed["mu"] = f.mu
            if f.clients_per_round is not None:
                fed["clients_per_round"] = f.clients_per_round
            if f.server_noise_multiplier is not None:
                fed["server_noise_multiplier"] = f.server_noise_multiplier
                fed["server_clipping_norm"] = f.server_clipping_norm
            d["federated"] = fed
            d["training"].pop("epochs", None)
        return d

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


_TOP = {
    "project",
    "dataset",
    "label",
    "features",
    "mode",
    "model",
    "privacy",
    "training",
    "resources",
    "federated",
}
_SECTIONS = {
    "model": {"kind", "hidden"},
    "privacy": {"epsilon", "delta", "max_grad_norm", "evaluate"},
    "training": {"epochs", "batch_size", "lr", "seed"},
    "resources": {"gpus", "cpus"},
    "federated": {
        "rounds",
        "sites",
        "clients_per_round",
        "min_sites",
        "local_epochs",
        "strategy",
        "mu",
        "secure_aggregation",
        "server_noise_multiplier",
        "server_clipping_norm",
        "min_site_rows",
    },
}
#: a site with fewer training rows than this gets no useful patient-level DP guarantee at
#: the epsilons stewards grant (the noise swamps a handful of patients' gradients): it is
#: left out of the federation with a clear message unless the spec lowers the bar
DEFAULT_MIN_SITE_ROWS = 200


def _unknown(where: str, got: Mapping[str, Any], known: set[str]) -> None:
    extra = sorted(set(got) - known)
    if extra:
        prefix = f"{where}." if where else ""
        raise SpecError(
            f"{prefix}{extra[0]}",
            "is not a known field",
            f"known fields: {', '.join(sorted(known))}",
        )


def _name(d: Mapping[str, Any], key: str) -> str:
    if key not in d:
        raise SpecError(key, "is required", f'add {key} = "..."')
    v = d[key]
    if not isinstance(v, str) or not v.strip():
        raise SpecError(key, "must be a non-empty string", f'e.g. {key} = "name"')
    return v


def _number(
    d: Mapping[str, Any],
    section: str,
    key: str,
    *,
    default: float | None = None,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    integer: bool = False,
) -> Any:
    field = f"{section}.{key}"
    if key not in d:
        if default is None:
            raise SpecError(field, "is required", f"add {key} = ... under [{section}]")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise SpecError(field, "must be a number", f"write {key} = <number>")
    if integer and not isinstance(v, int):
        raise SpecError(field, "must be a whole number", f"e.g. {key} = {int(v)}")
    if not math.isfinite(v):
        raise SpecError(field, "must be finite", "use a finite number")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise SpecError(field, f"must be {'>' if lo_open else '>='} {lo}", "raise it")
    if hi is not None and v > hi:
        raise SpecError(field, f"must be <= {hi}", "lower it")
    return v


def _flag(d: Mapping[str, Any], section: str, key: str, *, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise SpecError(f"{section}.{key}", "must be true or false", f"write {key} = false")
    return v


def _section(d: Mapping[str, Any], key: str, required: bool) -> Mapping[str, Any]:
    if key not in d:
        if required:
            raise SpecError(key, "section is required", f"add a [{key}] table")
        return {}
    v = d[key]
    if not isinstance(v, dict):
        raise SpecError(key, "must be a table", f"write it as [{key}]")
    _unknown(key, v, _SECTIONS[key])
    return v


def parse_job_spec(data: Mapping[str, Any]) -> JobSpec:
    _unknown("", data, _TOP)
    mode_raw = data.get("mode", Mode.DP_SGD.value)
    try:
        mode = Mode(mode_raw)
    except (ValueError, TypeError):
        raise SpecError(
            "mode", "is not a known mode", f"use one of: {', '.join(m.value for m in Mode)}"
        ) from None
    features = data.get("features")
    if (
        not isinstance(features, list)
        or not features
        or not all(isinstance(f, str) and f for f in features)
    ):
        raise SpecError(
            "features", "must be a non-empty list of column names", 'e.g. features = ["age", "sex"]'
        )
    if len(set(features)) != len(features):
        raise SpecError("features", "lists a column twice", "list each column once")
    label = _name(data, "label")
    if label in features:
        raise SpecError("features", "contains the label column", "remove the label from features")

    m = _section(data, "model", True)
    kind_raw = m.get("kind")
    try:
        kind = ModelKind(str(kind_raw))
    except (ValueError, TypeError):
        raise SpecError(
            "model.kind",
            "is not a known model",
            f"use one of: {', '.join(k.value for k in ModelKind)}",
        ) from None
    hidden = m.get("hidden", [])
    if not isinstance(hidden, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) for h in hidden
    ):
        raise SpecError("model.hidden", "must be a list of layer sizes", "e.g. hidden = [64, 64]")
    model = ModelConfig(kind=kind, hidden=tuple(hidden))

    p = _section(data, "privacy", True)
    privacy = PrivacySpec(
        epsilon=float(_number(p, "privacy", "epsilon", lo=0, lo_open=True, hi=100)),
        delta=float(_number(p, "privacy", "delta", lo=0, lo_open=True, hi=0.01)),
        max_grad_norm=float(
            _number(p, "privacy", "max_grad_norm", default=1.0, lo=0, lo_open=True, hi=1e4)
        ),
        evaluate=_flag(p, "privacy", "evaluate", default=True),
    )
    t = _section(data, "training", True)
    federated = _federated(data) if mode is Mode.FEDERATED else None
    if mode is not Mode.FEDERATED and "federated" in data:
        raise SpecError(
            "federated",
            'is only used with mode = "federated"',
            'add mode = "federated" or drop [federated]',
        )
    training = TrainingSpec(
        epochs=int(
            _number(
                t,
                "training",
                "epochs",
                default=1 if federated else None,
                lo=1,
                hi=1000,
                integer=True,
            )
        ),
        batch_size=int(_number(t, "training", "batch_size", lo=1, hi=1_000_000, integer=True)),
        lr=float(_number(t, "training", "lr", lo=0, lo_open=True, hi=100)),
        seed=int(_number(t, "training", "seed", default=0, lo=0, hi=2**31 - 1, integer=True)),
    )
    r = _section(data, "resources", False)
    resources = ResourceSpec(
        gpus=float(_number(r, "resources", "gpus", default=0, lo=0, hi=64)),
        cpus=float(_number(r, "resources", "cpus", default=1, lo=0, lo_open=True, hi=256)),
    )
    return JobSpec(
        project=_name(data, "project"),
        dataset=_name(data, "dataset"),
        label=label,
        features=tuple(features),
        mode=mode,
        model=model,
        privacy=privacy,
        training=training,
        resources=resources,
        federated=federated,
    )


def _federated(data: Mapping[str, Any]) -> FederatedSpec:
    f = _section(data, "federated", True)
    rounds = int(_number(f, "federated", "rounds", lo=1, hi=10_000, integer=True))
    sites_raw = f.get("sites", "all")
    if sites_raw == "all":
        sites: tuple[str, ...] = ()
    elif (
        isinstance(sites_raw, list)
        and sites_raw
        and all(isinstance(x, str) and x for x in sites_raw)
    ):
        if len(set(sites_raw)) != len(sites_raw):
            raise SpecError("federated.sites", "lists a site twice", "list each site once")
        sites = tuple(sites_raw)
    else:
        raise SpecError(
            "federated.sites",
            'must be "all" or a list of site names',
            'e.g. sites = ["hospital-a", "hospital-b"]',
        )
    cpr = f.get("clients_per_round")
    clients_per_round = (
        None
        if cpr is None
        else int(_number(f, "federated", "clients_per_round", lo=1, hi=10_000, integer=True))
    )
    min_sites = int(_number(f, "federated", "min_sites", default=1, lo=1, hi=10_000, integer=True))
    if clients_per_round is not None and min_sites > clients_per_round:
        raise SpecError(
            "federated.min_sites",
            "is larger than clients_per_round",
            "lower min_sites or raise clients_per_round",
        )
    if sites and min_sites > len(sites):
        raise SpecError(
            "federated.min_sites",
            f"is larger than the {len(sites)} sites listed",
            "lower min_sites",
        )
    strat_raw = f.get("strategy", "fedavg")
    try:
        strategy = FedStrategy(strat_raw)
    except (ValueError, TypeError):
        raise SpecError(
            "federated.strategy", "is not a known strategy", "use fedavg or fedprox"
        ) from None
    if "mu" in f and strategy is not FedStrategy.FEDPROX:
        raise SpecError(
            "federated.mu", 'is only used with strategy = "fedprox"', "drop mu or use fedprox"
        )
    mu = float(
        _number(
            f,
            "federated",
            "mu",
            default=0.01 if strategy is FedStrategy.FEDPROX else 0.0,
            lo=0,
            hi=100,
        )
    )
    secagg = f.get("secure_aggregation", False)
    if not isinstance(secagg, bool):
        raise SpecError(
            "federated.secure_aggregation",
            "must be true or false",
            "write secure_aggregation = true",
        )
    has_z, has_c = "server_noise_multiplier" in f, "server_clipping_norm" in f
    if has_z != has_c:
        raise SpecError(
            "federated.server_noise_multiplier",
            "client-level DP needs both the noise multiplier and the clipping norm",
            "set server_noise_multiplier and server_clipping_norm together",
        )
    z = (
        float(_number(f, "federated", "server_noise_multiplier", lo=0, lo_open=True, hi=1e3))
        if has_z
        else None
    )
    c = (
        float(_number(f, "federated", "server_clipping_norm", lo=0, lo_open=True, hi=1e6))
        if has_c
        else None
    )
    return FederatedSpec(
        rounds=rounds,
        sites=sites,
        clients_per_round=clients_per_round,
        min_sites=min_sites,
        local_epochs=int(
            _number(f, "federated", "local_epochs", default=1, lo=1, hi=100, integer=True)
        ),
        strategy=strategy,
        mu=mu,
        secure_aggregation=secagg,
        server_noise_multiplier=z,
        server_clipping_norm=c,
        min_site_rows=int(
            _number(
                f,
                "federated",
                "min_site_rows",
                default=DEFAULT_MIN_SITE_ROWS,
                lo=1,
                hi=10**9,
                integer=True,
            )
        ),
    )


def parse_job_toml(text: str) -> JobSpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message names the line and column, never a dataset value
        raise SpecError("job.toml", f"is not valid TOML: {exc}", "fix the TOML syntax") from None
    return parse_job_spec(data)


def load_job_spec(path: Path) -> JobSpec:
    """Read and parse a ``job.toml``; the file must be UTF-8 (TOML's only encoding)."""
    try:
        raw = path.read_bytes()
    except OSError:
        raise SpecError("job.toml", f"cannot read {path}", "check the path") from None
    try:
        # utf-8-sig: a byte-order mark some editors add is not an error
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # the byte offset only, never the bytes themselves
        raise SpecError(
            "job.toml",
            f"{path} is not UTF-8 text (byte {exc.start} is not valid UTF-8)",
            "save the file as UTF-8 (TOML files must be UTF-8)",
        ) from None
    return parse_job_toml(text)
