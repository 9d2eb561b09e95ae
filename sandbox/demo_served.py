"""``sandbox demo --served``: the mission across a real trust boundary.

The zone is made, then handed to a service account that alone may read it; ``sandbox
serve`` runs as that account. The steward's and the researcher's steps are the installed CLI
as *other* OS accounts, holding only the server's URL and a token. Creating the accounts
needs root; without it every process runs as the caller, which shows the API but not the
OS boundary (the demo says so).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from sandbox.demo import DEMO_FEATURES, DEMO_LABEL, demo_federated_toml, demo_job_toml

ACCOUNTS = {"service": "sz-demo-svc", "steward": "sz-demo-sam", "researcher": "sz-demo-rita"}
#: the only variables a demo process gets from the caller's shell
_KEEP = ("PATH", "LANG", "LC_ALL")


def _cli_path() -> str:
    return str(Path(sys.executable).parent / "sandbox")


def let_accounts_run_the_install() -> None:
    """Other accounts must be able to run this interpreter, its venv's scripts and the product's
    code (an editable install reads the checkout): give every folder above them search
    permission (``o+x``: enter, not list) where it lacks it (pyenv in ``/root``, a checkout
    in a ``mktemp -d`` folder). Root only: the demo and the tests that make accounts."""
    real = Path(os.path.realpath(sys.executable))
    code = Path(__file__).resolve().parent.parent  # the folder that holds ``sandbox/``
    folders: set[Path] = set()
    for leaf in (real.parent, Path(sys.prefix) / "bin", code):
        folders.update([leaf, *leaf.parents])
    for folder in sorted(folders):
        mode = folder.stat().st_mode
        if not mode & 0o001:
            folder.chmod(mode | 0o001)


def _accounts(as_root: bool) -> None:
    if not as_root:
        return
    for name in ACCOUNTS.values():
        if subprocess.run(["id", "-u", name], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)
    # other accounts must be able to run this Python (pyenv under /root, say): enter, not list
    let_accounts_run_the_install()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Demo:
    def __init__(self, base: Path, url: str, as_root: bool, console: Console) -> None:
        self.base, self.url, self.as_root, self.console = base, url, as_root, console
        self.tokens: dict[str, str] = {}

    def run(self, who: str, *args: str, follow_json: bool = True) -> dict[str, Any]:
        """One CLI command as ``who``'s account; its --json object."""
        env = {k: v for k, v in os.environ.items() if k in _KEEP}
        home = self.base / f"home-{who}"
        env.update(HOME=str(home), SANDBOX_SERVER=self.url, SANDBOX_TOKEN=self.tokens[who])
        argv = [_cli_path(), *args, "--json"]
        shown = " ".join(a if " " not in a else repr(a) for a in args)
        self.console.print(f"[dim]$ sandbox {shown}   # as {who}[/dim]")
        if self.as_root and who in ACCOUNTS:
            argv = ["runuser", "-u", ACCOUNTS[who], "--", *argv]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=home)
        if proc.returncode != 0:
            raise SystemExit(f"demo step failed ({proc.returncode}): {proc.stderr or proc.stdout}")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        return dict(json.loads(lines[-1])) if lines else {}


def run_served_demo(patients: int = 20_000, as_json: bool = False) -> dict[str, Any]:
    from privacy.dp_intervals import describe_metrics
    from sandbox.service import Service

    console = Console(quiet=as_json)
    as_root = os.geteuid() == 0 and shutil.which("runuser") is not None
    if not as_root:
        console.print(
            "[yellow]not root: the service and every user run as you. This shows the API, "
            "not the OS boundary (run as root to make the accounts).[/yellow]"
        )
    _accounts(as_root)
    t0 = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="safe-zone-served-", dir="/tmp"))
    base.chmod(0o755)
    root = base / "zone"
    console.print(f"[dim]$ sandbox init --zone {root}   # as the operator[/dim]")
    svc, op_token = Service.init_zone(root)
    svc.close()
    for who in ("operator", "steward", "researcher"):
        home = base / f"home-{who}"
        home.mkdir(mode=0o700)
        if as_root and who in ACCOUNTS:
            shutil.chown(home, ACCOUNTS[who])
    if as_root:
        subprocess.run(["chown", "-R", f"{ACCOUNTS['service']}:", str(root)], check=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    console.print(
        f"[dim]$ sandbox serve --zone {root} --port {port}   # as {ACCOUNTS['service']}[/dim]"
    )
    serve = [_cli_path(), "serve", "--zone", str(root), "--port", str(port)]
    if as_root:
        serve = ["runuser", "-u", ACCOUNTS["service"], "--", *serve]
    env = {k: v for k, v in os.environ.items() if k in _KEEP}
    env["HOME"] = str(base)
    log = open(base / "serve.log", "ab")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(serve, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        _wait_up(url, server)
        d = _Demo(base, url, as_root, console)
        d.tokens["operator"] = op_token
        sam = d.run("operator", "user", "add", "sam", "--role", "steward")
        rita = d.run("operator", "user", "add", "rita", "--role", "researcher")
        d.tokens["steward"], d.tokens["researcher"] = sam["token"], rita["token"]
        ds = d.run("steward", "dataset", "ingest", "cohort", "--demo", "--patients", str(patients))
        console.print(f"  {ds['rows']} rows across {len(ds['sites'])} hospitals (pseudonymised)")
        d.run("researcher", "project", "create", "readmission", "--purpose", "30-day readmission")
        cols = ",".join([*DEMO_FEATURES, DEMO_LABEL, "hospital"])
        req = d.run(
            "researcher", "access", "request", "readmission", "--dataset", "cohort",
            "--columns", cols, "--mechanism", "dp-sgd,federated,synthetic,dp-query",
            "--epsilon", "3", "--delta", "1e-5",
        )  # fmt: skip
        expires = (datetime.now(UTC) + timedelta(days=90)).date().isoformat()
        d.run("steward", "access", "approve", req["id"], "--expires", expires)
        home = base / "home-researcher"
        (home / "job.toml").write_text(demo_job_toml())
        (home / "federated.toml").write_text(demo_federated_toml())
        if as_root:
            for f in ("job.toml", "federated.toml"):
                shutil.chown(home / f, ACCOUNTS["researcher"])
        job = d.run("researcher", "submit", "job.toml", "--follow")
        result = job.get("result") or {}
        shown = describe_metrics(result.get("metrics") or {})
        console.print(
            f"  job {job['id']}: {job['state']}; epsilon {result.get('epsilon', 0):.3f}; "
            f"DP AUROC {shown.get('auroc', 'n/a')}"
        )
        d.run("researcher", "jobs", "result", job["id"], "--out", "release")
        console.print("  model.safetensors, preprocessing.json, model_card.json in release/")
        fed = d.run("researcher", "submit", "federated.toml", "--follow")
        fed_result = fed.get("result") or {}
        fed_sites = fed_result.get("sites", {})
        for site, c in sorted(fed_sites.items()):
            console.print(f"  {site}: epsilon {c['epsilon']:.3f}")
        dummy = d.run("researcher", "synth", "dummy", "cohort", "--rows", "1000",
                      "--out", "dummy.parquet")  # fmt: skip
        console.print(
            f"  {dummy.get('rows')} dummy rows, epsilon charged: {dummy.get('charged_epsilon')}"
        )
        synth = d.run(
            "researcher", "synth", "fit", "cohort", "--project", "readmission",
            "--epsilon", "1", "--method", "mst", "--rows", "5000", "--label", DEMO_LABEL,
            "--columns", cols,
        )  # fmt: skip
        sr = synth.get("result") or {}
        console.print(
            f"  synthetic job {synth.get('id')}: {sr.get('rows')} rows, "
            f"epsilon {sr.get('epsilon', 0):.3f} charged"
        )
        d.run("steward", "synth", "report", synth["id"])
        d.run("steward", "synth", "release", synth["id"])
        report = d.run("researcher", "synth", "report", synth["id"]).get("report") or {}
        for key in ("quality", "tstr_auroc", "trtr_auroc", "new_row_share"):
            if report.get(key) is not None:
                console.print(f"  {key}: {report[key]:.3f}")
        quote = d.run("researcher", "quote", "job.toml", "--curve", "--on",
                      f"synthetic:{synth['id']}", "--out", "quote")  # fmt: skip
        console.print(
            f"  the job would spend epsilon {quote['epsilon']:.3f} (delta {quote['delta']:g})"
        )
        for pt in (quote.get("curve") or {}).get("points", []):
            auroc = pt.get("auroc")
            console.print(
                f"  epsilon {pt['epsilon']:>4g}: AUROC on synthetic {auroc:.3f}"
                if auroc is not None
                else f"  epsilon {pt['epsilon']:>4g}: -"
            )
        q = ["query", "run", "mean", "age", "--by", "hospital", "--project", "readmission",
             "--dataset", "cohort", "--epsilon", "0.1"]  # fmt: skip
        quoted = d.run("researcher", *q, "--dry")
        asked = d.run("researcher", *q)
        console.print(
            f"  DP query (mean age by hospital): quoted epsilon {quoted['epsilon']:g}, "
            f"charged {asked['epsilon']:g}, {len(asked['figures'])} groups (the declared hospitals and (other))"
        )
        budget = d.run("researcher", "budget", "readmission")
        audit = d.run("operator", "audit", "verify")
        (b,) = [x for x in budget["budgets"] if not x["key"].get("site")]
        summary = {
            "served": url,
            "os_boundary": as_root,
            "accounts": ACCOUNTS if as_root else None,
            "budget": b,
            "job": {"id": job["id"], "state": job["state"], "epsilon": result.get("epsilon")},
            "dp_metrics": result.get("metrics"),
            "federated": {s: c["epsilon"] for s, c in fed_sites.items()},
            "synthetic": {
                "dummy_rows": dummy.get("rows"),
                "job": synth.get("id"),
                "state": synth.get("state"),
                "epsilon": sr.get("epsilon"),
                "report": report,
                "quote_epsilon": quote.get("epsilon"),
                "curve": (quote.get("curve") or {}).get("points"),
            },
            "query": {
                "id": asked.get("id"),
                "quoted_epsilon": quoted.get("epsilon"),
                "charged_epsilon": asked.get("epsilon"),
            },
            "audit": {"verified": audit.get("ok"), "events": audit.get("checked")},
            "seconds": round(time.perf_counter() - t0, 1),
        }
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    if as_json:
        print(json.dumps(summary, default=str))
        return summary
    console.rule("summary (served)")
    console.print(
        f"epsilon spent {b['spent_epsilon']:.3f} of {b['granted_epsilon']:g}, left "
        f"{b['remaining_epsilon']:.3f} (delta {b['granted_delta']:g}, per person)"
    )
    console.print(
        f"DP AUROC {shown.get('auroc', 'n/a')}, DP accuracy {shown.get('accuracy', 'n/a')}"
    )
    console.print(
        "federated per-site epsilon: "
        + ", ".join(f"{s} {e:.3f}" for s, e in sorted(summary["federated"].items()))
    )
    console.print(
        "spent by mechanism: "
        + ", ".join(f"{m} {e:.3f}" for m, e in (b.get("spent_by") or {}).items())
        + f" (the DP query: epsilon {summary['query']['charged_epsilon']:g})"
    )
    console.print(
        f"audit chain verified: {summary['audit']['verified']} ({summary['audit']['events']} events)"
    )
    who = ", ".join(f"{k} as {v}" for k, v in ACCOUNTS.items()) if as_root else "all as you"
    console.print(f"served at {url}: {who}; {summary['seconds']} s")
    return summary


def _wait_up(url: str, server: subprocess.Popen[bytes]) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"sandbox serve exited with {server.returncode} (see serve.log)")
        try:
            if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit("sandbox serve did not come up within 120 s")
