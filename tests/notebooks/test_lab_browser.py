"""JupyterLab in headless Chromium: the example notebook runs in the lab and shows its figures.

A served demo zone on loopback (its own ``sandbox serve``, a project with a ``dp-query`` grant
and an analyst as member), then ``sandbox notebook`` as a user starts it (a copy of
``notebooks/01_explore_cohort.ipynb`` in its folder, the analyst's URL, token and project in
its environment, Jupyter's config, data and runtime folders private to the test), then Debian's
Chromium, driven by Playwright, opens the notebook, checks its kernel is "Safe zone (Python)",
runs all cells from the Run menu and finds the DP age histogram drawn as an image under its
cell. A screenshot of the lab is left in the test's tmp folder (its path is printed).

Skips when Chromium (``/usr/bin/chromium``) or Playwright is missing; Playwright's own browsers
are never downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cli_runner import SANDBOX
from factories import FEATURES, LABEL, make_world
from served import free_port, served_zone

from sandbox.kernel import DISPLAY_NAME

CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "01_explore_cohort.ipynb"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
AS_ROOT = os.geteuid() == 0
#: seconds for the whole notebook to run once "Run All Cells" is clicked
RUN_ALL_S = 180

try:
    from playwright.sync_api import sync_playwright

    HAVE_PLAYWRIGHT = True
except ImportError:  # pragma: no cover - the dev install has it
    HAVE_PLAYWRIGHT = False

pytestmark = [
    # 45 to 80 s on two cores (a served zone with Ray, a lab, a browser): `make test-slow`,
    # which CI runs too (the nbclient run of the same notebook is in the default run)
    pytest.mark.slow,
    pytest.mark.ray,  # `sandbox serve` starts the service's own Ray
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}"),
    pytest.mark.skipif(not HAVE_PLAYWRIGHT, reason="the playwright package is not installed"),
    pytest.mark.skipif(not NOTEBOOK.exists(), reason=f"no example notebook at {NOTEBOOK}"),
]


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A served demo zone; the analyst's URL, token and project."""
    root = tmp_path_factory.mktemp("lab-zone") / "zone"
    w = make_world(root, patients=600, grant_epsilon=None)
    req = w.svc.request_access(
        w.researcher,
        "readmission",
        "cohort",
        [*FEATURES, LABEL, "hospital"],
        ["dp-query"],
        3.0,
        1e-5,
    )
    w.svc.approve(w.steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=3))
    _, ana_token = w.svc.add_user(w.operator, "ana", "analyst")
    w.svc.add_project_member(w.researcher, "readmission", "ana")
    w.svc.close()
    with served_zone(root) as server:
        yield {
            "SANDBOX_SERVER": server.url,
            "SANDBOX_TOKEN": ana_token,
            "SANDBOX_PROJECT": "readmission",
        }


def _lab_env(home: Path, zone: dict[str, str]) -> dict[str, str]:
    """The user's shell, trimmed: a HOME of its own and Jupyter's folders under it."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
    folders = {
        "HOME": home,
        "JUPYTER_CONFIG_DIR": home / "jupyter-config",
        "JUPYTER_DATA_DIR": home / "jupyter-data",
        "JUPYTER_RUNTIME_DIR": home / "jupyter-runtime",
        "JUPYTERLAB_SETTINGS_DIR": home / "lab-settings",
        "JUPYTERLAB_WORKSPACES_DIR": home / "lab-workspaces",
        "IPYTHONDIR": home / "ipython",
        "MPLCONFIGDIR": home / "matplotlib",
    }
    for path in folders.values():
        path.mkdir(parents=True, exist_ok=True)
    env.update({k: str(v) for k, v in folders.items()})
    # no news feed (a request to a website) and no toast asking for it
    notification = folders["JUPYTERLAB_SETTINGS_DIR"] / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    env.update(zone)
    return env


def _wait_for_lab(base: str, lab: subprocess.Popen[bytes], log: Path) -> str:
    """The lab's token, from the URL ``sandbox notebook`` prints, once the lab answers."""
    deadline = time.monotonic() + 90
    token = None
    while time.monotonic() < deadline:
        if lab.poll() is not None:
            pytest.fail(f"sandbox notebook exited {lab.returncode}: {log.read_text()[-2000:]}")
        if token is None:
            found = re.search(r"/lab\?token=(\S+)", log.read_text())
            token = found.group(1) if found else None
        if token is not None:
            try:
                auth = {"Authorization": f"token {token}"}
                if httpx.get(f"{base}/api/status", headers=auth, timeout=2).status_code == 200:
                    return token
            except httpx.HTTPError:
                pass
        time.sleep(0.3)
    pytest.fail(f"the lab did not come up: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """The process group this test started (the lab and its kernels), SIGTERM then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:  # kernels left behind by a lab that died first
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(timeout=30)


@pytest.fixture
def lab(tmp_path: Path, zone: dict[str, str]) -> Iterator[dict[str, Any]]:
    """``sandbox notebook`` on a free loopback port over a copy of the example notebook."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    shutil.copy(NOTEBOOK, folder / NOTEBOOK.name)
    port = free_port()
    argv = [str(SANDBOX), "notebook", "--no-browser", "--port", str(port)]
    argv += ["--notebook-dir", str(folder), *(["--allow-root"] if AS_ROOT else [])]
    log = tmp_path / "lab.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            argv,
            env=_lab_env(tmp_path / "home", zone),
            stdout=sink,
            stderr=sink,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        yield {"base": base, "token": _wait_for_lab(base, proc, log), "log": log}
    finally:
        _stop(proc)


# what the page shows, read in the browser (no cell's output text comes back to the test)
PROMPTS_JS = """() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]
    .map(p => p.textContent.trim())"""
ERRORS_JS = """() => [...document.querySelectorAll(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"], '
        + '.jp-RenderedText[data-mime-type*="error"]')]
    .map(o => o.textContent)
    .filter(t => /Traceback|Error:|Exception/.test(t))
    .map(t => t.split('\\n').slice(-6).join('\\n'))"""
HISTOGRAM_JS = """() => {
    const cells = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')].filter(
        c => /zone\\.query\\(\\s*"histogram"/.test(c.querySelector('.jp-InputArea')?.textContent));
    return cells.map(c => [...c.querySelectorAll(
            '.jp-OutputArea-output img, .jp-RenderedImage img')]
        .map(i => [i.complete, i.naturalWidth, i.naturalHeight]));
}"""
IMAGES_JS = """() => [...document.querySelectorAll(
        '.jp-OutputArea-output img, .jp-RenderedImage img')]
    .filter(i => i.complete && i.naturalWidth >= 200 && i.naturalHeight >= 150).length"""


def _browser_env(home: Path) -> dict[str, str | float | bool]:
    env: dict[str, str | float | bool] = {
        k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")
    }
    for name, sub in (("HOME", ""), ("XDG_CONFIG_HOME", ".config"), ("XDG_CACHE_HOME", ".cache")):
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(home / sub)
    return env


def _done(prompts: list[str]) -> bool:
    return bool(prompts) and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts)


def test_the_lab_runs_the_example_notebook_and_draws_the_dp_histogram(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    shot = tmp_path / "lab.png"
    url = f"{lab['base']}/lab/tree/{NOTEBOOK.name}?token={lab['token']}"
    with sync_playwright() as pw:
        # a fresh profile, and a HOME of its own (Chromium keeps its crash reports and dconf
        # cache under HOME whatever the profile): nothing of the user's is read or written
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            env=_browser_env(tmp_path / "chromium-home"),
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(60_000)
            try:
                page.goto(url, wait_until="domcontentloaded")
                # the notebook is open with the safe-zone kernel, started and idle
                page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=90_000)
                kernel = page.locator(".jp-NotebookPanel-toolbar .jp-Toolbar-kernelName")
                kernel.first.wait_for(timeout=90_000)
                page.wait_for_function(
                    """name => [...document.querySelectorAll('.jp-Toolbar-kernelName')]
                        .some(k => k.textContent.trim() === name)""",
                    arg=DISPLAY_NAME,
                    timeout=90_000,
                )
                page.wait_for_selector(
                    '.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=90_000
                )
                assert kernel.first.inner_text().strip() == DISPLAY_NAME
                cells = len(page.evaluate(PROMPTS_JS))
                assert cells >= 10, f"{cells} code cells shown"

                # Run → Run All Cells, as a user would
                page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
                page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
                page.wait_for_function(
                    f"""() => {{
                        const p = ({PROMPTS_JS})();
                        const idle = document.querySelector(
                            '.jp-Notebook-ExecutionIndicator[data-status="idle"]') !== null;
                        const all = p.length === {cells} && p.every(t => /^\\[\\d+\\]:$/.test(t));
                        // a failed cell stops the run: the rest keep their empty prompts
                        const failed = !p.includes('[*]:') && ({ERRORS_JS})().length > 0;
                        return idle && (all || failed);
                    }}""",
                    timeout=RUN_ALL_S * 1000,
                    polling=500,
                )
                errors = page.evaluate(ERRORS_JS)
                if not errors:
                    # a figure is decoded once it is laid out: give the images a moment
                    page.wait_for_function(f"() => ({IMAGES_JS})() >= 2", timeout=30_000)
                prompts = page.evaluate(PROMPTS_JS)
                histograms = page.evaluate(HISTOGRAM_JS)
                cell = page.locator(".jp-Notebook .jp-CodeCell").filter(
                    has_text=re.compile(r'zone\.query\(\s*"histogram"')
                )
                cell.first.scroll_into_view_if_needed()
                page.screenshot(path=str(shot), full_page=True)
            except Exception:
                try:
                    page.screenshot(path=str(shot), full_page=True)
                    print(f"the lab when it failed: {shot}")
                except Exception:  # the page is gone: the first error says more
                    pass
                raise
        finally:
            context.close()

    print(f"screenshot of the lab: {shot}")
    assert _done(prompts), prompts
    assert errors == [], errors
    # one histogram cell, drawing one figure of a real size
    assert len(histograms) == 1, histograms
    (images,) = histograms
    assert len(images) == 1, images
    (complete, width, height) = images[0]
    assert complete and width >= 200 and height >= 150, images
    assert shot.stat().st_size > 20_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
