"""Access decisions: examples for every reason, and hypothesis properties for the invariants."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from foundation.errors import PolicyDenied, SpecError
from policies.decisions import (
    PROJECT_TRANSITIONS,
    REQUEST_TRANSITIONS,
    Decision,
    GrantView,
    JobAccessRequest,
    Mechanism,
    NewAccessRequest,
    ProjectStatus,
    ProjectView,
    RequestState,
    check_budget,
    check_project_transition,
    check_request_transition,
    decide_access_request,
    decide_job_access,
    parse_mechanisms,
)
from policies.roles import Action, Role

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
COLUMNS = frozenset({"age", "sex", "hba1c", "readmitted"})


# -- factories (overrides by keyword) -----------------------------------------------------------


def grant(**over: Any) -> GrantView:
    base = GrantView(
        grant_id="grant-00000001",
        project="readmission",
        dataset="cohort",
        columns=COLUMNS,
        mechanisms=frozenset({Mechanism.DP_SGD}),
        epsilon=5.0,
        delta=1e-5,
        expires_at=NOW + timedelta(days=30),
        revoked=False,
    )
    return replace(base, **over)


def project(**over: Any) -> ProjectView:
    base = ProjectView(
        name="readmission",
        owner="rita",
        members=frozenset({"rita", "ana"}),
        status=ProjectStatus.ACTIVE,
    )
    return replace(base, **over)


def job(**over: Any) -> JobAccessRequest:
    base = JobAccessRequest(
        user="rita",
        role=Role.RESEARCHER,
        project="readmission",
        dataset="cohort",
        columns=frozenset({"age", "readmitted"}),
        mechanism=Mechanism.DP_SGD,
        epsilon=1.0,
        delta=1e-6,
    )
    return replace(base, **over)


def new_request(**over: Any) -> NewAccessRequest:
    base = NewAccessRequest(
        user="rita",
        role=Role.RESEARCHER,
        project="readmission",
        dataset="cohort",
        columns=frozenset({"age", "readmitted"}),
        mechanisms=frozenset({Mechanism.DP_SGD}),
        epsilon=2.0,
        delta=1e-5,
    )
    return replace(base, **over)


def decide(
    req: JobAccessRequest | None = None, grants: list[GrantView] | None = None, **kw: Any
) -> Decision:
    return decide_job_access(
        req or job(),
        kw.get("project_view", project()),
        [grant()] if grants is None else grants,
        kw.get("now", NOW),
    )


# -- job access: examples ------------------------------------------------------------------------


def test_covering_grant_allows_and_names_it() -> None:
    d = decide()
    assert d.allowed
    assert d.grant_id == "grant-00000001"
    assert d.missing == () and d.grantor == ""
    d.raise_if_denied()  # no-op


def test_role_that_may_not_submit_is_denied() -> None:
    d = decide(job(role=Role.STEWARD, user="ana"))
    assert not d.allowed
    assert d.missing == ("role researcher or analyst for job.submit",)
    assert d.grantor == "zone operator"
    assert "steward" in d.reason


def test_action_is_what_the_role_is_checked_against() -> None:
    g = grant(mechanisms=frozenset({Mechanism.SYNTHETIC}))
    with_sam = project(members=frozenset({"rita", "ana", "sam"}))
    fit = job(user="sam", role=Role.STEWARD, mechanism=Mechanism.SYNTHETIC, action=Action.SYNTH_FIT)
    assert decide(fit, [g], project_view=with_sam).allowed
    submit = replace(fit, action=Action.JOB_SUBMIT)
    assert decide(submit, [g], project_view=with_sam).missing == (
        "role researcher or analyst for job.submit",
    )
    ana = job(user="ana", role=Role.ANALYST, mechanism=Mechanism.SYNTHETIC, action=Action.SYNTH_FIT)
    assert decide(ana, [g]).missing == ("role steward or researcher for synth.fit",)


def test_non_member_is_denied_and_told_to_ask_the_owner() -> None:
    d = decide(job(user="mallory"))
    assert not d.allowed
    assert d.missing == ("membership of project readmission",)
    assert d.grantor == "project owner (rita)"


def test_closed_project_is_denied() -> None:
    d = decide(project_view=project(status=ProjectStatus.CLOSED))
    assert not d.allowed
    assert "closed" in d.reason


def test_no_grant_at_all() -> None:
    d = decide(grants=[])
    assert not d.allowed
    assert d.missing == ("grant of dp-sgd on dataset cohort",)
    assert d.grantor == "data steward"


def test_grants_for_other_projects_and_datasets_do_not_count() -> None:
    d = decide(grants=[grant(project="other"), grant(dataset="other")])
    assert not d.allowed
    assert "has no access grant" in d.reason


def test_missing_columns_are_named_exactly() -> None:
    d = decide(job(columns=frozenset({"age", "zip", "bmi"})))
    assert not d.allowed
    assert d.missing == ("column bmi", "column zip")
    assert d.grantor == "data steward"
    assert "grant-00000001" in d.reason


def test_missing_mechanism_is_named_exactly() -> None:
    d = decide(job(mechanism=Mechanism.FEDERATED))
    assert d.missing == ("mechanism federated",)


def test_missing_mechanism_and_column_together() -> None:
    d = decide(job(mechanism=Mechanism.SYNTHETIC, columns=frozenset({"age", "zip"})))
    assert d.missing == ("mechanism synthetic", "column zip")


def test_the_closest_grant_is_the_one_reported() -> None:
    far = grant(grant_id="grant-a", columns=frozenset({"age"}))
    near = grant(grant_id="grant-b", columns=frozenset({"age", "sex", "hba1c"}))
    d = decide(job(columns=frozenset({"age", "sex", "hba1c", "zip"})), [far, near])
    assert d.missing == ("column zip",)
    assert "grant-b" in d.reason


def test_grants_are_not_unioned() -> None:
    left = grant(grant_id="grant-a", columns=frozenset({"age"}))
    right = grant(grant_id="grant-b", columns=frozenset({"readmitted"}))
    assert not decide(grants=[left, right]).allowed
    assert decide(grants=[left, right, grant(grant_id="grant-c")]).allowed


def test_expired_grant_names_the_date() -> None:
    ended = datetime(2026, 2, 1, 0, 0, tzinfo=UTC)
    d = decide(grants=[grant(expires_at=ended)])
    assert not d.allowed
    assert "expired on 2026-02-01 00:00 UTC" in d.reason
    assert d.missing == ("unexpired grant on dataset cohort (renewal of grant-00000001)",)
    assert d.grantor == "data steward"


def test_a_grant_expires_at_its_expiry_instant() -> None:
    g = grant(expires_at=NOW)
    assert not decide(grants=[g], now=NOW).allowed
    assert decide(grants=[g], now=NOW - timedelta(microseconds=1)).allowed


def test_no_expiry_never_expires() -> None:
    assert decide(grants=[grant(expires_at=None)], now=NOW + timedelta(days=10_000)).allowed


def test_revoked_grant_is_denied() -> None:
    d = decide(grants=[grant(revoked=True, expires_at=None)])
    assert not d.allowed
    assert "revoked" in d.reason


def test_a_live_grant_wins_over_an_expired_one() -> None:
    old = grant(grant_id="grant-a", expires_at=NOW - timedelta(days=1))
    new = grant(grant_id="grant-b")
    d = decide(grants=[old, new])
    assert d.allowed and d.grant_id == "grant-b"


def test_only_dead_partial_grants_say_so() -> None:
    dead = grant(columns=frozenset({"age"}), expires_at=NOW - timedelta(days=1))
    d = decide(grants=[dead])
    assert d.missing == ("column readmitted", "unexpired, unrevoked grant on dataset cohort")


def test_request_for_another_project_than_the_view_is_a_bug() -> None:
    with pytest.raises(SpecError) as info:
        decide(project_view=project(name="other"))
    assert info.value.field == "project"


def test_raise_if_denied_carries_missing_and_grantor() -> None:
    d = decide(job(columns=frozenset({"zip"})))
    with pytest.raises(PolicyDenied) as info:
        d.raise_if_denied()
    assert info.value.missing == ("column zip",)
    assert "ask a data steward" in str(info.value)


# -- new access requests ---------------------------------------------------------------------------


def check_new(req: NewAccessRequest | None = None, **kw: Any) -> Decision:
    return decide_access_request(
        req or new_request(), kw.get("project_view", project()), kw.get("known", COLUMNS)
    )


def test_valid_request_may_be_filed() -> None:
    assert check_new().allowed


def test_unknown_columns_are_named_with_the_known_ones() -> None:
    d = check_new(new_request(columns=frozenset({"age", "zip", "bmi"})))
    assert not d.allowed
    (p,) = d.problems
    assert p.field == "columns"
    assert "bmi, zip" in p.problem
    assert "age, hba1c, readmitted, sex" in p.fix
    with pytest.raises(SpecError) as info:
        d.raise_if_denied()
    assert info.value.field == "columns"


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"columns": frozenset()}, "columns"),
        ({"mechanisms": frozenset()}, "mechanisms"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"epsilon": math.inf}, "epsilon"),
        ({"epsilon": math.nan}, "epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": 1.5}, "delta"),
        ({"delta": math.nan}, "delta"),
    ],
)
def test_each_invalid_field_is_named(over: dict[str, Any], field: str) -> None:
    d = check_new(new_request(**over))
    assert not d.allowed
    assert [p.field for p in d.problems] == [field]
    assert d.problems[0].fix


def test_every_problem_is_reported_at_once() -> None:
    d = check_new(new_request(columns=frozenset({"zip"}), epsilon=0.0, delta=2.0))
    assert [p.field for p in d.problems] == ["columns", "epsilon", "delta"]
    assert d.missing == ("columns", "epsilon", "delta")


def test_analyst_may_not_request_access() -> None:
    d = check_new(new_request(user="ana", role=Role.ANALYST))
    assert not d.allowed and not d.problems
    assert d.missing == ("role researcher for access.request",)


def test_non_member_may_not_request_access() -> None:
    d = check_new(new_request(user="mallory"))
    assert d.missing == ("membership of project readmission",)
    with pytest.raises(PolicyDenied):
        d.raise_if_denied()


def test_check_budget() -> None:
    assert check_budget(1.0, 1e-5) == ()
    assert [p.field for p in check_budget(0, 0)] == ["epsilon", "delta"]


def test_parse_mechanisms() -> None:
    assert parse_mechanisms(["dp-sgd", Mechanism.FEDERATED, "dp-sgd"]) == {
        Mechanism.DP_SGD,
        Mechanism.FEDERATED,
    }
    with pytest.raises(SpecError) as info:
        parse_mechanisms(["dp_sgd"])
    assert info.value.field == "mechanisms"
    assert "dp-sgd" in info.value.fix


# -- state transitions ---------------------------------------------------------------------------


def test_request_transitions_are_exactly_pending_to_decided() -> None:
    allowed = {
        (RequestState.PENDING, RequestState.APPROVED),
        (RequestState.PENDING, RequestState.DENIED),
    }
    assert allowed == REQUEST_TRANSITIONS
    for a, b in itertools.product(RequestState, RequestState):
        if (a, b) in allowed:
            check_request_transition("req-1", a, b)
        else:
            with pytest.raises(PolicyDenied) as info:
                check_request_transition("req-1", a, b)
            assert "req-1" in str(info.value) and a.value in str(info.value)


def test_project_transitions() -> None:
    assert {(ProjectStatus.ACTIVE, ProjectStatus.CLOSED)} == PROJECT_TRANSITIONS
    check_project_transition("p", ProjectStatus.ACTIVE, ProjectStatus.CLOSED)
    with pytest.raises(PolicyDenied):
        check_project_transition("p", ProjectStatus.CLOSED, ProjectStatus.ACTIVE)


def test_values_are_frozen() -> None:
    with pytest.raises(AttributeError):
        grant().revoked = True  # type: ignore[misc]
    with pytest.raises(AttributeError):
        decide().allowed = False  # type: ignore[misc]


# -- properties ------------------------------------------------------------------------------------

COLUMN_POOL = ["a", "b", "c", "d", "e"]
columns_st = st.frozensets(st.sampled_from(COLUMN_POOL))
mechanisms_st = st.frozensets(st.sampled_from(list(Mechanism)))
expiry_st = st.one_of(st.none(), st.integers(-5, 5).map(lambda d: NOW + timedelta(days=d)))


@st.composite
def grants_st(draw: st.DrawFn) -> GrantView:
    return GrantView(
        grant_id=f"grant-{draw(st.integers(0, 10**6)):08x}",
        project=draw(st.sampled_from(["p", "p", "p", "q"])),
        dataset=draw(st.sampled_from(["d", "d", "d", "e"])),
        columns=draw(columns_st),
        mechanisms=draw(mechanisms_st),
        epsilon=1.0,
        delta=1e-5,
        expires_at=draw(expiry_st),
        revoked=draw(st.booleans()),
    )


@st.composite
def jobs_st(draw: st.DrawFn) -> JobAccessRequest:
    return JobAccessRequest(
        user="u",
        role=Role.RESEARCHER,
        project="p",
        dataset="d",
        columns=draw(columns_st),
        mechanism=draw(st.sampled_from(list(Mechanism))),
        epsilon=1.0,
        delta=1e-6,
    )


PV = ProjectView("p", "u", frozenset({"u"}), ProjectStatus.ACTIVE)
grant_lists = st.lists(grants_st(), max_size=6)


def oracle(req: JobAccessRequest, grants: list[GrantView], now: datetime) -> bool:
    """The rule, written independently: one live grant for this project+dataset covers it."""
    return any(
        g.project == req.project
        and g.dataset == req.dataset
        and not g.revoked
        and (g.expires_at is None or now < g.expires_at)
        and req.mechanism in g.mechanisms
        and req.columns <= g.columns
        for g in grants
    )


@given(jobs_st(), grant_lists)
def test_property_decision_matches_the_rule(req: JobAccessRequest, grants: list[GrantView]) -> None:
    d = decide_job_access(req, PV, grants, NOW)
    assert d.allowed == oracle(req, grants, NOW)
    if d.allowed:
        assert d.grant_id is not None and d.missing == ()
    else:
        assert d.grant_id is None and d.missing and d.grantor


@given(grants_st(), jobs_st(), st.sampled_from(COLUMN_POOL + ["zz"]))
def test_property_missing_any_column_is_denied_and_named(
    g: GrantView, req: JobAccessRequest, extra: str
) -> None:
    g = replace(g, project="p", dataset="d", revoked=False, expires_at=None)
    if extra in g.columns:
        return
    req = replace(req, columns=req.columns | {extra})
    d = decide_job_access(req, PV, [g], NOW)
    assert not d.allowed
    assert f"column {extra}" in d.missing


@given(grants_st(), jobs_st())
def test_property_missing_mechanism_is_denied_and_named(
    g: GrantView, req: JobAccessRequest
) -> None:
    g = replace(g, project="p", dataset="d", revoked=False, expires_at=None)
    g = replace(g, mechanisms=g.mechanisms - {req.mechanism})
    d = decide_job_access(req, PV, [g], NOW)
    assert not d.allowed
    assert f"mechanism {req.mechanism.value}" in d.missing


@given(jobs_st(), grant_lists, grant_lists)
def test_property_adding_grants_never_turns_allow_into_deny(
    req: JobAccessRequest, grants: list[GrantView], more: list[GrantView]
) -> None:
    if decide_job_access(req, PV, grants, NOW).allowed:
        assert decide_job_access(req, PV, grants + more, NOW).allowed
        assert decide_job_access(req, PV, more + grants, NOW).allowed


@given(jobs_st(), grant_lists, st.integers(0, 10))
def test_property_only_time_passing_takes_access_away(
    req: JobAccessRequest, grants: list[GrantView], days: int
) -> None:
    later = NOW + timedelta(days=days)
    if decide_job_access(req, PV, grants, later).allowed:
        assert decide_job_access(req, PV, grants, NOW).allowed


@given(jobs_st(), grant_lists, st.randoms(use_true_random=False))
def test_property_pure_and_order_independent(
    req: JobAccessRequest, grants: list[GrantView], rnd: Any
) -> None:
    first = decide_job_access(req, PV, grants, NOW)
    assert decide_job_access(req, PV, list(grants), NOW) == first
    shuffled = list(grants)
    rnd.shuffle(shuffled)
    assert decide_job_access(req, PV, shuffled, NOW) == first


@given(
    columns_st,
    mechanisms_st,
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(allow_nan=True, allow_infinity=True),
)
def test_property_new_request_rule(
    cols: frozenset[str], mechs: frozenset[Mechanism], eps: float, delta: float
) -> None:
    known = frozenset(COLUMN_POOL[:3])
    req = NewAccessRequest("u", Role.RESEARCHER, "p", "d", cols, mechs, eps, delta)
    d = decide_access_request(req, PV, known)
    valid = (
        bool(cols)
        and cols <= known
        and bool(mechs)
        and math.isfinite(eps)
        and eps > 0
        and 0 < delta < 1
    )
    assert d.allowed == valid
    assert d == decide_access_request(req, PV, known)
