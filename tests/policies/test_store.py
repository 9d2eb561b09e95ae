"""The policy state store on a fresh SQLite database per test, with frozen time."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, text

from foundation.errors import AuthError, NotFoundError, PolicyDenied, SpecError
from foundation.sql import make_engine
from policies.decisions import (
    JobAccessRequest,
    Mechanism,
    ProjectStatus,
    RequestState,
    decide_job_access,
)
from policies.identity import hash_token, looks_like_token, new_token, token_matches
from policies.roles import Role
from policies.store import StateStore
from policies.store_records import AccessRequestRecord, DatasetRecord, User, contract_columns

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
COLUMNS = ("patient_id", "age", "sex", "hba1c", "readmitted")


class FrozenClock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


# -- fixtures and factories (overrides by keyword) -------------------------------------------------


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    # every engine the product supports (conftest ``db_url``: SQLite, PostgreSQL)
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def store(engine: Engine, clock: FrozenClock) -> StateStore:
    return StateStore(engine, clock=clock)


def contract(*names: str) -> dict[str, Any]:
    """A contract dict in ``SchemaContract.to_dict()``'s shape."""
    cols = names or COLUMNS
    return {
        "dataset": {"rows_per_person": "many"},
        "columns": {n: {"type": "double", "role": "feature"} for n in cols},
    }


def add_dataset(store: StateStore, **over: Any) -> DatasetRecord:
    args: dict[str, Any] = {
        "name": "cohort",
        "contract": contract(),
        "path": "/zone/datasets/cohort",
        "rows": 1000,
        "persons": 400,
        "sites": {"north": 600, "south": 400},
        "by": "sam",
        **over,
    }
    return store.register_dataset(**args)


@pytest.fixture
def world(store: StateStore) -> dict[str, str]:
    """Users sam (steward), stella (steward), rita (researcher), ana (analyst); dataset cohort;
    project readmission owned by rita with ana as a member. Returns the tokens."""
    tokens = {}
    for name, role in (
        ("sam", Role.STEWARD),
        ("stella", Role.STEWARD),
        ("rita", Role.RESEARCHER),
        ("ana", Role.ANALYST),
    ):
        tokens[name] = store.add_user(name, role)[1]
    add_dataset(store)
    store.create_project("readmission", "30-day readmission risk", "rita")
    store.add_member("readmission", "ana", by="rita")
    return tokens


def request(store: StateStore, **over: Any) -> AccessRequestRecord:
    args: dict[str, Any] = {
        "project": "readmission",
        "dataset": "cohort",
        "columns": ["age", "readmitted"],
        "mechanisms": ["dp-sgd"],
        "epsilon": 2.0,
        "delta": 1e-5,
        "by": "rita",
        **over,
    }
    return store.request_access(**args)


def job(**over: Any) -> JobAccessRequest:
    args: dict[str, Any] = {
        "user": "rita",
        "role": Role.RESEARCHER,
        "project": "readmission",
        "dataset": "cohort",
        "columns": frozenset({"age", "readmitted"}),
        "mechanism": Mechanism.DP_SGD,
        "epsilon": 1.0,
        "delta": 1e-6,
        **over,
    }
    return JobAccessRequest(**args)


def assert_json_safe(d: dict[str, Any]) -> None:
    assert json.loads(json.dumps(d)) == d


# -- schema ----------------------------------------------------------------------------------------


def test_schema_is_idempotent(engine: Engine, clock: FrozenClock) -> None:
    a = StateStore(engine, clock=clock)
    a.create_schema()
    a.create_schema()
    a.add_user("rita", Role.RESEARCHER)
    assert [u.name for u in StateStore(engine, clock=clock).list_users()] == ["rita"]


# -- tokens ----------------------------------------------------------------------------------------


def test_new_token_and_its_hash() -> None:
    token, digest = new_token()
    assert token.startswith("sz_") and looks_like_token(token)
    assert digest == hash_token(token) == hashlib.sha256(token.encode()).hexdigest()
    assert token_matches(token, digest)
    assert not token_matches(token, hash_token(token + "x"))
    assert not looks_like_token("Bearer abc") and not looks_like_token(None)


# -- users -----------------------------------------------------------------------------------------


def test_add_user_shows_the_token_once_and_stores_only_its_hash(
    store: StateStore, engine: Engine
) -> None:
    user, token = store.add_user("rita", Role.RESEARCHER)
    assert re.fullmatch(r"sz_[A-Za-z0-9_-]{40,}", token)
    assert re.fullmatch(r"user-[0-9a-f]{8}", user.id)
    assert (user.name, user.role, user.created_at, user.revoked_at) == (
        "rita",
        "researcher",
        T0,
        None,
    )
    with engine.connect() as conn:
        (stored,) = conn.execute(text("SELECT token_hash FROM users")).one()
        dump = "".join(str(v) for r in conn.execute(text("SELECT * FROM users")) for v in r)
    assert stored == hashlib.sha256(token.encode()).hexdigest()
    assert token not in dump
    d = user.to_dict()
    assert_json_safe(d)
    assert stored not in json.dumps(d) and "token" not in " ".join(d)


def test_tokens_are_distinct(store: StateStore) -> None:
    tokens = {store.add_user(f"u{i}", Role.ANALYST)[1] for i in range(5)}
    assert len(tokens) == 5


def test_user_names_are_unique(store: StateStore) -> None:
    store.add_user("rita", Role.RESEARCHER)
    with pytest.raises(SpecError) as info:
        store.add_user("rita", Role.ANALYST)
    assert info.value.field == "name"
    assert "already exists" in str(info.value)


@pytest.mark.parametrize("name", ["", " rita", "rita smith", "-x", "a" * 65, "ri/ta"])
def test_bad_user_names_are_refused(store: StateStore, name: str) -> None:
    with pytest.raises(SpecError) as info:
        store.add_user(name, Role.RESEARCHER)
    assert info.value.field == "name"


def test_unknown_role_is_refused(store: StateStore) -> None:
    with pytest.raises(SpecError) as info:
        store.add_user("rita", "admin")
    assert info.value.field == "role"
    assert "operator, steward, researcher, analyst" in info.value.fix


def test_authenticate(store: StateStore) -> None:
    user, token = store.add_user("rita", Role.RESEARCHER)
    assert store.authenticate(token) == user


@pytest.mark.parametrize("token", ["", "sz_", "sz_" + "x" * 43, "not-a-token", "x" * 1000])
def test_unknown_tokens_are_refused(store: StateStore, token: str) -> None:
    store.add_user("rita", Role.RESEARCHER)
    with pytest.raises(AuthError) as info:
        store.authenticate(token)
    assert str(info.value) == "unknown or revoked token; ask an operator for a new one"


def test_revoked_tokens_are_refused_and_revoking_twice_keeps_the_first_time(
    store: StateStore, clock: FrozenClock
) -> None:
    _, token = store.add_user("rita", Role.RESEARCHER)
    clock.advance(hours=1)
    first = store.revoke_user("rita")
    clock.advance(hours=1)
    assert store.revoke_user("rita").revoked_at == first.revoked_at == T0 + timedelta(hours=1)
    assert not first.active
    with pytest.raises(AuthError, match="ask an operator for a new one"):
        store.authenticate(token)


def test_reissued_token_replaces_the_old_one(store: StateStore) -> None:
    _, old = store.add_user("rita", Role.RESEARCHER)
    store.revoke_user("rita")
    user, new = store.reissue_token("rita")
    assert user.active and new != old
    assert store.authenticate(new).name == "rita"
    with pytest.raises(AuthError):
        store.authenticate(old)


def test_get_and_list_users(store: StateStore) -> None:
    for name in ("zed", "amy"):
        store.add_user(name, Role.ANALYST)
    assert [u.name for u in store.list_users()] == ["amy", "zed"]
    assert store.get_user("zed").role is Role.ANALYST
    with pytest.raises(NotFoundError):
        store.get_user("nobody")
    with pytest.raises(NotFoundError):
        store.revoke_user("nobody")


# -- datasets --------------------------------------------------------------------------------------


def test_register_and_get_dataset(store: StateStore) -> None:
    rec = add_dataset(store)
    assert rec == store.get_dataset("cohort")
    assert rec.columns == frozenset(COLUMNS)
    assert (rec.rows, rec.persons, rec.sites, rec.created_at) == (
        1000,
        400,
        {"north": 600, "south": 400},
        T0,
    )
    assert rec.path == "/zone/datasets/cohort"


def test_dataset_dicts_never_show_the_path(store: StateStore) -> None:
    rec = add_dataset(store)
    full, public = rec.to_dict(), rec.to_public_dict()
    for d in (full, public):
        assert_json_safe(d)
        assert "/zone/datasets" not in json.dumps(d)
    assert full["rows"] == 1000 and full["sites"] == {"north": 600, "south": 400}
    # private counts (the contract does not declare them public): site names, no count
    assert set(public) == {
        "name",
        "contract",
        "site_names",
        "counts",
        "version",
        "latest_version",
    }
    assert public["counts"] == "private" and public["site_names"] == ["north", "south"]
    assert not any(k in public for k in ("rows", "persons", "sites", "cross_site_persons"))


def test_dataset_records_are_copies(store: StateStore) -> None:
    rec = add_dataset(store)
    rec.contract["columns"].clear()
    assert store.get_dataset("cohort").columns == frozenset(COLUMNS)


def test_dataset_names_are_unique(store: StateStore) -> None:
    add_dataset(store)
    with pytest.raises(SpecError) as info:
        add_dataset(store, path="/elsewhere")
    assert info.value.field == "name"


def test_unknown_dataset_lists_the_known_ones(store: StateStore) -> None:
    add_dataset(store, name="cohort")
    add_dataset(store, name="icu")
    with pytest.raises(NotFoundError) as info:
        store.get_dataset("cohrot")
    assert "known datasets: cohort, icu" in str(info.value)
    assert [d.name for d in store.list_datasets()] == ["cohort", "icu"]


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"rows": -1}, "rows"),
        ({"rows": 1.5}, "rows"),
        ({"persons": 2000}, "persons"),
        ({"contract": {"columns": {}}}, "contract"),
        ({"contract": {"dataset": {}}}, "contract"),
        ({"contract": {"columns": [{"name": "a"}, {"name": "a"}]}}, "contract"),
        ({"sites": {"north": -3}}, "sites.north"),
        ({"path": " "}, "path"),
        ({"name": "co hort"}, "name"),
    ],
)
def test_bad_datasets_name_the_field(store: StateStore, over: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as info:
        add_dataset(store, **over)
    assert info.value.field == field
    assert store.list_datasets() == []


def test_contract_columns_accepts_both_shapes() -> None:
    assert contract_columns(contract("a", "b")) == {"a", "b"}
    assert contract_columns({"columns": [{"name": "a"}, {"name": "b"}]}) == {"a", "b"}


# -- projects --------------------------------------------------------------------------------------


def test_create_project_makes_the_owner_a_member(store: StateStore) -> None:
    store.add_user("rita", Role.RESEARCHER)
    rec = store.create_project("readmission", " risk of readmission ", "rita")
    assert (rec.owner, rec.members, rec.status, rec.purpose) == (
        "rita", ("rita",), ProjectStatus.ACTIVE, "risk of readmission",
    )  # fmt: skip
    assert rec == store.get_project("readmission")
    assert_json_safe(rec.to_dict())
    view = store.project_view("readmission")
    assert (view.owner, view.members, view.status) == (
        "rita",
        frozenset({"rita"}),
        ProjectStatus.ACTIVE,
    )


def test_project_names_are_unique(store: StateStore) -> None:
    store.add_user("rita", Role.RESEARCHER)
    store.create_project("p1", "x", "rita")
    with pytest.raises(SpecError) as info:
        store.create_project("p1", "y", "rita")
    assert info.value.field == "name"


def test_project_needs_purpose_and_an_active_owner(store: StateStore) -> None:
    store.add_user("rita", Role.RESEARCHER)
    with pytest.raises(SpecError) as info:
        store.create_project("p1", "  ", "rita")
    assert info.value.field == "purpose"
    with pytest.raises(NotFoundError):
        store.create_project("p1", "x", "ghost")
    store.revoke_user("rita")
    with pytest.raises(PolicyDenied):
        store.create_project("p1", "x", "rita")
    assert store.list_projects() == []


def test_members_and_listing(store: StateStore, world: dict[str, str]) -> None:
    store.add_user("bob", Role.RESEARCHER)
    store.create_project("other", "something else", "bob")
    assert [p.name for p in store.list_projects()] == ["other", "readmission"]
    assert [p.name for p in store.list_projects("ana")] == ["readmission"]
    assert [p.name for p in store.list_projects("sam")] == []
    again = store.add_member("readmission", "ana", by="rita")  # idempotent
    assert again.members == ("ana", "rita")
    with pytest.raises(NotFoundError):
        store.add_member("readmission", "ghost", by="rita")
    with pytest.raises(NotFoundError) as info:
        store.get_project("readmision")
    assert "known projects: other, readmission" in str(info.value)


def test_closing_a_project_is_one_way(store: StateStore, world: dict[str, str]) -> None:
    closed = store.close_project("readmission")
    assert closed.status is ProjectStatus.CLOSED
    with pytest.raises(PolicyDenied):
        store.close_project("readmission")
    with pytest.raises(PolicyDenied):
        store.add_member("readmission", "stella", by="rita")
    with pytest.raises(PolicyDenied):
        request(store)


# -- access requests -------------------------------------------------------------------------------


def test_request_access_files_a_pending_request(store: StateStore, world: dict[str, str]) -> None:
    req = request(store, quote={"epsilon_per_job": 0.5, "jobs": 4})
    assert re.fullmatch(r"req-[0-9a-f]{8}", req.id)
    assert req.state is RequestState.PENDING
    assert req.columns == {"age", "readmitted"} and req.mechanisms == {Mechanism.DP_SGD}
    assert (req.epsilon, req.delta, req.requested_by, req.created_at) == (2.0, 1e-5, "rita", T0)
    assert req.quote == {"epsilon_per_job": 0.5, "jobs": 4}
    assert req.grant_id is None and req.decided_by is None
    assert store.get_request(req.id) == req
    d = req.to_dict()
    assert_json_safe(d)
    assert d["columns"] == ["age", "readmitted"] and d["mechanisms"] == ["dp-sgd"]


def test_unknown_columns_are_named(store: StateStore, world: dict[str, str]) -> None:
    with pytest.raises(SpecError) as info:
        request(store, columns=["age", "postcode"])
    assert info.value.field == "columns"
    assert "postcode" in info.value.problem
    assert "hba1c" in info.value.fix


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"mechanisms": ["dp_sgd"]}, "mechanisms"),
        ({"mechanisms": []}, "mechanisms"),
        ({"mechanisms": "dp-sgd"}, "mechanisms"),
        ({"columns": "age"}, "columns"),
        ({"columns": []}, "columns"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"quote": {"x": {1, 2}}}, "quote"),
    ],
)
def test_bad_requests_name_the_field(
    store: StateStore, world: dict[str, str], over: dict[str, Any], field: str
) -> None:
    with pytest.raises(SpecError) as info:
        request(store, **over)
    assert info.value.field == field
    assert store.list_requests() == []


def test_only_researcher_members_may_request(store: StateStore, world: dict[str, str]) -> None:
    store.add_user("bob", Role.RESEARCHER)
    with pytest.raises(PolicyDenied) as info:
        request(store, by="bob")
    assert info.value.missing == ("membership of project readmission",)
    assert info.value.grantor == "project owner (rita)"
    with pytest.raises(PolicyDenied) as info:
        request(store, by="ana")
    assert "analyst" in info.value.reason
    with pytest.raises(NotFoundError):
        request(store, by="ghost")
    with pytest.raises(NotFoundError):
        request(store, dataset="nope")
    with pytest.raises(NotFoundError):
        request(store, project="nope")


def test_list_requests(store: StateStore, world: dict[str, str], clock: FrozenClock) -> None:
    store.add_user("bob", Role.RESEARCHER)
    store.create_project("other", "x", "bob")
    a = request(store)
    clock.advance(minutes=1)
    b = request(store, project="other", by="bob")
    clock.advance(minutes=1)
    c = request(store, mechanisms=["dp-query"])
    store.deny(c.id, "sam", "use dp-sgd")
    assert [r.id for r in store.list_requests()] == [a.id, b.id, c.id]
    assert [r.id for r in store.list_requests(pending_only=True)] == [a.id, b.id]
    assert [r.id for r in store.list_requests(project="readmission")] == [a.id, c.id]
    with pytest.raises(NotFoundError):
        store.get_request("req-00000000")


# -- approval, denial, grants -----------------------------------------------------------------------


def test_approve_creates_one_grant(
    store: StateStore, world: dict[str, str], clock: FrozenClock
) -> None:
    req = request(store)
    clock.advance(days=1)
    ends = T0 + timedelta(days=90)
    g = store.approve(req.id, "sam", expires_at=ends)
    assert re.fullmatch(r"grant-[0-9a-f]{8}", g.id)
    assert (g.request_id, g.project, g.dataset, g.granted_by) == (
        req.id,
        "readmission",
        "cohort",
        "sam",
    )
    assert (g.columns, g.mechanisms, g.epsilon, g.delta) == (req.columns, req.mechanisms, 2.0, 1e-5)
    assert g.expires_at == ends and g.created_at == clock.now and g.revoked_at is None
    assert_json_safe(g.to_dict())
    done = store.get_request(req.id)
    assert (done.state, done.decided_by, done.decided_at, done.grant_id) == (
        RequestState.APPROVED, "sam", clock.now, g.id,
    )  # fmt: skip
    assert done.reason == "approved as requested"
    assert store.grants_for("readmission", "cohort") == [g.view()]
    assert store.grants_for("readmission", "other") == []
    assert store.get_grant(g.id) == g


def test_approving_a_different_budget_records_it(store: StateStore, world: dict[str, str]) -> None:
    req = request(store, epsilon=4.0)
    g = store.approve(req.id, "sam", epsilon=1.5, delta=1e-6)
    assert (g.epsilon, g.delta) == (1.5, 1e-6)
    after = store.get_request(req.id)
    assert after.epsilon == 4.0  # what was asked stays on the request
    assert after.reason == "approved with epsilon 1.5 (requested 4), delta 1e-06 (requested 1e-05)"


def test_expiry_is_stored_in_utc(store: StateStore, world: dict[str, str]) -> None:
    plus_two = timezone(timedelta(hours=2))
    g = store.approve(
        request(store).id, "sam", expires_at=datetime(2026, 6, 30, 2, 0, tzinfo=plus_two)
    )
    assert g.expires_at == datetime(2026, 6, 30, 0, 0, tzinfo=UTC)
    assert g.expires_at is not None and g.expires_at.tzinfo is UTC


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": float("inf")}, "epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"expires_at": datetime(2026, 6, 30)}, "expires_at"),
    ],
)
def test_bad_approvals_name_the_field(
    store: StateStore, world: dict[str, str], over: dict[str, Any], field: str
) -> None:
    req = request(store)
    with pytest.raises(SpecError) as info:
        store.approve(req.id, "sam", **over)
    assert info.value.field == field
    assert store.get_request(req.id).state is RequestState.PENDING
    assert store.list_grants() == []


def test_a_request_is_decided_once(store: StateStore, world: dict[str, str]) -> None:
    approved = request(store)
    store.approve(approved.id, "sam")
    with pytest.raises(PolicyDenied, match="is approved and cannot become approved"):
        store.approve(approved.id, "stella")
    with pytest.raises(PolicyDenied, match="is approved and cannot become denied"):
        store.deny(approved.id, "stella", "changed my mind")
    denied = request(store)
    rec = store.deny(denied.id, "sam", "ask for fewer columns")
    assert (rec.state, rec.reason, rec.decided_by) == (
        RequestState.DENIED,
        "ask for fewer columns",
        "sam",
    )
    with pytest.raises(PolicyDenied, match="is denied"):
        store.approve(denied.id, "sam")
    assert len(store.list_grants()) == 1


def test_deny_needs_a_reason(store: StateStore, world: dict[str, str]) -> None:
    req = request(store)
    with pytest.raises(SpecError) as info:
        store.deny(req.id, "sam", "   ")
    assert info.value.field == "reason"


def test_nobody_approves_their_own_request(store: StateStore, world: dict[str, str]) -> None:
    req = request(store)
    with pytest.raises(PolicyDenied) as info:
        store.approve(req.id, "rita")
    assert info.value.missing == ("approval by another data steward",)
    assert store.get_request(req.id).state is RequestState.PENDING


def test_deciders_must_be_active_users(store: StateStore, world: dict[str, str]) -> None:
    req = request(store)
    with pytest.raises(NotFoundError):
        store.approve(req.id, "ghost")
    store.revoke_user("stella")
    with pytest.raises(PolicyDenied):
        store.deny(req.id, "stella", "no")
    with pytest.raises(NotFoundError):
        store.approve("req-00000000", "sam")


def test_two_stewards_racing_make_exactly_one_decision(
    store: StateStore, world: dict[str, str]
) -> None:
    req = request(store)
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def decide(who: str, approve: bool) -> None:
        barrier.wait()
        try:
            if approve:
                store.approve(req.id, who)
            else:
                store.deny(req.id, who, "no")
            outcomes.append("decided")
        except PolicyDenied:
            outcomes.append("refused")

    threads = [
        threading.Thread(target=decide, args=("sam", True)),
        threading.Thread(target=decide, args=("stella", False)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["decided", "refused"]
    final = store.get_request(req.id)
    assert len(store.list_grants()) == (1 if final.state is RequestState.APPROVED else 0)


def test_grants_drive_the_job_decision_through_expiry_and_revocation(
    store: StateStore, world: dict[str, str]
) -> None:
    ends = T0 + timedelta(days=30)
    g = store.approve(request(store).id, "sam", expires_at=ends)
    pv = store.project_view("readmission")

    def now_decision(now: datetime) -> Any:
        return decide_job_access(job(), pv, store.grants_for("readmission", "cohort"), now)

    allowed = now_decision(T0)
    assert allowed.allowed and allowed.grant_id == g.id
    expired = now_decision(ends)
    assert not expired.allowed and "expired on 2026-03-31" in expired.reason
    store.revoke_grant(g.id, "stella")
    revoked = now_decision(T0)
    assert not revoked.allowed and "revoked" in revoked.reason
    wider = decide_job_access(job(columns=frozenset({"age", "hba1c"})), pv, [g.view()], T0)
    assert wider.missing == ("column hba1c",)


def test_revoking_a_grant_twice_keeps_the_first_time(
    store: StateStore, world: dict[str, str], clock: FrozenClock
) -> None:
    g = store.approve(request(store).id, "sam")
    first = store.revoke_grant(g.id, "sam")
    clock.advance(hours=1)
    assert store.revoke_grant(g.id, "sam").revoked_at == first.revoked_at == T0
    with pytest.raises(NotFoundError):
        store.revoke_grant("grant-00000000", "sam")


def test_timestamps_read_back_aware_utc(store: StateStore, world: dict[str, str]) -> None:
    g = store.approve(request(store).id, "sam", expires_at=T0 + timedelta(days=1))
    for t in (
        g.created_at,
        g.expires_at,
        store.get_user("rita").created_at,
        store.get_dataset("cohort").created_at,
        store.get_project("readmission").created_at,
    ):
        assert isinstance(t, datetime) and t.utcoffset() == timedelta(0)


def test_no_record_dict_carries_a_secret(store: StateStore, world: dict[str, str]) -> None:
    g = store.approve(request(store).id, "sam")
    dicts: list[dict[str, Any]] = [u.to_dict() for u in store.list_users()]
    dicts += [d.to_dict() for d in store.list_datasets()]
    dicts += [p.to_dict() for p in store.list_projects()]
    dicts += [r.to_dict() for r in store.list_requests()] + [g.to_dict()]
    blob = json.dumps(dicts)
    for token in world.values():
        assert token not in blob
        assert hashlib.sha256(token.encode()).hexdigest() not in blob
    assert "token" not in blob and "/zone/datasets" not in blob


def test_records_are_frozen(store: StateStore, world: dict[str, str]) -> None:
    user: User = store.get_user("rita")
    with pytest.raises(AttributeError):
        user.role = Role.STEWARD  # type: ignore[misc]
