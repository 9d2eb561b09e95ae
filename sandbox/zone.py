"""A zone on disk: its state database, its data folder, its pseudonymisation secret.

Layout::

    ZONE/zone.toml        the zone's settings (state database URL)
    ZONE/state.db         SQLite state (users, grants, ledger, audit, jobs) unless a URL says otherwise
    ZONE/secret.key       the HMAC key for pseudonyms (0600; never leaves the zone)
    ZONE/data/NAME/       governed Parquet, one folder per dataset (only connectors reads it)
    ZONE/jobs/ID/         a job's artefacts, released only through the release gate
    ZONE/engines/         Ray / Flower / SDV scratch, so the engines write nowhere else
"""

from __future__ import annotations

import os
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from connectors.errors import NotFoundError, SpecError

ZONE_FILE = "zone.toml"
SECRET_BYTES = 32


@dataclass(frozen=True)
class Zone:
    root: Path
    db_url: str

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    def dataset_dir(self, name: str) -> Path:
        return self.data_dir / name

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def secret(self) -> bytes:
        return (self.root / "secret.key").read_bytes()

    @classmethod
    def open(cls, root: Path) -> Zone:
        root = root.resolve()
        cfg = root / ZONE_FILE
        if not cfg.exists():
            raise NotFoundError(f"no zone at {root}; run `sandbox init --zone {root}` first")
        data = tomllib.loads(cfg.read_text())
        return cls(root=root, db_url=str(data["db_url"]))

    @classmethod
    def create(cls, root: Path, db_url: str | None = None) -> Zone:
        root = root.resolve()
        if (root / ZONE_FILE).exists():
            raise SpecError("--zone", f"a zone already exists at {root}", "pick another folder")
        url = db_url or f"sqlite:///{root / 'state.db'}"
        if '"' in url:
            raise SpecError("--db-url", "must not contain a double quote", "quote-free URL")
        for sub in ("data", "jobs", "engines"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        secret_path = root / "secret.key"
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(SECRET_BYTES))
        (root / ZONE_FILE).write_text(f'db_url = "{url}"\n')
        return cls(root=root, db_url=url)
