"""Flower's Deployment Engine on loopback: one SuperLink, one SuperNode per site.

``LoopbackFederation`` runs a real federation on one machine, each part its own process, the
way hospitals would run it but with every listener on 127.0.0.1::

    flower-superlink   Fleet, Control and Runtime APIs on one port (insecure: loopback only),
      │                state in ``state_dir/superlink.db``, ServerApps in subprocesses,
      │                no runtime dependency installation (no per-run venv, no network)
      └─ flower-superexec (Flower starts it, detached)  ──>  flwr-serverapp per run
    flower-supernode   one per site, its own Runtime API port and node config
      └─ flower-superexec                              ──>  flwr-clientapp per message

Test machinery, not product code: it lives under ``tests/`` and the product never imports
it. An operator can still use it from a checkout to rehearse a deployment; a real deployment
is the same processes on the hospitals' machines with TLS and SuperNode authentication
(``docs/federated-deployment.md``), running the product's Flower App
(``training/federated/flwr_app``).

Lifecycle (the context manager does both ends)::

    with LoopbackFederation(state_dir, [SiteNode("hospital-a", path_a), ...]) as fed:
        outcome = fed.run(FLOWER_APP_DIR, {"job-payload": str(payload)}, timeout_s=600)
        outcome.raise_for_status()

* ``start`` (``__enter__``): sets the engine environment (``configure_engine_env``), picks
  free loopback ports, starts the SuperLink, waits until it accepts connections, writes the
  connection into ``$FLWR_HOME/config.toml``, starts the SuperNodes, waits until the SuperLink
  reports every one of them online, and checks that every process of the federation listens
  on loopback addresses only. A part that does not come up raises ``ComputeError`` naming the
  part and its log file; everything already started is stopped first.
* ``run``: ``flwr run APP NAME --stream --run-config FILE``. ``flwr run`` exits 0 even when the
  run failed, so the outcome comes from the SuperLink's own record (``flwr ls --format json``),
  never from the exit code. A run that does not finish within ``timeout_s`` is stopped
  (``flwr stop``) and reported as ``TIMED_OUT``.
* ``stop`` (``__exit__``, idempotent): SuperNodes first, then the SuperLink, each by its own
  process group (each part is started as a session leader); then a sweep by process id of
  every process that still carries this federation's random tag in its environment (Flower
  detaches the SuperLink's SuperExec into a session of its own, and ServerApp/ClientApp
  processes can outlive their parents). Never by process name: other federations, other
  users' Flower processes and the ``flwr run APP local`` SuperLink of someone else are left
  alone.

Logs: every process writes to ``state_dir/logs/`` (never to the caller's terminal): Flower's
logs can contain whatever a ServerApp or ClientApp printed, so they are zone-internal files,
not releases. Errors raised here name files and parts, never log content.

Layout of ``state_dir``::

    superlink.db                  the SuperLink's state (runs, nodes, messages)
    logs/superlink.log            logs/supernode-<site>.log    logs/run-<n>.log
    logs/flwr-cli.log             stderr of the flwr CLI calls
    nodes/<site>/node-config.toml nodes/<site>/flwr/  (the node's own FLWR_HOME: its apps)
    runs/<n>/run-config.toml
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import tomli_w  # ships with flwr; tomllib only reads

import training.federated
from foundation.engine_env import configure_engine_env
from foundation.errors import ComputeError, SpecError

#: the Flower App folder that runs the zone's federated trainer (``flwr run`` builds it);
#: it ships with the product, beside the ServerApp and ClientApp it names
FLOWER_APP_DIR = Path(training.federated.__file__).resolve().parent / "flwr_app"

#: every listener of a loopback federation binds here, and nowhere else
LOOPBACK_HOST = "127.0.0.1"

#: the environment variable that tags every process of one federation (value: random hex)
PROCESS_TAG_VAR = "SAFE_ZONE_FEDERATION_TAG"

# run_config and node_config keys are TOML bare keys (Flower flattens dotted ones)
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_STARTED_RUN = re.compile(r"Successfully started run (\d+)")
# the flower default connections: Flower's hosted SuperGrid (network) and "local", which
# starts a detached SuperLink nobody stops; the zone's Flower home has neither
_FLOWER_DEFAULT_CONNECTIONS = ("supergrid", "local")
# a freshly picked free port can be taken by someone else before the process binds it
_PORT_ATTEMPTS = 3
_POLL_S = 0.2


class RunStatus(StrEnum):
    """How a federated run ended, from the SuperLink's record (``flwr ls``)."""

    #: Flower ``finished:completed``: the ServerApp returned normally
    COMPLETED = "completed"
    #: Flower ``finished:failed``: the ServerApp raised or exited non-zero
    FAILED = "failed"
    #: Flower ``finished:stopped``: someone ran ``flwr stop`` on it
    STOPPED = "stopped"
    #: ours: not finished within ``timeout_s``; we stopped it with ``flwr stop``
    TIMED_OUT = "timed_out"


@dataclass(frozen=True)
class SiteNode:
    """One hospital's SuperNode: its name and its own governed Parquet file.

    ``site`` becomes the node config's ``site`` and part of log file names, so it is a short
    name (letters, digits, ``-``, ``_``, ``.``). ``data_path`` must be an absolute path to
    the site's governed Parquet file (or its governed dataset directory): the SuperNode hands
    it to the ClientApp as ``data-path``.
    """

    site: str
    data_path: Path

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not _SITE.match(self.site):
            raise SpecError(
                "site",
                "must be 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit",
                "name the hospital, e.g. hospital-a",
            )
        path = Path(self.data_path)
        if not path.is_absolute():
            raise SpecError("data_path", "must be an absolute path", "resolve() it first")
        if not path.exists():
            raise SpecError("data_path", f"does not exist: {path}", "pass the site's Parquet")
        object.__setattr__(self, "data_path", path)


@dataclass(frozen=True)
class LoopbackSettings:
    """Time limits of a loopback federation (seconds)."""

    #: SuperLink and every SuperNode up and registered
    start_timeout_s: float = 90.0
    #: between SIGTERM and SIGKILL for each process group on stop
    stop_grace_s: float = 10.0
    #: one ``flwr ls`` / ``flwr stop`` / ``flwr supernode ls`` call
    cli_timeout_s: float = 60.0
    #: the connection's name in ``$FLWR_HOME/config.toml`` (default: ``safe-zone-<random>``)
    name: str = ""

    def __post_init__(self) -> None:
        for name in ("start_timeout_s", "stop_grace_s", "cli_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise SpecError(name, "must be a positive number of seconds", "e.g. 60")
        if self.name and not _KEY.match(self.name):
            raise SpecError("name", "must be letters, digits, '-' or '_'", "e.g. safe-zone")


@dataclass(frozen=True)
class RunOutcome:
    """What one ``run`` came to. Zone-internal: the log may hold anything the apps printed."""

    run_id: int
    status: RunStatus
    #: the SuperLink's status string, e.g. ``finished:failed`` (``""`` if it never finished)
    flower_status: str
    #: seconds from ``flwr run`` starting to the final status
    wall_s: float
    #: ``flwr run --stream`` output and the final ``flwr ls`` record
    log_path: Path

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.COMPLETED

    def raise_for_status(self) -> None:
        """Raise ``ComputeError`` unless the run completed (the message names the log)."""
        if self.ok:
            return
        raise ComputeError(
            f"federated run {self.run_id} {self.status.value}"
            f" (Flower status {self.flower_status or 'unfinished'}); see {self.log_path}",
            retryable=self.status is RunStatus.TIMED_OUT,
        )


@dataclass(frozen=True)
class Listener:
    """A listening TCP socket of one federation process."""

    pid: int
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback


@dataclass(frozen=True)
class _PartSpec:
    """How to start one part: its name, log file, command line for a port, environment."""

    role: str
    log_name: str
    argv: Callable[[int], list[str]]
    env: dict[str, str] = field(hash=False)


@dataclass
class _Part:
    """One process we started: a SuperLink or a SuperNode (a session leader)."""

    role: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int
    log: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid


class LoopbackFederation:
    """A SuperLink and one SuperNode per site, all on 127.0.0.1 (see the module docstring).

    ``state_dir`` must be new or empty: a SuperLink database from an earlier federation
    would list that federation's nodes and runs. ``zone_dir`` is handed to
    ``configure_engine_env`` (default: ``state_dir``); ``$FLWR_HOME`` is the zone's Flower
    home, where the connection is written and the ServerApp's apps are installed. Each
    SuperNode gets a Flower home of its own under ``state_dir/nodes/<site>/flwr``, as a
    hospital's machine would. One caller at a time: ``run`` calls are not meant to overlap.
    """

    def __init__(
        self,
        state_dir: str | Path,
        sites: Sequence[SiteNode],
        *,
        zone_dir: str | Path | None = None,
        settings: LoopbackSettings | None = None,
    ) -> None:
        sites = tuple(sites)
        if not sites:
            raise SpecError("sites", "must name at least one site", "pass SiteNode(...)s")
        if not all(isinstance(s, SiteNode) for s in sites):
            raise SpecError("sites", "must be SiteNode values", "pass SiteNode(site, path)")
        names = [s.site for s in sites]
        if len(set(names)) != len(names):
            raise SpecError("sites", "names a site twice", "one SuperNode per site")
        self.state_dir = Path(state_dir).resolve()
        self.sites = sites
        self.zone_dir = Path(zone_dir).resolve() if zone_dir is not None else self.state_dir
        self.settings = settings or LoopbackSettings()
        self._tag = secrets.token_hex(16)
        self.name = self.settings.name or f"safe-zone-{self._tag[:8]}"
        self._superlink: _Part | None = None
        self._nodes: list[_Part] = []
        self._env: dict[str, str] = {}
        self._bin = Path(sys.executable).parent
        self._runs = 0
        self._known_runs: set[int] = set()
        self._config_written = False
        self._flwr_home: Path | None = None

    # --- paths and facts ------------------------------------------------------------------

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def database(self) -> Path:
        return self.state_dir / "superlink.db"

    @property
    def superlink_address(self) -> str:
        if self._superlink is None:
            raise ComputeError("the federation is not started", retryable=False)
        return f"{LOOPBACK_HOST}:{self._superlink.port}"

    @property
    def flower_config(self) -> Path:
        """``$FLWR_HOME/config.toml``, where this federation's connection is written."""
        if self._flwr_home is None:
            raise ComputeError("the federation is not started", retryable=False)
        return self._flwr_home / "config.toml"

    def pids(self) -> tuple[int, ...]:
        """Every live process of this federation (by its environment tag), zombies excluded."""
        return tuple(_tagged_pids(self._tag))

    def listeners(self) -> tuple[Listener, ...]:
        """Every listening TCP socket of this federation's processes."""
        return tuple(_listeners(self.pids()))

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> LoopbackFederation:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(raise_on_leftovers=exc is None)

    def start(self) -> None:
        if self._superlink is not None:
            raise ComputeError("the federation is already started", retryable=False)
        configure_engine_env(self.zone_dir)
        if self.database.exists():
            raise SpecError(
                "state_dir",
                f"already holds a SuperLink database ({self.database})",
                "start each federation in a new, empty folder",
            )
        for tool in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
            if not (self._bin / tool).is_file():
                raise ComputeError(
                    f"{tool} not found beside {sys.executable}; install flwr into this venv"
                )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._flwr_home = Path(os.environ["FLWR_HOME"])
        self._flwr_home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # the SuperLink starts `flower-superexec` by name, SuperExecs start flwr-serverapp /
        # flwr-clientapp by name: they must come from this venv
        env["PATH"] = os.pathsep.join([str(self._bin), env.get("PATH", "")])
        env[PROCESS_TAG_VAR] = self._tag
        env["PYTHONUNBUFFERED"] = "1"
        env["NO_COLOR"] = "1"
        env["COLUMNS"] = "200"  # rich wraps the CLI's text output at the terminal width
        self._env = env
        deadline = time.monotonic() + self.settings.start_timeout_s
        try:
            self._start_superlink(deadline)
            self._write_connection()
            self._start_supernodes(deadline)
            self._wait_nodes_online(deadline)
            self._check_loopback_only()
        except BaseException:
            self.stop(raise_on_leftovers=False)
            raise

    def stop(self, *, raise_on_leftovers: bool = True) -> None:
        """Stop every process of this federation, by process id; idempotent."""
        parts = [*self._nodes, *([self._superlink] if self._superlink else [])]
        grace = self.settings.stop_grace_s
        # SuperNodes first, so no node is left retrying a SuperLink that went away
        for group in (self._nodes, [self._superlink] if self._superlink else []):
            for part in group:
                self._kill_group(part, signal.SIGTERM)
            _wait_all([p.popen for p in group], grace)
            for part in group:
                self._kill_group(part, signal.SIGKILL)
            _wait_all([p.popen for p in group], grace)
        for part in parts:
            part.log.close()
        leftovers = self._sweep(grace)
        self._nodes = []
        self._superlink = None
        if self._config_written:
            self._remove_connection()
        if leftovers and raise_on_leftovers:
            raise ComputeError(
                f"processes {sorted(leftovers)} of federation {self.name} did not stop",
                retryable=False,
            )

    def _kill_group(self, part: _Part, sig: int) -> None:
        """Signal the process group ``part`` leads, while it is certainly still ours.

        Its pgid is its pid (``start_new_session``). Linux does not reuse an id that still
        names a process group, so the group is ours while its leader is unreaped or while
        one of our tagged processes is still in it; otherwise nothing is sent.
        """
        if part.popen.poll() is None or any(
            _pgid(pid) == part.pid for pid in _tagged_pids(self._tag)
        ):
            _signal_group(part.pid, sig)

    def _sweep(self, grace: float) -> list[int]:
        """Stop, by pid, every process still carrying this federation's tag."""
        pids = _tagged_pids(self._tag)
        if not pids:
            return []
        for pid in pids:
            _signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(_POLL_S)
            pids = _tagged_pids(self._tag)
        for pid in pids:
            _signal_pid(pid, signal.SIGKILL)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(_POLL_S)
            pids = _tagged_pids(self._tag)
        return pids

    # --- starting the parts ---------------------------------------------------------------

    def _start_parts(self, specs: Sequence[_PartSpec], deadline: float) -> list[_Part]:
        """Start every part at once on fresh free ports, then wait until each accepts
        connections; a part whose port someone else took first is restarted on another."""
        parts = [self._spawn(spec, _free_port()) for spec in specs]
        try:
            for i, spec in enumerate(specs):
                for attempt in range(1, _PORT_ATTEMPTS + 1):
                    part = parts[i]
                    if _wait_port(part, deadline):
                        break
                    self._discard(part)
                    if attempt < _PORT_ATTEMPTS and _log_says_port_taken(part.log_path):
                        parts[i] = self._spawn(spec, _free_port())
                        continue
                    if part.popen.returncode is not None and time.monotonic() < deadline:
                        raise ComputeError(
                            f"the {spec.role} exited during start-up (exit code"
                            f" {part.popen.returncode}); see its log at {part.log_path}",
                            retryable=False,
                        )
                    raise ComputeError(
                        f"the {spec.role} did not accept connections on"
                        f" {LOOPBACK_HOST}:{part.port} within"
                        f" {self.settings.start_timeout_s:g} s; see its log at {part.log_path}",
                        retryable=True,
                    )
        except BaseException:
            for part in parts:
                self._discard(part)
            raise
        return parts

    def _spawn(self, spec: _PartSpec, port: int) -> _Part:
        log_path = self.log_dir / spec.log_name
        log = log_path.open("ab")
        try:
            popen = subprocess.Popen(
                spec.argv(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=spec.env,
                cwd=self.state_dir,
                start_new_session=True,  # its own process group: stopped by pid, with children
            )
        except OSError as exc:
            log.close()
            raise ComputeError(f"could not start the {spec.role}: {exc.strerror}") from None
        return _Part(role=spec.role, popen=popen, log_path=log_path, port=port, log=log)

    def _discard(self, part: _Part) -> None:
        """Kill a part that never came up (its leader is unreaped, so the group is ours)."""
        if part.popen.poll() is None:
            _signal_group(part.pid, signal.SIGKILL)
        part.popen.wait()
        part.log.close()

    def _start_superlink(self, deadline: float) -> None:
        def argv(port: int) -> list[str]:
            return [
                str(self._bin / "flower-superlink"),
                "--insecure",  # loopback only: nothing leaves this machine
                "--isolation", "subprocess",
                "--host", LOOPBACK_HOST,
                "--port", str(port),
                "--database", str(self.database),
                "--disable-runtime-dependency-installation",
            ]  # fmt: skip

        spec = _PartSpec("SuperLink", "superlink.log", argv, self._env)
        (self._superlink,) = self._start_parts([spec], deadline)

    def _start_supernodes(self, deadline: float) -> None:
        n = len(self.sites)
        specs = []
        for index, site in enumerate(self.sites):
            node_dir = self.state_dir / "nodes" / site.site
            (node_dir / "flwr").mkdir(parents=True, exist_ok=True)
            config_file = node_dir / "node-config.toml"
            _write_toml(
                config_file,
                {
                    "partition-id": index,
                    "num-partitions": n,
                    "data-path": str(site.data_path),
                    "site": site.site,
                },
            )

            def argv(port: int, config_file: Path = config_file) -> list[str]:
                return [
                    str(self._bin / "flower-supernode"),
                    "--insecure",
                    "--superlink", self.superlink_address,
                    "--host", LOOPBACK_HOST,
                    "--port", str(port),
                    "--node-config", str(config_file),  # a .toml path: no quoting of values
                    "--isolation", "subprocess",
                ]  # fmt: skip

            env = {**self._env, "FLWR_HOME": str(node_dir / "flwr")}  # the hospital's own
            specs.append(
                _PartSpec(
                    f"SuperNode for site {site.site}", f"supernode-{site.site}.log", argv, env
                )
            )
        self._nodes = self._start_parts(specs, deadline)

    def _wait_nodes_online(self, deadline: float) -> None:
        want = len(self.sites)
        online = 0
        while True:
            for part in [*self._nodes, *([self._superlink] if self._superlink else [])]:
                if part.popen.poll() is not None:
                    raise ComputeError(
                        f"the {part.role} exited during start-up (exit code"
                        f" {part.popen.returncode}); see its log at {part.log_path}",
                        retryable=False,
                    )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            data = self._cli_json(
                ["supernode", "list", self.name, "--format", "json"], min(remaining, 30.0)
            )
            online = sum(1 for node in data.get("nodes", []) if node.get("status") == "online")
            if online >= want:
                return
            time.sleep(_POLL_S)
        raise ComputeError(
            f"only {online} of {want} SuperNodes registered with the SuperLink within"
            f" {self.settings.start_timeout_s:g} s; see the logs in {self.log_dir}",
            retryable=True,
        )

    def _check_loopback_only(self) -> None:
        wide = [item for item in self.listeners() if not item.loopback]
        if wide:
            where = ", ".join(f"pid {w.pid} on {w.host}:{w.port}" for w in wide)
            raise ComputeError(
                f"a federation process listens beyond loopback ({where}); refusing to run",
                retryable=False,
            )

    # --- the Flower config (connection) -----------------------------------------------------

    @contextmanager
    def _locked_config(self) -> Iterator[dict[str, Any]]:
        path = self.flower_config
        with (path.parent / "config.toml.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data: dict[str, Any] = {}
            if path.exists():
                with path.open("rb") as handle:
                    data = tomllib.load(handle)
            yield data
            _write_toml(path, data)

    def _write_connection(self) -> None:
        with self._locked_config() as data:
            links = data.setdefault("superlink", {})
            for name in _FLOWER_DEFAULT_CONNECTIONS:
                links.pop(name, None)
            links[self.name] = {"address": self.superlink_address, "insecure": True}
            links["default"] = self.name
        self._config_written = True

    def _remove_connection(self) -> None:
        with self._locked_config() as data:
            links = data.setdefault("superlink", {})
            links.pop(self.name, None)
            if links.get("default") == self.name:
                links.pop("default")
        self._config_written = False

    # --- the flwr CLI -------------------------------------------------------------------------

    def _cli(self, args: list[str], timeout_s: float) -> str:
        """Run one flwr CLI command; stdout back, stderr into logs/flwr-cli.log."""
        with (self.log_dir / "flwr-cli.log").open("ab") as err:
            err.write(f"$ flwr {' '.join(args)}\n".encode())
            err.flush()
            try:
                done = subprocess.run(
                    [str(self._bin / "flwr"), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    env=self._env,
                    cwd=self.state_dir,
                    timeout=timeout_s,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise ComputeError(
                    f"`flwr {args[0]}` did not answer within {timeout_s:g} s;"
                    f" see {self.log_dir / 'flwr-cli.log'}",
                    retryable=True,
                ) from None
        if done.returncode != 0:
            with (self.log_dir / "flwr-cli.log").open("ab") as err:
                err.write(done.stdout)
            raise ComputeError(
                f"`flwr {args[0]}` exited with code {done.returncode};"
                f" see {self.log_dir / 'flwr-cli.log'}",
                retryable=True,
            )
        return done.stdout.decode("utf-8", "replace")

    def _cli_json(self, args: list[str], timeout_s: float) -> dict[str, Any]:
        text = self._cli(args, timeout_s)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or not data.get("success", False):
            with (self.log_dir / "flwr-cli.log").open("ab") as err:
                err.write(text.encode())
            raise ComputeError(
                f"`flwr {args[0]}` gave no usable JSON; see {self.log_dir / 'flwr-cli.log'}",
                retryable=True,
            )
        return data

    def _run_records(self, timeout_s: float) -> dict[int, dict[str, Any]]:
        data = self._cli_json(["ls", self.name, "--format", "json"], timeout_s)
        return {int(r["run-id"]): r for r in data.get("runs", []) if "run-id" in r}

    # --- running an app -----------------------------------------------------------------------

    def run(
        self, app_dir: str | Path, run_config: Mapping[str, Any], timeout_s: float
    ) -> RunOutcome:
        """Run the Flower App in ``app_dir`` on this federation; see the module docstring.

        ``run_config`` overrides keys of the App's ``[tool.flwr.app.config]`` (each key must
        be declared there); values are str, int, float or bool. Raises ``SpecError`` for a
        bad argument and ``ComputeError`` when the run could not be started or observed; a
        run that started and then failed or timed out is a ``RunOutcome``, not an error.
        """
        if self._superlink is None:
            raise ComputeError("the federation is not started", retryable=False)
        app = Path(app_dir).resolve()
        if not (app / "pyproject.toml").is_file():
            raise SpecError("app_dir", f"{app} has no pyproject.toml", "pass a Flower App folder")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0:
            raise SpecError("timeout_s", "must be a positive number of seconds", "e.g. 600")
        _check_run_config(run_config)
        self._runs += 1
        seq = self._runs
        run_dir = self.state_dir / "runs" / str(seq)
        run_dir.mkdir(parents=True, exist_ok=True)
        config_file = run_dir / "run-config.toml"
        _write_toml(config_file, dict(run_config))
        log_path = self.log_dir / f"run-{seq}.log"
        started = time.monotonic()
        deadline = started + timeout_s
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [
                    str(self._bin / "flwr"),
                    "run",
                    str(app),
                    self.name,
                    "--stream",
                    "--run-config",
                    str(config_file),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                cwd=self.state_dir,
                start_new_session=True,
            )
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            streaming = proc.poll() is None
            run_id = self._find_run_id(log_path)
            if streaming:  # past the deadline: the stream is only a log; end it
                _signal_group(proc.pid, signal.SIGTERM)
                _wait_all([proc], self.settings.stop_grace_s)
                if proc.poll() is None:
                    _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
            if run_id is None:
                raise ComputeError(
                    f"`flwr run` did not start a run (exit code {proc.returncode}); see {log_path}",
                    retryable=streaming,
                )
            self._known_runs.add(run_id)
            record = self._await_finished(run_id, deadline)
            status_text = str(record.get("status", ""))
            if not status_text.startswith("finished"):
                self._stop_run(run_id)
                record = self._await_finished(run_id, time.monotonic() + self.settings.stop_grace_s)
                status = RunStatus.TIMED_OUT
            else:
                status = _STATUS.get(status_text, RunStatus.FAILED)
            log.write(b"\n--- flwr ls (safe zone) ---\n" + json.dumps(record).encode() + b"\n")
        return RunOutcome(
            run_id=run_id,
            status=status,
            flower_status=str(record.get("status", "")),
            wall_s=time.monotonic() - started,
            log_path=log_path,
        )

    def _find_run_id(self, log_path: Path) -> int | None:
        match = _STARTED_RUN.search(log_path.read_text("utf-8", "replace"))
        if match:
            return int(match.group(1))
        # the CLI's wording changed, or it was stopped before printing: ask the SuperLink
        new = set(self._run_records(self.settings.cli_timeout_s)) - self._known_runs
        return max(new) if len(new) == 1 else None

    def _await_finished(self, run_id: int, deadline: float) -> dict[str, Any]:
        """The run's record once finished, or its last record when ``deadline`` passes."""
        while True:
            data = self._cli_json(
                ["ls", self.name, "--run-id", str(run_id), "--format", "json"],
                self.settings.cli_timeout_s,
            )
            record: dict[str, Any] = (data.get("runs") or [{}])[0]
            if str(record.get("status", "")).startswith("finished"):
                return record
            if time.monotonic() >= deadline:
                return record
            time.sleep(_POLL_S)

    def _stop_run(self, run_id: int) -> None:
        try:
            self._cli(["stop", str(run_id), self.name], self.settings.cli_timeout_s)
        except ComputeError:
            pass  # it may have finished meanwhile; the next `flwr ls` says


_STATUS = {
    "finished:completed": RunStatus.COMPLETED,
    "finished:failed": RunStatus.FAILED,
    "finished:stopped": RunStatus.STOPPED,
}


# --- helpers ----------------------------------------------------------------------------------


def _check_run_config(run_config: Mapping[str, Any]) -> None:
    if not isinstance(run_config, Mapping):
        raise SpecError("run_config", "must be a mapping of keys to values", "pass a dict")
    for key, value in run_config.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise SpecError(
                "run_config",
                "has a key that is not letters, digits, '-' or '_'",
                "e.g. job-payload",
            )
        if not isinstance(value, str | int | float | bool):
            raise SpecError(
                f"run_config.{key}", "must be a str, int, float or bool", "pass a scalar"
            )


def _write_toml(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as TOML atomically."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(tomli_w.dumps(dict(data)), encoding="utf-8")
    os.replace(tmp, path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK_HOST, 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK_HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_port(part: _Part, deadline: float) -> bool:
    """True once the part accepts connections; False if it exited or the deadline passed."""
    while time.monotonic() < deadline:
        if part.popen.poll() is not None:
            return False
        if _port_open(part.port):
            return part.popen.poll() is None
        time.sleep(_POLL_S)
    return False


def _log_says_port_taken(path: Path) -> bool:
    try:
        text = path.read_text("utf-8", "replace")
    except OSError:
        return False
    return "address already in use" in text.lower()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_all(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state, ppid, pgrp, ... ([] if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rfind(")") + 2 :].split()


def _proc_state(pid: int) -> str:
    fields = _stat_fields(pid)
    return fields[0] if fields else ""


def _pgid(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[2]) if len(fields) > 2 else -1


def _tagged_pids(tag: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries ``PROCESS_TAG_VAR=tag``."""
    needle = f"{PROCESS_TAG_VAR}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and _proc_state(int(entry.name)) not in ("Z", "X", ""):
            found.append(int(entry.name))
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _decode_address(hex_addr: str) -> tuple[str, int]:
    host_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(host_hex)
    if len(raw) == 4:
        host = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # four 32-bit words, each in host (little-endian) order
        host = socket.inet_ntop(
            socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        )
    return host, int(port_hex, 16)


def _listening_inodes() -> dict[str, tuple[str, int]]:
    found: dict[str, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A":  # TCP_LISTEN
                found[cols[9]] = _decode_address(cols[1])
    return found


def _listeners(pids: Sequence[int]) -> list[Listener]:
    listening = _listening_inodes()
    out = []
    for pid in pids:
        for inode in _socket_inodes(pid):
            if inode in listening:
                host, port = listening[inode]
                out.append(Listener(pid=pid, host=host, port=port))
    return out
