"""Dataset versions through the installed ``sandbox`` (issue 13, item 4): re-ingesting a name
makes a new version; grants name a version or follow the latest; old versions stay readable
until a steward deletes them; the whole dataset's deletion takes every version."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cli_runner import last_json, ok, refused, sandbox
from factories import make_world
from messy_extract import PATIENTS, VISITS, write_extract

from foundation.errors import NotFoundError
from sandbox.backend import InProcessBackend
from sandbox.dataset_ingest import version_dir
from sandbox.jobspec import parse_job_spec


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    w = make_world(tmp_path_factory.mktemp("versions") / "zone", InProcessBackend(), patients=300)
    yield w
    w.svc.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    csv_path, contract, _ = write_extract(tmp_path_factory.mktemp("extract"))
    # a second extract: the first 2,000 visits only (a corrected re-export, say)
    lines = csv_path.read_text(encoding="utf-8").splitlines(keepends=True)
    second = csv_path.with_name("visits-2.csv")
    second.write_text("".join(lines[:2001]), encoding="utf-8")
    return csv_path, contract, second  # type: ignore[return-value]


def ingest(world: Any, source: Path, contract: Path) -> Any:
    return sandbox(
        "dataset",
        "ingest",
        "visits",
        "--from",
        str(source),
        "--schema",
        str(contract),
        "--json",
        zone=world.root,
        token=world.steward_token,
    )


def test_reingesting_a_name_makes_a_new_version_and_both_stay_readable(
    world: Any, files: tuple[Path, Path, Path]
) -> None:
    first, contract, second = files  # type: ignore[misc]
    v1 = ok(ingest(world, first, contract))
    assert v1["version"] == 1 and v1["rows"] == VISITS and v1["persons"] == PATIENTS
    human = sandbox(
        "dataset",
        "ingest",
        "visits",
        "--from",
        str(second),
        "--schema",
        str(contract),
        zone=world.root,
        token=world.steward_token,
    )
    assert human.returncode == 0, human.stderr
    assert "version 2, now the latest" in " ".join(human.stdout.split())

    latest = ok(
        sandbox("dataset", "show", "visits", "--json", zone=world.root, token=world.steward_token)
    )
    assert latest["version"] == 2 and latest["rows"] == 2000
    assert [(v["version"], v["latest"]) for v in latest["versions"]] == [(1, False), (2, True)]
    old = ok(
        sandbox(
            "dataset",
            "show",
            "visits",
            "--version",
            "1",
            "--json",
            zone=world.root,
            token=world.steward_token,
        )
    )
    assert old["version"] == 1 and old["rows"] == VISITS and old["latest_version"] == 2
    # each version has its own files
    assert version_dir(world.svc.ctx, "visits", 1).is_dir()
    assert version_dir(world.svc.ctx, "visits", 2).is_dir()
    # researchers see the versions too (never counts of a private dataset)
    seen = ok(
        sandbox(
            "dataset", "show", "visits", "--json", zone=world.root, token=world.researcher_token
        )
    )
    assert seen["version"] == 2 and "rows" not in seen


def test_a_request_names_a_version_or_follows_the_latest(world: Any) -> None:
    svc = world.svc
    svc.create_project(world.researcher, "visits-study", "versions")
    pinned = ok(
        sandbox(
            "access",
            "request",
            "visits-study",
            "--dataset",
            "visits",
            "--columns",
            "age,sex,readmitted_30d",
            "--dataset-version",
            "1",
            "--json",
            zone=world.root,
            token=world.researcher_token,
        )
    )
    assert pinned["dataset_version"] == 1
    grant = svc.approve(
        world.steward, pinned["id"], expires_at=datetime.now(UTC) + timedelta(days=1)
    )
    assert grant.dataset_version == 1
    # a job under the pinned grant reads version 1; a project whose grant follows the latest
    # reads version 2 (each job records the version it read)
    pinned_job = svc.submit(world.researcher, _spec("visits-study"))
    assert pinned_job.state.value == "succeeded", pinned_job.error
    assert pinned_job.dataset_version == 1
    svc.create_project(world.researcher, "visits-latest", "versions")
    latest_req = svc.request_access(
        world.researcher,
        "visits-latest",
        "visits",
        ["age", "sex", "readmitted_30d"],
        ["dp-sgd"],
        1.0,
        1e-6,
    )
    svc.approve(world.steward, latest_req.id, expires_at=datetime.now(UTC) + timedelta(days=1))
    latest_job = svc.submit(world.researcher, _spec("visits-latest"))
    assert latest_job.state.value == "succeeded", latest_job.error
    assert latest_job.dataset_version == 2
    status = ok(
        sandbox(
            "jobs", "status", pinned_job.id, "--json", zone=world.root, token=world.researcher_token
        )
    )
    assert status["dataset_version"] == 1

    follows = svc.request_access(
        world.researcher, "visits-study", "visits", ["age"], ["dp-query"], 1.0, 1e-6
    )
    assert follows.dataset_version is None
    with pytest.raises(NotFoundError, match="no version 7; its versions are 1 to 2"):
        svc.request_access(
            world.researcher,
            "visits-study",
            "visits",
            ["age"],
            ["dp-sgd"],
            1.0,
            1e-6,
            dataset_version=7,
        )


def _spec(project: str) -> Any:
    return parse_job_spec(
        {
            "project": project,
            "dataset": "visits",
            "label": "readmitted_30d",
            "features": ["age", "sex"],
            "model": {"kind": "logistic", "hidden": []},
            "privacy": {"epsilon": 0.5, "delta": 1e-7, "max_grad_norm": 1.0},
            "training": {"epochs": 1, "batch_size": 64, "lr": 0.05, "seed": 1},
        }
    )


def test_an_old_version_is_deleted_alone_and_the_latest_is_not(world: Any) -> None:
    def delete(*extra: str) -> Any:
        return sandbox(
            "dataset",
            "delete",
            "visits",
            *extra,
            "--json",
            zone=world.root,
            token=world.steward_token,
        )

    err = refused(delete("--version", "2"))
    assert "is the latest" in err["message"] and "older version" in err["message"]
    out = ok(delete("--version", "1"))
    assert out == {"name": "visits", "version": 1, "deleted": True, "key_destroyed": True}
    assert not version_dir(world.svc.ctx, "visits", 1).exists()
    gone = sandbox(
        "dataset",
        "show",
        "visits",
        "--version",
        "1",
        "--json",
        zone=world.root,
        token=world.steward_token,
    )
    assert gone.returncode == 2 and "was deleted" in last_json(gone)["message"]
    shown = ok(
        sandbox("dataset", "show", "visits", "--json", zone=world.root, token=world.steward_token)
    )
    assert [(v["version"], v["deleted"]) for v in shown["versions"]] == [(1, True), (2, False)]
    # a job under the grant pinned to the deleted version is refused, naming it
    with pytest.raises(NotFoundError, match="version 1 of dataset 'visits' was deleted"):
        world.svc.submit(world.researcher, _spec("visits-study"))
    # the whole dataset's deletion takes every remaining version, and the name stays taken
    assert ok(delete())["deleted"] is True
    assert not version_dir(world.svc.ctx, "visits", 2).exists()
    again = sandbox(
        "dataset",
        "ingest",
        "visits",
        "--demo",
        "--patients",
        "200",
        "--json",
        zone=world.root,
        token=world.steward_token,
    )
    assert (
        again.returncode == 2 and "its name stays with its history" in last_json(again)["message"]
    )
