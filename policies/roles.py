"""Who may call what: the role x action table.

Every service call is one ``Action``; every identity has one ``Role``; ``PERMISSIONS`` says
which actions each role may call. The table answers "may this *kind* of person ever do
this?" only. Scoping (a researcher sees the budget and jobs of *their own* projects, an
analyst queries only data granted to a project they belong to) is decided afterwards with the
project's members and grants (``policies.decisions``).

The roles (the Five Safes' "safe people"):

- **operator** runs the zone: adds and revokes users and reissues their tokens, reads and
  verifies the audit log, lists and shows what exists (projects, their grants, dataset caps).
  Never touches data, never decides access.
- **steward** governs data: registers and deletes datasets, caps what one person of a
  dataset may be charged across all projects, sets a project's GPU quota, approves or denies
  access requests, reads budgets, released queries and the audit log. Never submits jobs or queries
  (separation of duties: the person who grants access does not also spend it).
- **researcher** owns projects: creates them, adds members and closes them (the project's
  owner only, checked by the service), requests access, develops on dummy data, submits
  training jobs, fetches released results.
- **analyst** explores approved data from a notebook kernel inside the zone, as a member of
  a project: DP queries (``query.run``, charged to the project's ``dp-query`` grant), dummy
  data, released synthetic data and quotes, and submitting, following and cancelling the
  project's jobs (the mission: analysts reach data "only through DP queries, synthetic data
  and job submission"). An analyst does *not* create projects, request access or fit
  synthetic data: those belong to the researcher who owns the project and adds the analyst.

Every role enrols and confirms its own second factor (``user.totp.*``).

``dataset.list`` and ``dataset.show`` for researchers and analysts mean the schema contract
only (``DatasetRecord.to_public_dict``): no storage path, no counts taken from real rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from foundation.errors import PolicyDenied

#: who can change a person's role (the ``grantor`` of a role denial)
ROLE_GRANTOR = "zone operator"


class Role(StrEnum):
    OPERATOR = "operator"
    STEWARD = "steward"
    RESEARCHER = "researcher"
    ANALYST = "analyst"


class Action(StrEnum):
    """One value per service call; the audit log's ``action`` column uses these values."""

    USER_ADD = "user.add"
    USER_REVOKE = "user.revoke"
    USER_LIST = "user.list"
    DATASET_INGEST = "dataset.ingest"
    DATASET_LIST = "dataset.list"
    DATASET_SHOW = "dataset.show"
    PROJECT_CREATE = "project.create"
    PROJECT_LIST = "project.list"
    PROJECT_SHOW = "project.show"
    ACCESS_REQUEST = "access.request"
    ACCESS_LIST = "access.list"
    ACCESS_APPROVE = "access.approve"
    ACCESS_DENY = "access.deny"
    JOB_SUBMIT = "job.submit"
    JOB_LIST = "job.list"
    JOB_STATUS = "job.status"
    JOB_RESULT = "job.result"
    JOB_CANCEL = "job.cancel"
    BUDGET_SHOW = "budget.show"
    AUDIT_LIST = "audit.list"
    AUDIT_VERIFY = "audit.verify"
    SYNTH_DUMMY = "synth.dummy"
    SYNTH_FIT = "synth.fit"
    SYNTH_REPORT = "synth.report"
    SYNTH_RELEASE = "synth.release"
    JOB_QUOTE = "job.quote"
    DATASET_CAP = "dataset.cap"
    ACCESS_REVOKE = "access.revoke"
    PROJECT_MEMBER_ADD = "project.member.add"
    PROJECT_CLOSE = "project.close"
    PROJECT_GPU_QUOTA = "project.gpu_quota"
    USER_REISSUE = "user.reissue"
    DATASET_CAP_SHOW = "dataset.cap.show"
    USER_TOTP_ENROL = "user.totp.enrol"
    USER_TOTP_CONFIRM = "user.totp.confirm"
    DATASET_DELETE = "dataset.delete"
    QUERY_RUN = "query.run"
    QUERY_LIST = "query.list"


_A = Action

# a table reads better with one group of actions per line
# fmt: off
PERMISSIONS: Mapping[Role, frozenset[Action]] = MappingProxyType({
    Role.OPERATOR: frozenset({
        _A.USER_ADD, _A.USER_REVOKE, _A.USER_LIST, _A.USER_REISSUE,
        _A.AUDIT_LIST, _A.AUDIT_VERIFY,
        _A.DATASET_LIST, _A.DATASET_CAP_SHOW,
        _A.PROJECT_LIST, _A.PROJECT_SHOW, _A.ACCESS_LIST, _A.JOB_LIST, _A.JOB_STATUS,
        _A.USER_TOTP_ENROL, _A.USER_TOTP_CONFIRM,  # their own second factor
    }),
    Role.STEWARD: frozenset({
        _A.DATASET_INGEST, _A.DATASET_LIST, _A.DATASET_SHOW,
        _A.DATASET_CAP, _A.DATASET_CAP_SHOW, _A.PROJECT_GPU_QUOTA, _A.DATASET_DELETE,
        _A.ACCESS_LIST, _A.ACCESS_APPROVE, _A.ACCESS_DENY, _A.ACCESS_REVOKE,
        _A.AUDIT_LIST, _A.AUDIT_VERIFY,
        _A.BUDGET_SHOW, _A.QUERY_LIST,
        _A.USER_LIST, _A.PROJECT_LIST, _A.PROJECT_SHOW, _A.JOB_LIST, _A.JOB_STATUS,
        # non-DP synthesizers fit inside the zone for stewards; their output is held
        _A.SYNTH_FIT, _A.SYNTH_REPORT, _A.SYNTH_RELEASE,
        _A.USER_TOTP_ENROL, _A.USER_TOTP_CONFIRM,  # their own second factor
    }),
    Role.RESEARCHER: frozenset({
        _A.DATASET_LIST, _A.DATASET_SHOW,
        _A.PROJECT_CREATE, _A.PROJECT_LIST, _A.PROJECT_SHOW,
        _A.PROJECT_MEMBER_ADD, _A.PROJECT_CLOSE,
        _A.ACCESS_REQUEST, _A.ACCESS_LIST,
        _A.JOB_SUBMIT, _A.JOB_LIST, _A.JOB_STATUS, _A.JOB_RESULT, _A.JOB_CANCEL,
        _A.BUDGET_SHOW,
        _A.SYNTH_DUMMY, _A.SYNTH_FIT, _A.SYNTH_REPORT, _A.JOB_QUOTE,
        _A.QUERY_RUN, _A.QUERY_LIST,
        _A.USER_TOTP_ENROL, _A.USER_TOTP_CONFIRM,  # their own second factor
    }),
    # analysts explore in a notebook kernel: DP queries, dummy and released synthetic data, and
    # jobs in the projects they are members of (they neither create projects nor ask for access)
    Role.ANALYST: frozenset({
        _A.DATASET_LIST, _A.DATASET_SHOW,
        _A.PROJECT_LIST, _A.PROJECT_SHOW,
        _A.ACCESS_LIST,
        _A.JOB_SUBMIT, _A.JOB_LIST, _A.JOB_STATUS, _A.JOB_RESULT, _A.JOB_CANCEL,
        _A.BUDGET_SHOW,
        _A.SYNTH_DUMMY, _A.SYNTH_REPORT, _A.JOB_QUOTE,
        _A.QUERY_RUN, _A.QUERY_LIST,
        _A.USER_TOTP_ENROL, _A.USER_TOTP_CONFIRM,  # their own second factor
    }),
})
# fmt: on


@dataclass(frozen=True)
class Actor:
    """The authenticated caller of one service call: a name and a role, nothing else.

    Built by the service from a token (``Service.authenticate``); every call is decided on
    this value alone, so it crosses process boundaries (a worker, the served API) as a dict.
    """

    name: str
    role: Role

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "role": self.role.value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Actor:
        return cls(name=str(data["name"]), role=Role(str(data["role"])))


def is_allowed(role: Role, action: Action) -> bool:
    """True when ``role`` may call ``action`` at all (scoping is decided elsewhere)."""
    return Action(action) in PERMISSIONS[Role(role)]


def roles_for(action: Action) -> tuple[Role, ...]:
    """The roles that may call ``action``, in ``Role`` order."""
    return tuple(r for r in Role if Action(action) in PERMISSIONS[r])


def require(role: Role, action: Action) -> None:
    """Raise ``PolicyDenied`` unless ``role`` may call ``action``.

    The message names the action, the role, and the roles that may call it.
    """
    role, action = Role(role), Action(action)
    if action in PERMISSIONS[role]:
        return
    able = roles_for(action)
    who = ", ".join(r.value for r in able) if able else "no role"
    raise PolicyDenied(
        f"role {role.value} may not call {action.value}; roles that may: {who}",
        missing=(f"role {' or '.join(r.value for r in able)} for {action.value}",),
        grantor=ROLE_GRANTOR,
    )
