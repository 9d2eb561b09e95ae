"""Attack: a bad worker environment writes training rows into the released weights.

Before the release gate checked contents, ``job result`` copied ``model.safetensors`` by its
name: a worker that added a tensor holding rows (or widened one, or appended bytes after the
data) had them carried out of the zone by the researcher's next ``job result``. Now the gate
compares the file with the architecture the job's spec and the dataset's contract declare
(``sandbox.release_check``) and refuses anything else.

A real small DP-SGD job runs in-process (set-up not under attack); the job's weights are
then tampered with in the zone's job folder, as the worker could have, and the release is
asked for in-process and through the installed ``sandbox`` command: both refuse with an
integrity error (never retry) that names the file but none of the smuggled numbers, nothing
reaches the release folder, the refusal is in the audit log as an error of ``job.result``,
and the audit chain still verifies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_runner import SANDBOX, refused, sandbox
from factories import job_spec, make_world
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from foundation.errors import IntegrityError
from sandbox.backend import InProcessBackend
from sandbox.jobs import JobState

#: rows as a bad worker would copy them: person 4711, aged 67, readmitted, HbA1c 8.25
ROWS = np.array([[4711.0, 67.0, 1.0, 8.25], [4712.0, 54.0, 0.0, 6.5]], dtype=np.float32)


def _smuggle(weights: Path) -> None:
    """Add a tensor of rows next to the real ones, keeping the worker's metadata."""
    with safe_open(str(weights), framework="numpy") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(weights))
    save_file({**tensors, "calibration": ROWS}, str(weights), metadata=metadata)


def test_rows_smuggled_into_the_weights_never_leave(tmp_path: Path) -> None:
    w = make_world(tmp_path / "zone", InProcessBackend(), patients=800)
    try:
        spec = job_spec(**{"model.hidden": [8], "training.epochs": 1, "training.batch_size": 64})
        job = w.svc.submit(w.researcher, spec)
        assert job.state is JobState.SUCCEEDED

        # the untampered release, as the worker wrote it, passes the content check
        ok = w.svc.job_result(w.researcher, job.id, tmp_path / "ok")
        assert sorted(Path(f).name for f in ok["files"]) == [
            "model.safetensors",
            "model_card.json",
            "preprocessing.json",
        ]

        _smuggle(w.svc.zone.job_dir(job.id) / "model.safetensors")
        out = tmp_path / "stolen"
        with pytest.raises(IntegrityError, match="model.safetensors: holds tensors") as exc:
            w.svc.job_result(w.researcher, job.id, out)
        assert exc.value.retryable is False
        for secret in ("4711", "67.0", "8.25", "calibration"):
            assert secret not in str(exc.value)
        assert not out.exists()

        # the refusal is audited by the service's act(): one error event for job.result
        events = w.svc.audit.list(action="job.result", outcome="error")
        assert [(e.target, e.details.get("error")) for e in events] == [(job.id, "integrity_error")]
        assert w.svc.audit.verify().ok
    finally:
        w.svc.close()

    # and as the researcher meets it: exit 3 (a backend error), one JSON line, no retry
    if SANDBOX.exists():
        cli_out = tmp_path / "stolen-cli"
        proc = sandbox(
            "jobs", "result", job.id, "--out", str(cli_out), "--json",
            zone=w.root, token=w.researcher_token,
        )  # fmt: skip
        err = refused(proc, code=3)
        assert err["error"] == "integrity_error" and err["retryable"] is False
        assert "4711" not in proc.stdout + proc.stderr and not cli_out.exists()
