"""The payload the zone hands a federated job's apps: the job file, and its DP seeds.

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

The job's config itself (``FederatedConfig``) is ``training.federated.config``'s.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from connectors.schema import SchemaContract
from foundation.errors import SpecError
from training.federated.config import FederatedConfig

#: the run-config key under which Flower's apps find the payload file's absolute path
RUN_CONFIG_KEY = "job-payload"
PAYLOAD_VERSION = 1

#: files the ServerApp writes into ``out_dir``
ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.json"
WEIGHTS_FILE = "global.safetensors"
STATUS_FILE = "status.json"
#: secrets shorter than this could be brute-forced; the zone derives 32 bytes
MIN_SECRET_BYTES = 16


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
