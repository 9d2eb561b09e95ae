"""Attack: a person with rows at two hospitals, spent twice by a federated job.

Federated training charges each hospital's budget for its own patients (parallel
composition). That holds only if each person is at one site: with ``rows_per_person =
"many"`` a person seen at two hospitals would be trained on by both, each charging only its
own budget, so the person lost 2 epsilon while every budget showed 1.

Now ingest counts such persons (and says how many, never who) and a federated job on the
dataset is refused before anything is reserved, with an error that names the fix (one
dataset-wide budget: ``mode = "dp-sgd"``). Run through the installed CLI.
"""

from __future__ import annotations

import csv
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cli_runner import ok, refused, sandbox

CONTRACT = """
[dataset]
rows_per_person = "many"

[columns.patient]
type = "string"
role = "identifier"

[columns.hospital]
type = "string"
role = "site"
categories = ["north", "south", "east"]

[columns.age]
type = "float64"
role = "feature"
min = 18
max = 105

[columns.readmitted]
type = "int8"
role = "label"
min = 0
max = 1
"""

SPEC = """project = "p"
dataset = "visits"
label = "readmitted"
features = ["age"]
mode = "federated"
[model]
kind = "logistic"
hidden = []
[privacy]
epsilon = 1.0
delta = 1e-6
max_grad_norm = 1.0
[training]
epochs = 1
batch_size = 32
lr = 0.5
seed = 1
[federated]
rounds = 2
sites = "all"
min_sites = 2
[resources]
gpus = 0
# one Flower actor on the two-CPU Ray (each costs ~5 CPU-s to start): the sites in turn
cpus = 2
"""


def _extract(path: Path, travellers: int) -> None:
    """900 patients at three hospitals; ``travellers`` of them also visited a second one."""
    rng = random.Random(3)
    sites = ["north", "south", "east"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["patient", "hospital", "age", "readmitted"])
        for i in range(900):
            home = sites[i % 3]
            w.writerow([f"p{i:04d}", home, rng.randint(18, 90), int(rng.random() < 0.2)])
            if i < travellers:
                other = sites[(i + 1) % 3]
                w.writerow([f"p{i:04d}", other, rng.randint(18, 90), int(rng.random() < 0.2)])


def _set_up(root: Path) -> tuple[str, str]:
    from sandbox.backend import InProcessBackend
    from sandbox.service import Service

    svc, op = Service.init_zone(root, InProcessBackend())
    operator = svc.authenticate(op)
    _, st = svc.add_user(operator, "sam", "steward")
    _, rt = svc.add_user(operator, "rita", "researcher")
    svc.close()
    return st, rt


def test_a_person_at_two_sites_is_never_charged_once_per_site(tmp_path: Path) -> None:
    zone = tmp_path / "zone"
    sam, rita = _set_up(zone)
    (tmp_path / "schema.toml").write_text(CONTRACT, encoding="utf-8")
    _extract(tmp_path / "visits.csv", travellers=7)

    rep = ok(
        sandbox(
            "dataset",
            "ingest",
            "visits",
            "--from",
            str(tmp_path / "visits.csv"),
            "--schema",
            str(tmp_path / "schema.toml"),
            "--json",
            zone=zone,
            token=sam,
        )
    )
    # the steward is told how many, and only how many (no pseudonym, no value)
    assert rep["cross_site_persons"] == 7
    assert "p000" not in str(rep)

    ok(sandbox("project", "create", "p", "--purpose", "x", "--json", zone=zone, token=rita))
    req = ok(
        sandbox(
            "access",
            "request",
            "p",
            "--dataset",
            "visits",
            "--columns",
            "age,readmitted",
            "--mechanism",
            "federated",
            "--epsilon",
            "1",
            "--delta",
            "1e-5",
            "--json",
            zone=zone,
            token=rita,
        )
    )
    expires = (datetime.now(UTC) + timedelta(days=3)).date().isoformat()
    ok(
        sandbox(
            "access", "approve", req["id"], "--expires", expires, "--json", zone=zone, token=sam
        )
    )
    before = ok(sandbox("budget", "p", "--json", zone=zone, token=rita))

    (tmp_path / "fed.toml").write_text(SPEC, encoding="utf-8")
    out = refused(sandbox("submit", str(tmp_path / "fed.toml"), "--json", zone=zone, token=rita))
    assert out["error"] == "spec_error"
    assert "more than one site" in out["message"] and "dp-sgd" in out["message"]
    # the researcher is not told how many persons travel (that is a count of the data)
    assert "7" not in out["message"]
    # nothing was reserved or spent, and no job waits
    assert ok(sandbox("budget", "p", "--json", zone=zone, token=rita)) == before
    assert ok(sandbox("jobs", "list", "--json", zone=zone, token=rita))["jobs"] == []
    # and the quote refuses it the same way
    q = refused(sandbox("quote", str(tmp_path / "fed.toml"), "--json", zone=zone, token=rita))
    assert "more than one site" in q["message"]


def test_one_site_per_person_is_counted_as_zero(tmp_path: Path) -> None:
    from connectors.ingest import ingest_file
    from connectors.schema import SchemaContract

    _extract(tmp_path / "visits.csv", travellers=0)
    report = ingest_file(
        tmp_path / "visits.csv",
        SchemaContract.from_toml_text(CONTRACT),
        tmp_path / "governed",
        b"k" * 32,
    )
    assert report.cross_site_persons == 0 and report.persons == 900
