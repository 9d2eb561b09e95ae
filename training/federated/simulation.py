"""Run a federated job on Flower's Simulation Engine (Ray), bounded by a timeout.

``run_federated_simulation(payload_path, timeout_s=...)`` runs the job's ServerApp and one
simulated SuperNode per site (``flwr.simulation.run_simulation``) in a child process and
returns a ``FederatedResult`` read from the files the ServerApp wrote.

Why a child process:

* **A hard timeout.** ``run_simulation`` can hang after an error (docs/engines.md: e.g. actors
  that never get resources); a thread cannot be stopped, a process can. On timeout the
  child and everything it started are killed and ``ComputeError(retryable=True)`` raised.
* **The zone's Ray survives.** Flower 1.42's Ray backend calls ``ray.shutdown()`` when a
  simulation ends. If this process already has a Ray (the zone keeps one running), the
  child *attaches* to it by address, so that shutdown only disconnects the child and the
  zone's Ray, with its warm workers, stays up; Ray's own start (~4 s) is not paid again.
  Without one, the child starts a local, loopback-only Ray (``address="local"``, temp dir
  from ``foundation.engine_env.ray_temp_dir``) and Flower stops it at the end.

Each simulated client gets ``num_cpus``/``num_gpus`` from the job's config as Ray
resources (default 1 CPU: Flower's default of 2 runs one client at a time on two cores), its
CPUs raised where Flower would otherwise start more actors than the job has sites
(``client_cpus``).

Progress: the parent polls ``rounds.jsonl`` while it waits and calls ``on_round`` with each
new line (the zone's progress bar does the same); the arrival times give the per-round
timings and the cold start (launch until the setup phase is done: process start, Ray start
or attach, actors, the first ClientApp call).

The child's own output (Flower's and Ray's logs) goes to ``log_path`` if given, else is
discarded: the zone's code never logs a row value, but a third-party message could.

The child's environment is the service's, not the caller's shell
(``foundation.engine_env.engine_environ``): no ``PYTHONPATH`` but the product's own import
roots (plus the folder of a non-default ``client_factory``'s module, named at the call),
no ``PYTHONSTARTUP``, ``PYTHONHOME``, ``LD_PRELOAD``, user site-packages or the like, so a
``sitecustomize.py`` on the caller's path never runs in the child or in the actors it
starts (they get the same ``PYTHONPATH`` through Ray's ``runtime_env``). It starts in a
private scratch folder with ``-P``: the caller's working folder is never on its path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from foundation.engine_env import PRODUCT_PACKAGES, engine_environ
from foundation.errors import ComputeError, SpecError
from training.federated.payload import (
    ROUNDS_FILE,
    STATUS_FILE,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    load_payload,
)

#: the ClientApp factory a simulation runs: ``factory(payload_path) -> ClientApp``
DEFAULT_CLIENT_FACTORY = "training.federated.client:build_client_app"
#: how often the parent looks at the job's files while the child runs
_POLL_S = 0.02
#: grace for the child to exit after it was asked to stop, before it is killed
_KILL_GRACE_S = 3.0


@dataclass(frozen=True)
class FederatedResult:
    """What a finished simulation did. Figures come from ``summary.json``; timings are the
    parent's observations (operational, inside the zone)."""

    job_id: str
    #: each site's final patient-level epsilon (at ``delta``), what its ledger is charged
    epsilons: Mapping[str, float]
    delta: float
    rounds: int
    out_dir: Path
    rounds_path: Path
    summary_path: Path
    weights_path: Path
    #: wall time from launch to the child's exit
    seconds: float
    #: launch until the setup phase ended (engine start, actors, first ClientApp call)
    cold_start_s: float
    #: wall time of each round, from the previous round's line (or the setup) to its line;
    #: the last includes the DP evaluation
    round_seconds: tuple[float, ...]
    dropped: tuple[str, ...]
    excluded: tuple[str, ...]
    server_epsilon: float | None
    #: whether an already running Ray was attached to (else the child started one)
    ray_reused: bool
    #: the child's Ray start or attach
    ray_init_s: float
    #: launch until the child's engine was ready (process start, imports, Ray start/attach)
    engine_start_s: float
    summary: Mapping[str, Any] = field(repr=False, default_factory=dict)


def _current_ray() -> str | None:
    """The GCS address of a Ray this process already runs or is attached to, else None."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return str(ray.get_runtime_context().gcs_address)


def _check_resources(num_cpus: float, num_gpus: float, address: str | None) -> None:
    """Refuse what would leave Flower's actors pending forever (docs/engines.md)."""
    if address is not None:
        import ray

        have = ray.cluster_resources()
        cpus, gpus = float(have.get("CPU", 0)), float(have.get("GPU", 0))
    else:
        cpus = float(os.cpu_count() or 1)
        gpus = 0.0
        if num_gpus > 0:
            import torch

            gpus = float(torch.cuda.device_count())
    if num_cpus > cpus:
        raise SpecError(
            "federated.num_cpus",
            f"asks for {num_cpus:g} CPUs per site but Ray has {cpus:g}",
            f"set num_cpus <= {cpus:g}",
        )
    if num_gpus > gpus:
        raise SpecError(
            "federated.num_gpus",
            f"asks for {num_gpus:g} GPU(s) per site but Ray has {gpus:g}",
            "set num_gpus = 0, or run on a cluster with GPUs",
        )


def factory_root(client_factory: str) -> Path | None:
    """The folder that holds ``client_factory``'s top-level package, when it is not one of
    the product's (a test's fault-injecting ClientApp): the child needs it to import the
    factory it was named. Located without importing anything."""
    import importlib.util

    top = client_factory.partition(":")[0].split(".")[0]
    if not top or top in PRODUCT_PACKAGES:
        return None
    spec = importlib.util.find_spec(top)
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("namespace", "built-in"):
        origin = Path(spec.origin).resolve()
        # a package's __init__.py sits in the package's folder; a module sits in the root
        return origin.parent.parent if spec.submodule_search_locations else origin.parent
    locations = list(spec.submodule_search_locations or ())
    return Path(locations[0]).resolve().parent if locations else None


def child_environ(client_factory: str = DEFAULT_CLIENT_FACTORY) -> dict[str, str]:
    """The federated child's environment: this process's, cleaned (see the module
    docstring), with the product's import roots (and ``client_factory``'s) as PYTHONPATH."""
    root = factory_root(client_factory)
    return engine_environ(os.environ, extra_roots=() if root is None else (root,))


def _descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    import psutil

    family = _descendants(proc.pid)
    try:
        proc.terminate()
        proc.wait(timeout=_KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in family:
        try:
            child.kill()
        except psutil.Error:
            pass


class _RoundWatcher:
    """Reads complete new lines of rounds.jsonl and the setup phase's end, with times."""

    def __init__(self, out_dir: Path, on_round: Callable[[dict[str, Any]], None] | None) -> None:
        self.rounds = out_dir / ROUNDS_FILE
        self.status = out_dir / STATUS_FILE
        self.on_round = on_round
        self.offset = 0
        self.setup_done: float | None = None
        self.arrivals: list[float] = []

    def poll(self) -> None:
        now = time.perf_counter()
        if self.setup_done is None and self.status.exists():
            try:
                phase = json.loads(self.status.read_text()).get("phase")
            except (OSError, json.JSONDecodeError):
                phase = None  # being replaced right now: look again next time
            if phase not in (None, "setup"):
                self.setup_done = now
        if not self.rounds.exists():
            return
        with open(self.rounds, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for raw in chunk[: end + 1].splitlines():
            if not raw.strip():
                continue
            if self.setup_done is None:
                self.setup_done = now
            self.arrivals.append(now)
            if self.on_round is not None:
                self.on_round(json.loads(raw))


def run_federated_simulation(
    payload_path: str | Path,
    *,
    timeout_s: float,
    zone_dir: Path | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    client_factory: str = DEFAULT_CLIENT_FACTORY,
    log_path: Path | None = None,
    namespace: str | None = None,
) -> FederatedResult:
    """Run the job in ``payload_path`` on Flower's Simulation Engine; at most ``timeout_s``.

    ``zone_dir`` is where the engines keep their files (``configure_engine_env``; default:
    a folder in the system temp dir). ``client_factory`` names the ClientApp factory
    (``"module:function"``, called with the payload path). Raises ``ComputeError`` when the
    job fails or times out; ``summary.json`` (status "failed") then still holds what each
    site spent, for the ledger. Raises ``SpecError`` for a bad payload or resources.
    ``namespace``: the Ray namespace the child's driver joins (the job's project)."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
        raise SpecError("timeout_s", "must be a number of seconds > 0", "e.g. 600")
    payload_path = Path(payload_path).resolve()
    payload = load_payload(payload_path)
    cfg = payload.config
    # without a zone: a private folder of its own (never a shared, predictable one)
    zone = Path(zone_dir) if zone_dir is not None else Path(tempfile.mkdtemp(prefix="sz-fl-zone-"))
    from foundation.engine_env import configure_engine_env, ray_temp_dir

    configure_engine_env(zone)
    address = _current_ray()
    _check_resources(cfg.num_cpus, cfg.num_gpus, address)
    out = payload.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for name in (ROUNDS_FILE, STATUS_FILE, SUMMARY_FILE, WEIGHTS_FILE):
        (out / name).unlink(missing_ok=True)

    scratch = Path(tempfile.mkdtemp(prefix="sz-fl-"))
    spec = {
        "payload": str(payload_path),
        "client_factory": client_factory,
        "ray_address": address,
        "namespace": namespace,
        "ray_temp_dir": str(ray_temp_dir(zone)),
        "num_cpus_total": os.cpu_count() or 1,
        "num_supernodes": len(cfg.sites),
        "client_resources": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "zone_dir": str(zone),
        "result": str(scratch / "child.json"),
    }
    (scratch / "spec.json").write_text(json.dumps(spec))
    env = child_environ(client_factory)
    sink = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    watcher = _RoundWatcher(out, on_round)
    started = time.perf_counter()
    launched_at = time.time()
    try:
        proc = subprocess.Popen(
            # -P: no working folder on the child's path; -s: no user site-packages
            [
                sys.executable,
                "-P",
                "-s",
                "-m",
                "training.federated.simulation",
                str(scratch / "spec.json"),
            ],
            stdout=sink,
            stderr=sink,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=scratch,
            start_new_session=True,
        )
        try:
            while proc.poll() is None:
                watcher.poll()
                if time.perf_counter() - started > timeout_s:
                    _kill_tree(proc)
                    raise ComputeError(
                        f"the federated simulation did not finish within {timeout_s:g} s and "
                        "was stopped; summary.json (if written) holds the sites' spend",
                        retryable=True,
                    )
                time.sleep(_POLL_S)
        except BaseException:
            if proc.poll() is None:
                _kill_tree(proc)
            raise
        seconds = time.perf_counter() - started
        watcher.poll()
    finally:
        if log_path is not None:
            sink.close()  # type: ignore[union-attr]
    child: dict[str, Any] = {}
    try:
        child = json.loads((scratch / "child.json").read_text())
    except (OSError, json.JSONDecodeError):
        pass
    summary_path = out / SUMMARY_FILE
    summary: dict[str, Any] = {}
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
    if proc.returncode != 0 or summary.get("status") != "completed":
        why = summary.get("error") or child.get("error") or f"exit code {proc.returncode}"
        raise ComputeError(f"the federated job failed: {why}", retryable=not summary)
    arrivals = watcher.arrivals
    setup_done = watcher.setup_done if watcher.setup_done is not None else started
    marks = [setup_done, *arrivals]
    return FederatedResult(
        job_id=payload.job_id,
        epsilons=MappingProxyType({k: float(v["epsilon"]) for k, v in summary["sites"].items()}),
        delta=cfg.delta,
        rounds=int(summary["rounds_done"]),
        out_dir=out,
        rounds_path=out / ROUNDS_FILE,
        summary_path=summary_path,
        weights_path=out / WEIGHTS_FILE,
        seconds=seconds,
        cold_start_s=setup_done - started,
        round_seconds=tuple(b - a for a, b in zip(marks[:-1], marks[1:], strict=True)),
        dropped=tuple(summary.get("dropped", ())),
        excluded=tuple(e["site"] for e in summary.get("excluded", ())),
        server_epsilon=(summary.get("server_dp") or {}).get("epsilon"),
        ray_reused=bool(child.get("ray_reused", address is not None)),
        ray_init_s=float(child.get("ray_init_s", 0.0)),
        engine_start_s=max(0.0, float(child.get("engine_ready_at", launched_at)) - launched_at),
        summary=MappingProxyType(summary),
    )


# --- the child process ------------------------------------------------------------------


def _load_factory(ref: str) -> Callable[[str], Any]:
    import importlib

    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise SpecError("client_factory", "must be 'module:function'")
    return getattr(importlib.import_module(module), attr)


def client_cpus(node_cpus: list[float], sites: int, asked: float) -> float:
    """The CPUs each simulated client asks Ray for, so that Flower starts no more ClientApp
    actors than the job has sites.

    Flower's Ray backend starts ``floor(node CPUs / client CPUs)`` actors on every node
    however many sites there are (``pool_size_from_resources``), each a process importing
    Flower and torch (~5 CPU-s, several hundred MB): a two-site job on a 16-CPU node started
    16. The smallest count at or above ``asked`` (never below what the spec asked) whose pool
    is at most ``sites`` is used; each actor then has that many CPUs for its torch threads.
    Counts are cut to Ray's resource precision (1e-4) downwards, so that ``k`` actors of
    ``n / k`` still fit a node of ``n``."""
    nodes = [n for n in node_cpus if n > 0]
    if not nodes or sites < 1:
        return asked

    def pool(cpus: float) -> int:
        return sum(int(n / cpus) for n in nodes)

    options = {asked} | {
        math.floor(n / k * 10_000) / 10_000
        for n in nodes
        for k in range(1, sites + 1)
        if n / k >= asked
    }
    fitting = [c for c in sorted(options) if c >= asked and pool(c) <= sites]
    return fitting[0] if fitting else asked


def _child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result: dict[str, Any] = {"ray_reused": spec["ray_address"] is not None}
    from foundation.engine_env import configure_engine_env

    configure_engine_env(Path(spec["zone_dir"]))
    try:
        import ray
        from flwr.simulation import run_simulation

        from training.federated.server import build_server_app

        runtime_env = {"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}}
        t0 = time.perf_counter()
        if spec["ray_address"] is not None:
            ray.init(
                address=spec["ray_address"],
                namespace=spec.get("namespace"),
                log_to_driver=False,
                logging_level=logging.ERROR,
                runtime_env=runtime_env,
            )
        else:
            tmp = Path(spec["ray_temp_dir"])
            tmp.mkdir(parents=True, exist_ok=True)
            ray.init(
                address="local",
                namespace=spec.get("namespace"),
                num_cpus=int(spec["num_cpus_total"]),
                include_dashboard=False,
                _temp_dir=str(tmp),
                log_to_driver=False,
                logging_level=logging.ERROR,
                runtime_env=runtime_env,
            )
        result["ray_init_s"] = time.perf_counter() - t0
        result["engine_ready_at"] = time.time()
        payload = spec["payload"]
        client = dict(spec["client_resources"])
        node_cpus = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Resources"]]
        client["num_cpus"] = client_cpus(
            node_cpus, int(spec["num_supernodes"]), float(client["num_cpus"])
        )
        result["client_cpus"] = client["num_cpus"]
        run_simulation(
            server_app=build_server_app(payload),
            client_app=_load_factory(spec["client_factory"])(payload),
            num_supernodes=int(spec["num_supernodes"]),
            backend_config={"client_resources": client},
        )
        code = 0
    except BaseException as exc:  # noqa: BLE001 - reported to the parent by type only
        result["error"] = f"{type(exc).__name__} in the simulation engine"
        code = 1
    Path(spec["result"]).write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
