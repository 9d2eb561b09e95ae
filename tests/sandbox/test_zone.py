"""A zone is one zone: zone-relative paths in zone.toml, a zone id in zone.toml and the database."""

from __future__ import annotations

import shutil
import sqlite3
import tomllib
from pathlib import Path

import pytest
from factories import job_spec, make_world

from foundation.errors import NotFoundError, SpecError
from privacy.budget_events import BudgetKey
from sandbox.backend import InProcessBackend
from sandbox.service import Service
from sandbox.zone import (
    DEFAULT_DB_URL,
    ZONE_FILE,
    Zone,
    _toml_str,
    resolve_db_url,
    stored_db_url,
)


def _config(root: Path) -> dict:
    return tomllib.loads((root / ZONE_FILE).read_text())


def _db_id(db: Path) -> str | None:
    con = sqlite3.connect(db)
    try:
        row = con.execute("SELECT value FROM zone_meta WHERE key = 'zone_id'").fetchone()
    except sqlite3.OperationalError:
        row = None
    finally:
        con.close()
    return None if row is None else row[0]


def _init(root: Path) -> str:
    svc, token = Service.init_zone(root, InProcessBackend())
    svc.close()
    return token


def _open(root: Path) -> Service:
    return Service(Zone.open(root), InProcessBackend())


def _user_names(root: Path, token: str) -> list[str]:
    svc = _open(root)
    try:
        return sorted(u.name for u in svc.list_users(svc.authenticate(token)))
    finally:
        svc.close()


def _add_user(root: Path, token: str, name: str) -> None:
    svc = _open(root)
    try:
        svc.add_user(svc.authenticate(token), name, "researcher")
    finally:
        svc.close()


def _make_legacy(root: Path) -> None:
    """Turn a fresh zone into one made before zone ids: absolute db_url, no id anywhere."""
    con = sqlite3.connect(root / "state.db")
    con.execute("DROP TABLE zone_meta")
    con.commit()
    con.close()
    (root / ZONE_FILE).write_text(f'db_url = "sqlite:///{root.resolve() / "state.db"}"\n')


# -- what init writes -------------------------------------------------------------------------


def test_init_writes_a_zone_relative_db_url_and_one_zone_id(tmp_path: Path) -> None:
    root = tmp_path / "zone"
    _init(root)
    cfg = _config(root)
    assert cfg["db_url"] == DEFAULT_DB_URL
    assert str(tmp_path) not in (root / ZONE_FILE).read_text()  # no absolute path at all
    assert cfg["zone_id"].startswith("zone-") and len(cfg["zone_id"]) == len("zone-") + 32
    assert _db_id(root / "state.db") == cfg["zone_id"]
    z = Zone.open(root)
    assert z.zone_id == cfg["zone_id"]
    assert z.db_url == f"sqlite:///{root.resolve() / 'state.db'}"


def test_every_zone_gets_its_own_id(tmp_path: Path) -> None:
    _init(tmp_path / "a")
    _init(tmp_path / "b")
    assert _config(tmp_path / "a")["zone_id"] != _config(tmp_path / "b")["zone_id"]


def test_db_url_paths_are_relative_to_the_zone(tmp_path: Path) -> None:
    root = tmp_path / "zone"
    assert resolve_db_url("sqlite:///state.db", root) == f"sqlite:///{root / 'state.db'}"
    assert resolve_db_url("sqlite:///sub/s.db?timeout=5", root) == (
        f"sqlite:///{root / 'sub/s.db'}?timeout=5"
    )
    assert resolve_db_url("sqlite:////elsewhere/s.db", root) == "sqlite:////elsewhere/s.db"
    pg = "postgresql+psycopg://u:pw@db.example/zone"
    assert resolve_db_url(pg, root) == pg
    assert stored_db_url(pg, root) == pg
    assert stored_db_url(f"sqlite:///{root / 'x.db'}", root) == "sqlite:///x.db"
    assert stored_db_url("sqlite:////elsewhere/s.db", root) == "sqlite:////elsewhere/s.db"
    with pytest.raises(SpecError, match="zone.toml db_url"):
        resolve_db_url("not a url", root)


def test_an_absolute_db_url_inside_the_zone_is_written_relative(tmp_path: Path) -> None:
    root = tmp_path / "zone"
    svc, _ = Service.init_zone(root, InProcessBackend(), db_url=f"sqlite:///{root / 'x.db'}")
    svc.close()
    assert _config(root)["db_url"] == "sqlite:///x.db"
    assert (root / "x.db").exists() and not (root / "state.db").exists()


def test_a_database_outside_the_zone_stays_absolute(tmp_path: Path) -> None:
    root, outside = tmp_path / "zone", tmp_path / "dbs" / "z.db"
    outside.parent.mkdir()
    svc, token = Service.init_zone(root, InProcessBackend(), db_url=f"sqlite:///{outside}")
    svc.close()
    assert _config(root)["db_url"] == f"sqlite:///{outside}"
    assert _user_names(root, token) == ["operator"]


def test_toml_strings_round_trip() -> None:
    for s in ["plain", 'a "quoted" path', "back\\slash", "tab\tand\x7fdel", "ünï"]:
        assert tomllib.loads(f"v = {_toml_str(s)}")["v"] == s


def test_init_refuses_a_database_that_belongs_to_another_zone(tmp_path: Path) -> None:
    _init(tmp_path / "a")
    other = f"sqlite:///{tmp_path / 'a' / 'state.db'}"
    with pytest.raises(SpecError, match="already belongs to zone") as info:
        Service.init_zone(tmp_path / "b", InProcessBackend(), db_url=other)
    assert info.value.field == "--db-url"
    assert not (tmp_path / "b" / ZONE_FILE).exists()


# -- moved, copied, re-pointed ---------------------------------------------------------------


def test_a_moved_zone_still_opens_and_works(tmp_path: Path) -> None:
    token = _init(tmp_path / "zone")
    _add_user(tmp_path / "zone", token, "rita")
    moved = tmp_path / "elsewhere" / "moved-zone"
    moved.parent.mkdir()
    shutil.move(tmp_path / "zone", moved)
    assert _user_names(moved, token) == ["operator", "rita"]
    _add_user(moved, token, "sam")
    assert _user_names(moved, token) == ["operator", "rita", "sam"]
    assert not (tmp_path / "zone").exists()  # nothing re-created at the old place


def test_a_copied_zone_opens_its_own_copy_of_the_database(tmp_path: Path) -> None:
    orig, copy = tmp_path / "orig", tmp_path / "copy"
    token = _init(orig)
    shutil.copytree(orig, copy)
    _add_user(copy, token, "mallory")
    assert _user_names(copy, token) == ["mallory", "operator"]
    assert _user_names(orig, token) == ["operator"]  # the original's database is untouched
    svc = _open(orig)
    try:
        assert svc.audit_verify(svc.authenticate(token)).ok
    finally:
        svc.close()


def test_a_zone_pointed_at_another_zones_database_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _init(a)
    token_b = _init(b)
    cfg_b = _config(b)
    (b / ZONE_FILE).write_text(
        f'zone_id = "{cfg_b["zone_id"]}"\ndb_url = "sqlite:///{a / "state.db"}"\n'
    )
    with pytest.raises(SpecError) as info:
        _open(b)
    err = info.value
    assert err.field == "zone.toml db_url"
    assert _config(a)["zone_id"] in err.problem and cfg_b["zone_id"] in err.problem
    assert DEFAULT_DB_URL in err.fix  # says what would fix it
    assert "\n" not in str(err)
    # and the fix works
    (b / ZONE_FILE).write_text(f'zone_id = "{cfg_b["zone_id"]}"\ndb_url = "{DEFAULT_DB_URL}"\n')
    assert _user_names(b, token_b) == ["operator"]


def test_a_relative_path_to_another_zones_database_is_refused_too(tmp_path: Path) -> None:
    _init(tmp_path / "a")
    _init(tmp_path / "b")
    cfg = (tmp_path / "b" / ZONE_FILE).read_text()
    (tmp_path / "b" / ZONE_FILE).write_text(cfg.replace(DEFAULT_DB_URL, "sqlite:///../a/state.db"))
    with pytest.raises(SpecError, match="belongs to zone"):
        _open(tmp_path / "b")


def test_a_database_without_a_zone_id_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "zone"
    _init(root)
    stray = tmp_path / "stray.db"
    sqlite3.connect(stray).close()
    cfg = (root / ZONE_FILE).read_text()
    (root / ZONE_FILE).write_text(cfg.replace(DEFAULT_DB_URL, f"sqlite:///{stray}"))
    with pytest.raises(SpecError, match="holds no zone id"):
        _open(root)


def test_a_missing_database_is_refused_not_created(tmp_path: Path) -> None:
    root = tmp_path / "zone"
    _init(root)
    gone = tmp_path / "gone" / "state.db"
    cfg = (root / ZONE_FILE).read_text()
    (root / ZONE_FILE).write_text(cfg.replace(DEFAULT_DB_URL, f"sqlite:///{gone}"))
    with pytest.raises(SpecError, match="does not exist") as info:
        Zone.open(root)
    assert info.value.field == "zone.toml db_url" and DEFAULT_DB_URL in info.value.fix
    assert not gone.exists()


def test_a_zone_toml_without_its_id_is_refused_on_a_database_with_one(tmp_path: Path) -> None:
    root = tmp_path / "zone"
    _init(root)
    (root / ZONE_FILE).write_text(f'db_url = "{DEFAULT_DB_URL}"\n')
    with pytest.raises(SpecError, match="names no zone_id"):
        _open(root)


def test_no_zone_and_a_broken_zone_toml(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        Zone.open(tmp_path / "nothing")
    root = tmp_path / "zone"
    _init(root)
    (root / ZONE_FILE).write_text("db_url = \n")
    with pytest.raises(SpecError, match="not valid TOML"):
        Zone.open(root)
    (root / ZONE_FILE).write_text('zone_id = "x"\n')
    with pytest.raises(SpecError, match="zone.toml db_url: is missing"):
        Zone.open(root)


# -- zones made before zone ids ---------------------------------------------------------------


def test_an_old_zone_is_adopted_on_first_open(tmp_path: Path) -> None:
    root = tmp_path / "zone"
    token = _init(root)
    _make_legacy(root)
    assert Zone.open(root).zone_id == ""
    assert _user_names(root, token) == ["operator"]
    cfg = _config(root)
    assert cfg["db_url"] == DEFAULT_DB_URL  # rewritten relative
    assert cfg["zone_id"].startswith("zone-")
    assert _db_id(root / "state.db") == cfg["zone_id"]
    # and from now on it behaves as a new zone: it can move
    shutil.move(root, tmp_path / "moved")
    assert _user_names(tmp_path / "moved", token) == ["operator"]


def test_an_old_zone_on_an_outside_database_is_adopted_when_the_db_names_its_folder(
    tmp_path: Path,
) -> None:
    root, outside = tmp_path / "zone", tmp_path / "dbs" / "z.db"
    outside.parent.mkdir()
    svc, token = Service.init_zone(root, InProcessBackend(), db_url=f"sqlite:///{outside}")
    svc.close()
    con = sqlite3.connect(outside)
    con.execute("DROP TABLE zone_meta")
    con.commit()
    con.close()
    (root / ZONE_FILE).write_text(f'db_url = "sqlite:///{outside}"\n')
    assert _user_names(root, token) == ["operator"]
    cfg = _config(root)
    assert cfg["db_url"] == f"sqlite:///{outside}" and _db_id(outside) == cfg["zone_id"]


def test_a_copied_old_zone_is_refused_until_it_points_at_its_own_copy(tmp_path: Path) -> None:
    orig, copy = tmp_path / "orig", tmp_path / "copy"
    token = _init(orig)
    _make_legacy(orig)
    shutil.copytree(orig, copy)
    # the copy's zone.toml still names the original's database by absolute path
    with pytest.raises(SpecError, match="not made for this zone") as info:
        _open(copy)
    assert DEFAULT_DB_URL in info.value.fix
    assert _db_id(orig / "state.db") is None  # the refusal wrote nothing to the original
    (copy / ZONE_FILE).write_text(f'db_url = "{DEFAULT_DB_URL}"\n')
    _add_user(copy, token, "mallory")
    assert _user_names(orig, token) == ["operator"]
    # each adopted with an id of its own
    assert _config(orig)["zone_id"] != _config(copy)["zone_id"]


def test_a_moved_old_zone_is_refused_with_the_fix_and_then_adopted(tmp_path: Path) -> None:
    token = _init(tmp_path / "zone")
    _make_legacy(tmp_path / "zone")
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "zone", moved)
    with pytest.raises(SpecError, match="does not exist") as info:
        Zone.open(moved)
    assert DEFAULT_DB_URL in info.value.fix
    assert not (tmp_path / "zone").exists()
    (moved / ZONE_FILE).write_text(f'db_url = "{DEFAULT_DB_URL}"\n')
    assert _user_names(moved, token) == ["operator"]


def test_a_moved_zone_still_reads_its_datasets(tmp_path: Path) -> None:
    """The governed files are found from the zone's layout, not from the absolute path
    stored at ingest: after ``mv`` a job reads its dataset where the zone now is."""
    world = make_world(tmp_path / "zone", InProcessBackend(), patients=400)
    world.svc.close()
    moved = tmp_path / "elsewhere" / "moved-zone"
    moved.parent.mkdir()
    shutil.move(tmp_path / "zone", moved)
    svc = _open(moved)
    try:
        rita = svc.authenticate(world.researcher_token)
        job = svc.submit(rita, job_spec(**{"training.epochs": 1}))
        assert job.state.value == "succeeded", job.error
        assert svc.ledger.balance(BudgetKey("readmission", "cohort")).spent_epsilon > 0
    finally:
        svc.close()
