"""The job spec a researcher writes (``job.toml``): parsed once into frozen values.

Every problem is a ``SpecError`` naming the field (``privacy.epsilon``) and the fix; unknown
keys are refused so a typo never silently falls back to a default.

``training.optimizer`` (``"adam"``, ``"adamw"`` or ``"sgd"``) came after specs were first
stored, and its default changed their meaning: a spec a user writes now without it trains
with Adam (``parse_job_spec``), while every spec stored before it existed trained with SGD.
So a stored spec (the job's row, a worker's payload) is read back with
``parse_stored_spec``, where a missing optimizer means ``"sgd"``. ``to_dict`` always writes
the optimizer (a spec stored now reads back the same either way) and ``spec_hash`` leaves
``"sgd"`` out, so an old job's stored hash still matches its spec and an SGD spec written
now hashes as the same spec did before.

A DP-SGD spec the user writes may leave ``lr``, ``epochs``, ``batch_size`` and
``max_grad_norm`` out or write them as ``"auto"`` (``spec_fields.AUTO_FIELDS``): they are
None here (``JobSpec.auto_fields`` names them) and ``to_dict`` writes ``"auto"``. Such a
spec is resolved by a search on free data before anything plans it (``sandbox.tuning``,
``docs/tuning.md``); every planner reads them through ``spec_fields.resolved``, which refuses
an unresolved one. A stored spec always holds them; a federated spec never has ``"auto"``.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from foundation.errors import SpecError
from sandbox.spec_fields import AUTO, AUTO_FIELDS, flag, hyperparameters, name, number, unknown
from training.dpsgd_config import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, Optimizer
from training.model_config import ModelConfig, ModelKind


class Mode(StrEnum):
    DP_SGD = "dp-sgd"
    FEDERATED = "federated"


@dataclass(frozen=True)
class PrivacySpec:
    epsilon: float
    delta: float
    #: None: ``"auto"``, chosen by the zone (``sandbox.tuning``) before the job is planned
    max_grad_norm: float | None
    #: ``evaluate = false``: no DP evaluation release (no charge, no metrics); the whole
    #: epsilon goes to training. Default true.
    evaluate: bool = True


@dataclass(frozen=True)
class TrainingSpec:
    #: None (these three): ``"auto"``, chosen by the zone before the job is planned
    epochs: int | None
    batch_size: int | None
    #: written by the user (or chosen by the zone); a stored spec without it:
    #: ``DEFAULT_LR[optimizer]``
    lr: float | None
    seed: int
    #: the update rule applied to the privatized gradient (post-processing: the plan and
    #: the epsilon do not depend on it)
    optimizer: Optimizer = Optimizer.ADAM
    #: AdamW's decoupled weight decay; 0 for the other optimizers (the parser refuses it there)
    weight_decay: float = 0.0

    def optimizer_summary(self) -> dict[str, Any]:
        """What a result and the CLI show: ``{"name": "adam", "lr": 0.03}``, with
        ``weight_decay`` for adamw (the researcher's own settings, echoed)."""
        out: dict[str, Any] = {"name": self.optimizer.value, "lr": self.lr}
        if self.optimizer is Optimizer.ADAMW:
            out["weight_decay"] = self.weight_decay
        return out


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

    @property
    def auto_fields(self) -> tuple[str, ...]:
        """The hyperparameters still ``"auto"`` (``spec_fields.AUTO_FIELDS``), in its order."""
        d = asdict(self)
        return tuple(
            field for field in AUTO_FIELDS if d[field.split(".")[0]][field.split(".")[1]] is None
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for field in self.auto_fields:
            section, key = field.split(".")
            d[section][key] = AUTO
        d["features"] = list(self.features)
        d["mode"] = str(self.mode)
        d["model"] = {"kind": str(self.model.kind), "hidden": list(self.model.hidden)}
        d["training"]["optimizer"] = str(self.training.optimizer)
        if self.training.optimizer is not Optimizer.ADAMW:
            # always 0 there (the parser refuses any other value): left out, as before
            d["training"].pop("weight_decay")
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
        d = self.to_dict()
        if d["training"]["optimizer"] == Optimizer.SGD.value:
            # what every spec stored before training.optimizer existed meant: left out, so an
            # old job's hash still matches its spec (``parse_stored_spec``)
            d["training"].pop("optimizer")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


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
    "training": {"epochs", "batch_size", "lr", "seed", "optimizer", "weight_decay"},
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


def _section(d: Mapping[str, Any], key: str, required: bool) -> Mapping[str, Any]:
    if key not in d:
        if required:
            raise SpecError(key, "section is required", f"add a [{key}] table")
        return {}
    v = d[key]
    if not isinstance(v, dict):
        raise SpecError(key, "must be a table", f"write it as [{key}]")
    unknown(key, v, _SECTIONS[key])
    return v


def parse_job_spec(data: Mapping[str, Any]) -> JobSpec:
    """A spec the user writes now (``job.toml``'s tables, or the same as a dict): a missing
    ``training.optimizer`` is ``"adam"``."""
    return _parse(data, Optimizer.ADAM, stored=False)


def parse_stored_spec(data: Mapping[str, Any]) -> JobSpec:
    """A spec the zone stored (``JobSpec.to_dict``: a job's row, a worker's payload), read
    back: a missing ``training.optimizer`` is ``"sgd"``, what it meant when it was stored."""
    return _parse(data, Optimizer.SGD, stored=True)


def _optimizer(t: Mapping[str, Any], missing: Optimizer) -> tuple[Optimizer, float]:
    raw = t.get("optimizer", missing.value)
    try:
        optimizer = Optimizer(raw)
    except (ValueError, TypeError):
        raise SpecError(
            "training.optimizer",
            "is not a known optimizer",
            f"use one of: {', '.join(o.value for o in Optimizer)}",
        ) from None
    if optimizer is not Optimizer.ADAMW:
        # an explicit 0 is what these optimizers do anyway; Adam's L2-coupled decay is not
        # offered (AdamW's decoupled one is the one that behaves)
        written = t.get("weight_decay", 0)
        if isinstance(written, bool) or written != 0:
            raise SpecError(
                "training.weight_decay",
                'is only used with optimizer = "adamw"',
                'drop weight_decay or set optimizer = "adamw"',
            )
        return optimizer, 0.0
    wd = number(t, "training", "weight_decay", default=DEFAULT_WEIGHT_DECAY, lo=0, hi=1)
    return optimizer, float(wd)


def _parse(data: Mapping[str, Any], missing_optimizer: Optimizer, *, stored: bool) -> JobSpec:
    unknown("", data, _TOP)
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
    label = name(data, "label")
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
    epsilon = float(number(p, "privacy", "epsilon", lo=0, lo_open=True, hi=100))
    delta = float(number(p, "privacy", "delta", lo=0, lo_open=True, hi=0.01))
    t = _section(data, "training", True)
    federated = _federated(data) if mode is Mode.FEDERATED else None
    optimizer, weight_decay = _optimizer(t, missing_optimizer)
    # a DP-SGD spec the user writes: a hyperparameter left out is the zone's to choose
    hp = hyperparameters(
        p,
        t,
        auto=mode is Mode.DP_SGD and not stored,
        federated=federated is not None,
        lr_default=DEFAULT_LR[optimizer],
    )
    privacy = PrivacySpec(
        epsilon=epsilon,
        delta=delta,
        max_grad_norm=hp["max_grad_norm"],
        evaluate=flag(p, "privacy", "evaluate", default=True),
    )
    if mode is not Mode.FEDERATED and "federated" in data:
        raise SpecError(
            "federated",
            'is only used with mode = "federated"',
            'add mode = "federated" or drop [federated]',
        )
    training = TrainingSpec(
        epochs=hp["epochs"],
        batch_size=hp["batch_size"],
        lr=hp["lr"],
        seed=int(number(t, "training", "seed", default=0, lo=0, hi=2**31 - 1, integer=True)),
        optimizer=optimizer,
        weight_decay=weight_decay,
    )
    r = _section(data, "resources", False)
    resources = ResourceSpec(
        gpus=float(number(r, "resources", "gpus", default=0, lo=0, hi=64)),
        cpus=float(number(r, "resources", "cpus", default=1, lo=0, lo_open=True, hi=256)),
    )
    return JobSpec(
        project=name(data, "project"),
        dataset=name(data, "dataset"),
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
    rounds = int(number(f, "federated", "rounds", lo=1, hi=10_000, integer=True))
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
        else int(number(f, "federated", "clients_per_round", lo=1, hi=10_000, integer=True))
    )
    min_sites = int(number(f, "federated", "min_sites", default=1, lo=1, hi=10_000, integer=True))
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
        number(
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
        float(number(f, "federated", "server_noise_multiplier", lo=0, lo_open=True, hi=1e3))
        if has_z
        else None
    )
    c = (
        float(number(f, "federated", "server_clipping_norm", lo=0, lo_open=True, hi=1e6))
        if has_c
        else None
    )
    return FederatedSpec(
        rounds=rounds,
        sites=sites,
        clients_per_round=clients_per_round,
        min_sites=min_sites,
        local_epochs=int(
            number(f, "federated", "local_epochs", default=1, lo=1, hi=100, integer=True)
        ),
        strategy=strategy,
        mu=mu,
        secure_aggregation=secagg,
        server_noise_multiplier=z,
        server_clipping_norm=c,
        min_site_rows=int(
            number(
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
