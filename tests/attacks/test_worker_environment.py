"""A ``sitecustomize.py`` on the caller's PYTHONPATH never runs where jobs run.

Every Python imports ``sitecustomize`` from its path at start-up, so whoever sets the shell's
``PYTHONPATH`` (or ``PYTHONSTARTUP``, ``LD_PRELOAD``, ...) of the process that starts the
workers runs code in them, and such code decides what a worker reports. Here the attacker's
``sitecustomize.py`` writes a marker file named after its process when it is imported; the
zone's job processes must never write one:

- the environment the service gives the processes it starts (``engine_environ``,
  ``sanitise_environ``): the dangerous variables gone, PYTHONPATH exactly the product's
  import roots, no user site-packages; a Python started with it imports no
  ``sitecustomize`` from the caller's folder, yet imports the product;
- the federated child's environment (``child_environ``), and a real federated run whose
  child attaches to the session's Ray (slow);
- a local Ray started by ``RayBackend`` in a process whose environment carries the attack
  (slow: it starts its own Ray, in a subprocess, since the test session's Ray was started
  before any monkeypatch);
- Ray's temp folder is private to the zone.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from foundation.engine_env import (
    MAX_RAY_TEMP_LEN,
    PRODUCT_PACKAGES,
    RAY_TEMP_LEAF,
    RAY_TEMP_RECORD,
    engine_environ,
    product_import_roots,
    ray_temp_dir,
    sanitise_environ,
)
from training.federated.simulation import DEFAULT_CLIENT_FACTORY, child_environ

ROOT = Path(__file__).resolve().parents[2]
ATTACK = {
    "PYTHONSTARTUP": "/nonexistent/startup.py",
    "PYTHONHOME": "/nonexistent/home",
    "PYTHONUSERBASE": "/nonexistent/userbase",
    "PYTHONPYCACHEPREFIX": "/nonexistent/pycache",
    "PYTHONWARNINGS": "error::evil.Warning",
    "PYTHONBREAKPOINT": "evil.breakpoint",
    "LD_PRELOAD": "/nonexistent/evil.so",
    "LD_AUDIT": "/nonexistent/audit.so",
    "LD_LIBRARY_PATH": "/nonexistent/lib",
    "RAY_ADDRESS": "10.0.0.1:6379",
    "RAY_RUNTIME_ENV_HOOK": "evil.hook",
    "RAY_START_HOOK": "evil.hook",
}


@pytest.fixture
def evil(tmp_path: Path) -> Path:
    """A folder holding the attacker's ``sitecustomize.py``; markers land in ``marks``."""
    folder = tmp_path / "evil"
    marks = tmp_path / "marks"
    folder.mkdir()
    marks.mkdir()
    (folder / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import os, pathlib
            pathlib.Path({str(marks)!r}, "imported-%d" % os.getpid()).write_text("pwned")
            """
        )
    )
    return folder


def _marks(evil: Path) -> list[str]:
    return sorted(p.name for p in (evil.parent / "marks").iterdir())


def _probe(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A Python started with ``env``: it imports the product, and says which sitecustomize
    (if any) it imported."""
    code = (
        "import sys, sandbox, training.federated.simulation; "
        "m = sys.modules.get('sitecustomize'); print(getattr(m, '__file__', None))"
    )
    return subprocess.run(
        [sys.executable, *args, "-c", code],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_attack_works_on_a_plain_environment(evil: Path, tmp_path: Path) -> None:
    """The control: with the caller's PYTHONPATH, the marker is written."""
    env = {**os.environ, "PYTHONPATH": str(evil)}
    done = _probe(env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert _marks(evil) != []


def test_engine_environ_drops_what_the_caller_set(evil: Path, tmp_path: Path) -> None:
    caller = {**os.environ, **ATTACK, "PYTHONPATH": f"{evil}{os.pathsep}{tmp_path}"}
    env = engine_environ(caller)
    for name in ATTACK:
        assert name not in env, name
    assert not any(k.startswith(("LD_", "DYLD_")) for k in env)
    assert env["PYTHONNOUSERSITE"] == "1"
    roots = env["PYTHONPATH"].split(os.pathsep)
    assert roots == list(product_import_roots())
    assert str(evil) not in roots and str(tmp_path) not in roots
    # the product's packages, and nothing of the caller's, are importable
    assert str(ROOT) in roots
    done = _probe(env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert str(evil) not in done.stdout
    assert _marks(evil) == []


def test_sanitise_environ_cleans_in_place(evil: Path) -> None:
    environ = {**ATTACK, "PYTHONPATH": str(evil), "HOME": "/home/x", "FLWR_HOME": "/z/flwr"}
    sanitise_environ(environ)
    assert not set(ATTACK) & set(environ)
    assert environ["HOME"] == "/home/x" and environ["FLWR_HOME"] == "/z/flwr"
    assert str(evil) not in environ["PYTHONPATH"].split(os.pathsep)
    assert environ["PYTHONNOUSERSITE"] == "1"


def test_the_federated_child_gets_the_products_roots_only(
    evil: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as in a CLI started with the attacker's PYTHONPATH: on its environment and its path
    monkeypatch.setenv("PYTHONPATH", str(evil))
    monkeypatch.syspath_prepend(str(evil))
    for name, value in ATTACK.items():
        monkeypatch.setenv(name, value)
    env = child_environ(DEFAULT_CLIENT_FACTORY)
    assert env["PYTHONPATH"].split(os.pathsep) == list(product_import_roots())
    assert not set(ATTACK) & set(env)
    # started as run_federated_simulation starts it (-P -s, in a folder of its own)
    done = _probe(env, tmp_path, "-P", "-s")
    assert done.returncode == 0, done.stderr
    assert _marks(evil) == []
    # a test's ClientApp factory named at the call adds its own folder, nothing else
    harness = child_environ("federated_harness.faults:faulty_client_app")
    extra = harness["PYTHONPATH"].split(os.pathsep)[len(product_import_roots()) :]
    assert extra == [str(ROOT / "tests")]


def test_the_roots_are_the_products_packages() -> None:
    roots = product_import_roots()
    for name in PRODUCT_PACKAGES:
        assert any((Path(r) / name / "__init__.py").exists() for r in roots), name


def test_rays_temp_folder_is_private(tmp_path: Path) -> None:
    # a deep zone (pytest's): Ray's socket paths would be too long inside it
    deep = tmp_path / "zone"
    assert len(str(deep / "ray" / RAY_TEMP_LEAF)) > MAX_RAY_TEMP_LEN
    made = ray_temp_dir(deep)
    assert made == ray_temp_dir(deep)  # recorded: every process of the zone finds it
    # Ray opens the folder it is given to everyone (0777): what keeps others out is its
    # parent, private to the service's account
    parent = made.parent
    assert made.name == RAY_TEMP_LEAF
    assert (deep / RAY_TEMP_RECORD).read_text() == str(parent)
    mode = stat.S_IMODE(parent.stat().st_mode)
    assert mode == 0o700 and parent.stat().st_uid == os.getuid()
    # a name nobody can guess (the old one was derived from the zone's path)
    assert parent.name.startswith("sz-ray-") and made != ray_temp_dir(tmp_path / "other")
    # a recorded folder someone else could enter is not reused
    parent.chmod(0o755)
    again = ray_temp_dir(deep)
    assert again != made and stat.S_IMODE(again.parent.stat().st_mode) == 0o700


def test_a_short_zone_keeps_rays_folder_inside(tmp_path: Path) -> None:
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="z"))
    try:
        assert len(str(short / "ray" / RAY_TEMP_LEAF)) <= MAX_RAY_TEMP_LEN
        made = ray_temp_dir(short)
        assert made == short.resolve() / "ray" / RAY_TEMP_LEAF
        assert stat.S_IMODE(made.parent.stat().st_mode) == 0o700
    finally:
        import shutil

        shutil.rmtree(short, ignore_errors=True)


@pytest.mark.slow
def test_a_local_ray_started_by_the_service_runs_clean_workers(evil: Path, tmp_path: Path) -> None:
    """The service's process carries the attack in its environment (not on its own path:
    the caller's own process is the caller's); its Ray's workers must not import it."""
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        os.environ["PYTHONPATH"] = {str(evil)!r}
        os.environ["PYTHONSTARTUP"] = "/nonexistent/startup.py"
        from sandbox.backend import Resources
        from sandbox.ray_backend import RayBackend

        backend = RayBackend(Path({str(tmp_path / "zone")!r}), num_cpus=1)
        # any function of a payload: json.dumps is one every worker can import
        import json
        handle = backend.submit(json.dumps, {{"job_id": "probe"}}, Resources(cpus=1, gpus=0))
        print("result", backend.wait(handle, poll=lambda: None))
        assert "PYTHONSTARTUP" not in os.environ
        backend.shutdown()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'result {"job_id": "probe"}' in done.stdout
    assert _marks(evil) == []


@pytest.mark.slow
@pytest.mark.ray
def test_a_federated_run_never_imports_the_callers_sitecustomize(
    evil: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_local: Any
) -> None:
    import secrets

    from connectors.cohort import cohort_contract, generate_cohort
    from connectors.ingest import ingest_table
    from training.federated.config import FederatedConfig
    from training.federated.payload import FederatedPayload
    from training.federated.simulation import run_federated_simulation
    from training.models import ModelConfig

    contract = cohort_contract()
    ingest_table(generate_cohort(1500, seed=5), contract, tmp_path / "ds", secrets.token_bytes(32))
    payload = FederatedPayload(
        job_id="job-env",
        dataset="cohort",
        dataset_path=tmp_path / "ds",
        contract=contract,
        config=FederatedConfig(
            rounds=1,
            sites=("hospital-a", "hospital-b"),
            label="readmitted_30d",
            features=("age", "sex", "diabetes"),
            model=ModelConfig("logistic", ()),
            epsilon=1.0,
            delta=1e-6,
            max_grad_norm=1.0,
            batch_size=32,
            lr=0.5,
            seed=3,
            min_site_rows=1,
            evaluate=False,
        ),
        out_dir=tmp_path / "out",
        noise_secret_hex=secrets.token_hex(32),
    )
    path = payload.write(tmp_path / "payload.json")
    # as in a CLI started with the attacker's PYTHONPATH: on its environment and its path
    monkeypatch.setenv("PYTHONPATH", str(evil))
    monkeypatch.syspath_prepend(str(evil))
    monkeypatch.setenv("PYTHONSTARTUP", "/nonexistent/startup.py")
    result = run_federated_simulation(path, timeout_s=240, zone_dir=tmp_path / "zone")
    assert result.rounds == 1
    assert _marks(evil) == []
