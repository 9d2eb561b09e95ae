"""``zone`` in the notebook (``sandbox.notebook_zone.Zone``) and the kernel's pieces, in-process.

The served API is a stand-in here (``FakeRemote``: canned records of the shapes the service
returns), so these tests are fast; ``test_example_notebooks`` runs the real thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import pytest

from foundation.errors import SpecError
from sandbox import kernel
from sandbox.notebook_zone import Zone, answer_frame, site_frame

matplotlib.use("Agg")

QUOTE = {
    "id": None,
    "project": "readmission",
    "dataset": "cohort",
    "query": {"dataset": "cohort", "kind": "mean", "epsilon": 0.4, "column": "age", "by": "sex"},
    "epsilon": 0.4,
    "delta": 0.0,
    "charged": False,
    "reused": False,
    "dry": True,
    "figures": [],
    "notes": [],
    "parts": [{"measures": "sum", "epsilon": 0.2, "noise_scale": 5.0, "half_width_95": 15.0}],
    "remaining_epsilon": 5.0,
    "fits": True,
}
FIGURES = [
    {"group": g, "statistic": s, "value": v, "noise_scale": 1.0, "ci_low": v - 2, "ci_high": v + 2}
    for g in ("F", "M")
    for s, v in (("count", 500.0), ("mean", 61.0))
]
ANSWER = {
    **QUOTE,
    "id": "qry-1",
    "charged": True,
    "dry": False,
    "parts": [],
    "figures": [{**f, "rank_error": None} for f in FIGURES],
    "remaining_epsilon": 4.6,
}


class FakeRemote:
    server = "http://127.0.0.1:1"

    def __init__(self, reused: bool = False) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.reused = reused

    def authenticate(self, token: Any) -> dict[str, str]:
        return {"name": "ana", "role": "analyst"}

    def run_query(self, actor: Any, project: str, query: dict[str, Any], dry: bool) -> Any:
        self.calls.append(("run_query", (project, query, dry)))
        if self.reused:
            return {**ANSWER, "charged": False, "reused": True, "remaining_epsilon": 4.6}
        return QUOTE if dry else ANSWER

    def budget(self, actor: Any, project: str) -> list[dict[str, Any]]:
        key = {"project": project, "dataset": "cohort", "site": ""}
        return [{"key": key, "granted_epsilon": 5.0, "spent_epsilon": 0.4}]

    def list_datasets(self, actor: Any) -> list[dict[str, Any]]:
        return [{"name": "cohort", "site_names": ["hospital-a", "hospital-b"]}]

    def show_dataset(self, actor: Any, name: str) -> dict[str, Any]:
        cols = {"age": {"type": "float64", "role": "feature", "min": 18.0, "max": 105.0}}
        return {"name": name, "contract": {"columns": cols}}

    def submit(self, actor: Any, spec: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("submit", (spec,)))
        return {"id": "job-1", "state": "queued"}

    def job_status(self, actor: Any, job: str) -> dict[str, Any]:
        return {"id": job, "state": "succeeded", "progress": {"epoch": 2, "epochs": 2}}


@pytest.fixture
def zone() -> Zone:
    return Zone(project="readmission", remote=FakeRemote())


def test_without_a_server_or_a_token_the_error_names_the_variable_and_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("SANDBOX_SERVER", "SANDBOX_TOKEN", "SANDBOX_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SpecError, match="SANDBOX_SERVER: is not set.*export SANDBOX_SERVER"):
        Zone()
    monkeypatch.setenv("SANDBOX_SERVER", "http://127.0.0.1:9")
    with pytest.raises(SpecError, match="SANDBOX_TOKEN: is not set"):
        Zone()
    with pytest.raises(SpecError, match="plain http to another machine"):
        Zone(server="http://10.1.2.3:8750", token="t")
    z = Zone(token="t")  # no network until a call
    with pytest.raises(SpecError, match="project: no project given.*SANDBOX_PROJECT"):
        z.budget()


def test_a_query_prints_its_quote_then_its_charge_and_returns_the_figures(
    zone: Zone, capsys: pytest.CaptureFixture[str]
) -> None:
    df = zone.query("mean", "age", by="sex", epsilon=0.4)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("quote: mean costs epsilon 0.4 of readmission's budget on cohort")
    assert out[1] == "charged epsilon 0.4; remaining 4.6"
    assert list(df.columns)[:3] == ["group", "statistic", "value"] and len(df) == 4
    assert df.attrs["charged"] is True and df.attrs["epsilon"] == 0.4 and df.attrs["id"] == "qry-1"
    calls = zone._remote.calls
    assert [c[1][2] for c in calls] == [True, False]  # a quote, then the charged answer
    assert calls[0][1][1] == {
        "dataset": "cohort",
        "kind": "mean",
        "epsilon": 0.4,
        "column": "age",
        "by": "sex",
    }


def test_dry_only_quotes_and_a_repeat_is_answered_free(capsys: pytest.CaptureFixture) -> None:
    z = Zone(project="readmission", dataset="cohort", remote=FakeRemote())
    quote = z.query("mean", "age", by="sex", epsilon=0.4, dry=True)
    assert [c[1][2] for c in z._remote.calls] == [True]
    assert quote.attrs["dry"] is True and quote.attrs["fits"] is True
    assert quote["epsilon"].tolist() == [0.2]
    capsys.readouterr()
    again = Zone(project="readmission", dataset="cohort", remote=FakeRemote(reused=True))
    df = again.query("mean", "age", by="sex", epsilon=0.4)
    assert "nothing charged" in capsys.readouterr().out
    assert len(again._remote.calls) == 1 and df.attrs["reused"] is True and len(df) == 4


def test_a_wrong_query_is_refused_before_anything_is_sent(zone: Zone) -> None:
    with pytest.raises(SpecError, match="kind: 'median' is not a DP query kind"):
        zone.query("median", "age", epsilon=0.1)
    with pytest.raises(SpecError, match="epsilon: must be a positive number"):
        zone.query("count", epsilon=0)
    assert zone._remote.calls == []


def test_plot_draws_the_main_statistic_with_its_intervals_titled_with_epsilon() -> None:
    df = answer_frame(ANSWER)
    ax = Zone(remote=FakeRemote()).plot(df)
    bars = ax.patches
    assert len(bars) == 2  # the two means: the released counts are on another scale
    assert [t.get_text() for t in ax.get_xticklabels()] == ["F", "M"]
    assert "ε = 0.4" in ax.get_title() and "mean of age by sex" in ax.get_title()
    assert ax.containers and len(ax.lines) + len(ax.collections) > 0  # the error bars
    with pytest.raises(SpecError, match="answer: has no figures"):
        Zone(remote=FakeRemote()).plot(answer_frame(QUOTE))


def test_frames_of_the_budget_the_contract_and_the_datasets(zone: Zone) -> None:
    b = zone.budget()
    assert b.loc[0, "dataset"] == "cohort" and b.loc[0, "site"] is None
    c = zone.contract("cohort")
    assert c.loc[0, ["name", "min", "max"]].tolist() == ["age", 18.0, 105.0]
    d = zone.datasets()
    assert d.loc[0, "sites"] == 2 and d.loc[0, "rows"] == "private"


def test_submit_sends_the_toml_as_a_dict_with_the_default_project(
    zone: Zone, tmp_path: Path
) -> None:
    spec = tmp_path / "job.toml"
    spec.write_text('dataset = "cohort"\n[privacy]\nepsilon = 1.0\n', encoding="utf-8")
    assert zone.submit(spec) == "job-1"
    (sent,) = [c[1][0] for c in zone._remote.calls if c[0] == "submit"]
    assert sent == {"project": "readmission", "dataset": "cohort", "privacy": {"epsilon": 1.0}}
    spec.write_text("dataset = ", encoding="utf-8")
    with pytest.raises(SpecError, match="job.toml: .* is not valid TOML"):
        zone.submit(spec)
    assert zone.wait("job-1", quiet=True)["state"] == "succeeded"


def test_site_frame_takes_each_sites_charge_from_the_record_and_its_metrics_from_the_card() -> None:
    result = {"kind": "federated", "delta": 1e-6, "sites": {"hospital-a": {"epsilon": 0.7}}}
    card = {
        "privacy": {"per_site": {"hospital-a": {"epsilon": 9.9, "rounds": 2, "status": "trained"}}},
        "per_site_dp_metrics": {"hospital-a": {"auroc": 0.7, "ci95": {"auroc": [0.6, 0.8]}}},
    }
    df = site_frame(result, card)
    row = df.iloc[0]
    assert row["site"] == "hospital-a" and row["epsilon"] == 0.7  # the ledger's, not the card's
    assert (row["auroc"], row["auroc_low"], row["auroc_high"]) == (0.7, 0.6, 0.8)


# -- the kernel's pieces ----------------------------------------------------------------------

#: what the CLI's thin client must not load (``tests/sandbox/test_served.py``); pyarrow.parquet
#: is the one the kernel allows: it reads the analyst's own released files (dummy, synthetic)
THIN_CLIENT_MUST_NOT_LOAD = (
    "sandbox.service", "sandbox.zone", "privacy.ledger", "policies.store", "policies.audit",
    "connectors.reader", "connectors.ingest", "connectors.governed_file",
    "connectors.dataset_handle", "torch", "ray", "sandbox.worker", "sandbox.server",
)  # fmt: skip


@pytest.mark.parametrize("name", [*THIN_CLIENT_MUST_NOT_LOAD, "connectors", "privacy.dpquery"])
def test_the_guard_refuses_what_reads_rows_keys_or_the_ledger(name: str) -> None:
    assert kernel.refused(name)


@pytest.mark.parametrize(
    "name", ["sandbox.client", "sandbox.notebook_zone", "foundation.errors", "pandas", "httpx"]
)
def test_the_guard_lets_the_thin_client_and_the_analysts_tools_through(name: str) -> None:
    assert not kernel.refused(name)


def test_the_guard_raises_an_import_error_that_says_where_data_is() -> None:
    guard = kernel.ImportGuard()
    with pytest.raises(ImportError, match="reaches data only through `zone`"):
        guard.find_spec("connectors.reader", None)
    assert guard.find_spec("pandas", None) is None


def test_without_a_server_zone_says_how_to_set_it() -> None:
    z = kernel.make_zone({})
    assert "SANDBOX_SERVER is not set" in repr(z) and "export SANDBOX_SERVER" in repr(z)
    with pytest.raises(SpecError, match="zone: SANDBOX_SERVER is not set .export SANDBOX_SERVER="):
        z.datasets()


def test_the_kernelspec_carries_no_secret(tmp_path: Path) -> None:
    where = Path(kernel.install_kernelspec(prefix=tmp_path))
    assert where == tmp_path / "share" / "jupyter" / "kernels" / "safe-zone"
    text = (where / "kernel.json").read_text()
    spec = kernel.kernel_json()
    assert spec["argv"][1:] == ["-m", "sandbox.kernel", "-f", "{connection_file}"]
    assert spec["display_name"] == "Safe zone (Python)" and "env" not in spec
    assert "TOKEN" not in text.upper()
