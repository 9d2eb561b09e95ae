"""Flower's Deployment Engine end to end on loopback (tests/federated_harness/deployment.py).

One SuperLink and three SuperNodes run as separate processes, each SuperNode with its own
governed Parquet (one hospital's patients, ingested on their own). A real federated DP job
(2 rounds) runs through ``flwr run``; the test checks the server's files, that every
listener of every process the federation started was on loopback, and that nothing is
left running afterwards. The process and socket checks read /proc here, independently of
the module's own helpers.

Cost: the SuperLink and SuperNodes start in ~5-8 s; each SuperNode starts a fresh ClientApp
process per message (torch + opacus imports, ~4 s each) and polls the SuperLink every 3 s
when idle; the job has four message phases (setup query, 2 train rounds, evaluation), so it
took 75-140 s here on 2 cores shared with other work. The federation is shared by the tests
of this module (module-scoped fixture) and every step is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pytest
from federated_harness.deployment import (
    FLOWER_APP_DIR,
    LoopbackFederation,
    LoopbackSettings,
    RunStatus,
    SiteNode,
)

from connectors.cohort import cohort_contract, generate_cohort
from connectors.ingest import ingest_table
from foundation.errors import ComputeError, SpecError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

SITES = ("hospital-a", "hospital-b", "hospital-c")
# 1500 patients: hospital-c (the smallest of the three, ~14%) still has ~200 persons
PATIENTS = 1500
SECRET = b"deployment-test-secret-0123456789"
TINY_APP = Path(__file__).resolve().parents[1] / "fixtures" / "flwr_tiny_app"
FEATURES = ["age", "sex", "diabetes", "hba1c", "creatinine", "prior_admissions", "length_of_stay"]
LABEL = "readmitted_30d"
# generous: on a loaded 2-core machine the job took up to 140 s
RUN_TIMEOUT_S = 300.0


# --- independent /proc readers (not the module's helpers) -----------------------------------


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        kids.setdefault(int(fields[1]), []).append(int(entry.name))
    return kids


def _descendants(roots: list[int], kids: dict[int, list[int]]) -> set[int]:
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(kids.get(pid, []))
    return found


# the federation's processes are the Flower commands this test process started, and their
# descendants (other tests' engines, e.g. the session's Ray, are children of pytest too)
_FLOWER_COMMANDS = ("bin/flower-superlink", "bin/flower-supernode", "bin/flwr ")


def _federation_tree() -> set[int]:
    kids = _children_map()
    roots = [
        pid
        for pid in kids.get(os.getpid(), [])
        if any(cmd in _cmdline(pid) for cmd in _FLOWER_COMMANDS)
    ]
    return _descendants(roots, kids)


def _alive(pid: int) -> bool:
    """Running (a zombie whose parent never reaps it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _listening() -> dict[str, tuple[str, int]]:
    """inode -> (address, port) of every listening TCP socket (IPv4 and IPv6)."""
    out: dict[str, tuple[str, int]] = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A":
                continue
            host_hex, port_hex = cols[1].split(":")
            raw = bytes.fromhex(host_hex)
            # the kernel prints each 32-bit word in host (little-endian) byte order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            out[cols[9]] = (socket.inet_ntop(family, raw), int(port_hex, 16))
    return out


def _listeners_of(pids: set[int]) -> set[tuple[int, str, int]]:
    table = _listening()
    found = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            inode = target[8:-1] if target.startswith("socket:[") else ""
            if inode in table:
                found.add((pid, *table[inode]))
    return found


class _Watcher:
    """Samples, every 0.3 s, the federation's processes and their listening sockets."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.listeners: set[tuple[int, str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        pids = _federation_tree()
        self.pids |= pids
        self.listeners |= _listeners_of(pids)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.3)

    def __enter__(self) -> _Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()


# --- data and the federation ----------------------------------------------------------------


@pytest.fixture(scope="module")
def site_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One governed dataset per hospital, each ingested on its own (as each site would)."""
    root = tmp_path_factory.mktemp("sites")
    cohort = generate_cohort(PATIENTS, seed=11)
    contract = cohort_contract()
    files = {}
    for site in SITES:
        table = cohort.filter(pc.equal(cohort.column(contract.site), site))
        files[site] = ingest_table(table, contract, root / site, SECRET).path
    return files


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, site_files: dict[str, Path]
) -> Iterator[tuple[LoopbackFederation, _Watcher]]:
    root = tmp_path_factory.mktemp("fed")
    nodes = [SiteNode(site, site_files[site]) for site in SITES]
    fed = LoopbackFederation(
        root / "state", nodes, zone_dir=root / "zone", settings=LoopbackSettings(start_timeout_s=90)
    )
    with _Watcher() as watcher:
        with fed:
            yield fed, watcher
        fed.stop()  # idempotent


def _payload(tmp: Path, site_files: dict[str, Path], rounds: int) -> Path:
    from training.federated.config import FederatedConfig
    from training.federated.payload import FederatedPayload
    from training.models import ModelConfig, ModelKind

    config = FederatedConfig(
        rounds=rounds,
        sites=SITES,
        label=LABEL,
        features=tuple(FEATURES),
        model=ModelConfig(kind=ModelKind.MLP, hidden=(8,)),
        epsilon=3.0,
        delta=1e-5,
        max_grad_norm=1.0,
        batch_size=64,
        lr=0.5,
        min_sites=3,
        min_site_rows=50,
        round_timeout_s=120.0,
        seed=3,
    )
    payload = FederatedPayload(
        job_id="job-deploy-test",
        dataset="cohort",
        dataset_path=site_files[SITES[0]].parent,
        contract=cohort_contract(),
        config=config,
        out_dir=tmp / "out",
        noise_secret_hex=os.urandom(32).hex(),
        site_data_paths=dict(site_files),
    )
    return payload.write(tmp / "payload.json")


# --- the tests ------------------------------------------------------------------------------


def test_federation_is_up_on_loopback_only(
    federation: tuple[LoopbackFederation, _Watcher],
) -> None:
    fed, watcher = federation
    watcher.sample()
    host, _, port = fed.superlink_address.rpartition(":")
    assert host == "127.0.0.1"
    listeners = {(h, p) for _, h, p in watcher.listeners}
    assert ("127.0.0.1", int(port)) in listeners
    # the SuperLink and one Runtime API port per SuperNode, at least
    assert len(listeners) >= 1 + len(SITES)
    assert all(h == "127.0.0.1" for h, _ in listeners), listeners
    # the module's own view (used to refuse a non-loopback listener at start) agrees
    own = {(item.host, item.port) for item in fed.listeners()}
    assert ("127.0.0.1", int(port)) in own and own <= listeners
    # the connection is in $FLWR_HOME/config.toml, and Flower's network defaults are not
    text = fed.flower_config.read_text()
    assert fed.name in text and fed.superlink_address in text
    assert "supergrid" not in text
    # every log is a file in the state dir
    names = sorted(p.name for p in fed.log_dir.iterdir())
    assert "superlink.log" in names
    assert all(f"supernode-{s}.log" in names for s in SITES)


def test_federated_job_end_to_end(
    federation: tuple[LoopbackFederation, _Watcher],
    site_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    from safetensors.numpy import load_file

    fed, watcher = federation
    payload = _payload(tmp_path, site_files, rounds=2)
    started = time.monotonic()
    outcome = fed.run(FLOWER_APP_DIR, {"job-payload": str(payload)}, timeout_s=RUN_TIMEOUT_S)
    took = time.monotonic() - started
    assert outcome.status is RunStatus.COMPLETED, outcome.log_path.read_text()[-3000:]
    outcome.raise_for_status()
    assert outcome.flower_status == "finished:completed"
    print(f"federated job, 2 rounds x {len(SITES)} sites on the Deployment Engine: {took:.1f} s")

    out = tmp_path / "out"
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 2
    for record in rounds:
        epsilons = _site_epsilons(record)
        assert set(epsilons) == set(SITES), record
        assert all(0 < eps <= 3.0 + 1e-9 for eps in epsilons.values()), record
    first, last = (_site_epsilons(r) for r in (rounds[0], rounds[-1]))
    assert all(last[s] > first[s] for s in SITES)  # cumulative, not per round
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_done"] == 2
    assert set(summary["sites"]) == set(SITES)
    for site in SITES:  # the summary's charge is the last round's cumulative epsilon
        assert summary["sites"][site]["epsilon"] == pytest.approx(last[site])
    weights = load_file(str(out / "global.safetensors"))
    assert weights and all(v.size > 0 for v in weights.values())

    # every listener any federation process ever opened was on loopback
    watcher.sample()
    assert watcher.listeners
    assert all(host == "127.0.0.1" for _, host, _ in watcher.listeners), watcher.listeners


def _site_epsilons(record: dict) -> dict[str, float]:
    """Each site's cumulative epsilon in one rounds.jsonl record (server.py's format)."""
    return {name: float(v["epsilon"]) for name, v in record["sites"].items()}


def test_failed_run_is_reported_failed(
    federation: tuple[LoopbackFederation, _Watcher], tmp_path: Path
) -> None:
    """`flwr run` exits 0 when the run fails; the outcome comes from the SuperLink's record."""
    fed, _ = federation
    payload = tmp_path / "payload.json"
    failing = {"out_dir": str(tmp_path / "out"), "rounds": 1, "min_sites": 3, "fail": "server"}
    payload.write_text(json.dumps(failing))
    outcome = fed.run(TINY_APP, {"job-payload": str(payload)}, timeout_s=RUN_TIMEOUT_S)
    assert outcome.status is RunStatus.FAILED
    assert outcome.flower_status == "finished:failed"
    with pytest.raises(ComputeError, match=str(outcome.run_id)) as err:
        outcome.raise_for_status()
    assert str(outcome.log_path) in str(err.value)
    assert outcome.log_path.is_file()


def test_stop_leaves_nothing_running(federation: tuple[LoopbackFederation, _Watcher]) -> None:
    fed, watcher = federation
    watcher.sample()
    started = set(watcher.pids)
    flower = {p for p in started if "flower-" in _cmdline(p) or "flwr" in _cmdline(p)}
    assert len(flower) >= 1 + len(SITES)
    name, config = fed.name, fed.flower_config
    fed.stop()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in started):
        time.sleep(0.2)
    assert not [p for p in started if _alive(p)], [_cmdline(p) for p in started if _alive(p)]
    assert fed.pids() == ()
    assert not [p for p in _federation_tree() if _alive(p)]
    assert name not in config.read_text()


# --- argument checks (no processes) ---------------------------------------------------------


def test_arguments_are_checked(tmp_path: Path) -> None:
    data = tmp_path / "site.parquet"
    data.write_bytes(b"")
    with pytest.raises(SpecError, match="site"):
        SiteNode("bad name/..", data)
    with pytest.raises(SpecError, match="data_path"):
        SiteNode("hospital-a", Path("relative.parquet"))
    with pytest.raises(SpecError, match="data_path"):
        SiteNode("hospital-a", tmp_path / "missing.parquet")
    with pytest.raises(SpecError, match="sites"):
        LoopbackFederation(tmp_path, [SiteNode("a", data), SiteNode("a", data)])
    with pytest.raises(SpecError, match="start_timeout_s"):
        LoopbackSettings(start_timeout_s=0)
    fed = LoopbackFederation(tmp_path / "state", [SiteNode("a", data)], zone_dir=tmp_path)
    with pytest.raises(ComputeError, match="not started"):
        fed.run(TINY_APP, {"job-payload": "x"}, timeout_s=10)


def test_refuses_a_used_state_dir(tmp_path: Path) -> None:
    data = tmp_path / "site.parquet"
    data.write_bytes(b"")
    state = tmp_path / "state"
    state.mkdir()
    (state / "superlink.db").write_bytes(b"")
    fed = LoopbackFederation(state, [SiteNode("a", data)], zone_dir=tmp_path)
    with pytest.raises(SpecError, match="state_dir"):
        fed.start()
    assert fed.pids() == ()


def test_a_part_that_does_not_come_up_is_named_and_stopped(tmp_path: Path) -> None:
    data = tmp_path / "site.parquet"
    data.write_bytes(b"")
    fed = LoopbackFederation(
        tmp_path / "state",
        [SiteNode("a", data)],
        zone_dir=tmp_path,
        settings=LoopbackSettings(start_timeout_s=0.05, stop_grace_s=5),
    )
    with pytest.raises(ComputeError, match="SuperLink") as err:
        fed.start()
    assert str(fed.log_dir / "superlink.log") in str(err.value)
    assert fed.pids() == ()
    assert not [p for p in _federation_tree() if _alive(p)]
