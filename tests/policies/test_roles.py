"""The role x action table, checked whole against an independent expected grid."""

from __future__ import annotations

import itertools

import pytest

from foundation.errors import PolicyDenied
from policies.roles import PERMISSIONS, Action, Role, is_allowed, require, roles_for

# Written out by hand from the design (roles.py's docstring), not derived from PERMISSIONS.
# x = allowed, . = refused
EXPECTED_GRID = """
action              operator steward researcher analyst
user.add            x        .       .          .
user.revoke         x        .       .          .
user.list           x        x       .          .
user.reissue        x        .       .          .
user.totp.enrol     x        x       x          x
user.totp.confirm   x        x       x          x
dataset.ingest      .        x       .          .
dataset.list        x        x       x          x
dataset.show        .        x       x          x
dataset.cap         .        x       .          .
dataset.cap.show    x        x       .          .
dataset.delete      .        x       .          .
project.create      .        .       x          .
project.list        x        x       x          x
project.show        x        x       x          x
project.member.add  .        .       x          .
project.close       .        .       x          .
project.gpu_quota   .        x       .          .
access.request      .        .       x          .
access.list         x        x       x          x
access.approve      .        x       .          .
access.deny         .        x       .          .
access.revoke       .        x       .          .
job.submit          .        .       x          x
job.list            x        x       x          x
job.status          x        x       x          x
job.result          .        .       x          x
job.cancel          .        .       x          x
budget.show         .        x       x          x
audit.list          x        x       .          .
audit.verify        x        x       .          .
synth.dummy         .        .       x          x
synth.fit           .        x       x          .
synth.report        .        x       x          x
synth.release       .        x       .          .
job.quote           .        .       x          x
query.run           .        .       x          x
query.list          .        x       x          x
"""


def _expected() -> dict[tuple[str, str], bool]:
    lines = [ln.split() for ln in EXPECTED_GRID.strip().splitlines()]
    header, rows = lines[0][1:], lines[1:]
    out = {}
    for row in rows:
        action, marks = row[0], row[1:]
        assert len(marks) == len(header), row
        for role, mark in zip(header, marks, strict=True):
            assert mark in {"x", "."}, row
            out[(role, action)] = mark == "x"
    return out


EXPECTED = _expected()


def test_grid_names_every_role_and_every_action_exactly_once() -> None:
    assert {r for r, _ in EXPECTED} == {r.value for r in Role}
    assert {a for _, a in EXPECTED} == {a.value for a in Action}
    assert len(EXPECTED) == len(Role) * len(Action)


def test_table_has_every_role_and_only_known_actions() -> None:
    assert set(PERMISSIONS) == set(Role)
    for actions in PERMISSIONS.values():
        assert actions <= set(Action)


@pytest.mark.parametrize(("role", "action"), list(itertools.product(Role, Action)))
def test_every_role_x_action(role: Role, action: Action) -> None:
    want = EXPECTED[(role.value, action.value)]
    assert is_allowed(role, action) is want
    if want:
        require(role, action)
    else:
        with pytest.raises(PolicyDenied):
            require(role, action)


def test_action_values_are_the_service_calls() -> None:
    assert [a.value for a in Action] == [
        "user.add", "user.revoke", "user.list",
        "dataset.ingest", "dataset.list", "dataset.show",
        "project.create", "project.list", "project.show",
        "access.request", "access.list", "access.approve", "access.deny",
        "job.submit", "job.list", "job.status", "job.result", "job.cancel",
        "budget.show", "audit.list", "audit.verify", "synth.dummy",
        "synth.fit", "synth.report", "synth.release", "job.quote", "dataset.cap",
        "access.revoke", "project.member.add", "project.close", "project.gpu_quota",
        "user.reissue", "dataset.cap.show", "user.totp.enrol", "user.totp.confirm",
        "dataset.delete", "query.run", "query.list",
    ]  # fmt: skip


def test_separation_of_duties() -> None:
    # who grants access never spends it; who runs the zone never decides access or sees data
    for spend in (Action.JOB_SUBMIT, Action.JOB_CANCEL, Action.ACCESS_REQUEST, Action.QUERY_RUN):
        assert not is_allowed(Role.STEWARD, spend)
        assert not is_allowed(Role.OPERATOR, spend)
    for decide in (
        Action.ACCESS_APPROVE,
        Action.ACCESS_DENY,
        Action.DATASET_INGEST,
        Action.DATASET_CAP,
        Action.ACCESS_REVOKE,
    ):
        assert roles_for(decide) == (Role.STEWARD,)


def test_every_action_has_someone_who_may_call_it() -> None:
    for action in Action:
        assert roles_for(action), action


def test_denial_names_action_role_and_who_can() -> None:
    with pytest.raises(PolicyDenied) as info:
        require(Role.RESEARCHER, Action.ACCESS_APPROVE)
    err = info.value
    assert "access.approve" in str(err)
    assert "researcher" in err.reason
    assert "roles that may: steward" in err.reason
    assert err.missing == ("role steward for access.approve",)
    assert err.grantor == "zone operator"


def test_denial_lists_every_role_that_may() -> None:
    with pytest.raises(PolicyDenied) as info:
        require(Role.STEWARD, Action.JOB_RESULT)
    assert "roles that may: researcher, analyst" in info.value.reason


def test_plain_strings_work_as_roles_and_actions() -> None:
    assert is_allowed("steward", "access.approve")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        is_allowed("admin", "user.add")  # type: ignore[arg-type]


def test_table_cannot_be_edited_at_runtime() -> None:
    with pytest.raises(TypeError):
        PERMISSIONS[Role.ANALYST] = frozenset(Action)  # type: ignore[index]
