"""The route table: every call a client may make, as data.

One ``Call`` per service method. The server (``sandbox.server``) builds its FastAPI routes
from this table, the thin client (``sandbox.client``) builds its requests from it, and the
authorisation-matrix test walks it. Each call names the ``Action`` the service decides it
under; the HTTP layer decides nothing itself.

An argument's *kind* says how it crosses the wire:

* ``value``    JSON as it is (names, numbers, lists, a quote object)
* ``spec``     a job spec, sent as its dict; the server parses and checks it again
* ``contract`` a schema contract, sent as its dict
* ``upload``   a file on the client's disk, sent as its bytes (base64) and its name
* ``outdir``   a folder on the client's disk: the server writes into a private folder of
               its own and returns the files; the client writes them here
* ``date``     an ISO date or datetime

Path parameters (``{job_id}``) are filled from the arguments of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.roles import Action

VALUE, SPEC, CONTRACT, UPLOAD, OUTDIR, DATE = (
    "value",
    "spec",
    "contract",
    "upload",
    "outdir",
    "date",
)


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str = VALUE
    required: bool = True


@dataclass(frozen=True)
class Call:
    name: str  # the service method
    verb: str  # GET for reads, POST for changes
    path: str
    action: Action
    args: tuple[Arg, ...] = ()
    #: the job runs in the background when served: the call returns the QUEUED record
    background: bool = False
    #: a call that sets up the caller's own second factor: allowed before they have one even
    #: where the zone requires it (``sandbox.service_login``)
    login: bool = False

    @property
    def path_params(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args if "{" + a.name + "}" in self.path)


def _a(*names: str) -> tuple[Arg, ...]:
    """Arguments named ``x`` (required) or ``x?`` (optional), all plain values."""
    return tuple(Arg(n.rstrip("?"), VALUE, not n.endswith("?")) for n in names)


_A = Action
CALLS: tuple[Call, ...] = (
    # users (operator)
    Call("list_users", "GET", "/v1/users", _A.USER_LIST),
    Call("add_user", "POST", "/v1/users", _A.USER_ADD, _a("name", "role", "expires_in?")),
    Call("revoke_user", "POST", "/v1/users/{name}/revoke", _A.USER_REVOKE, _a("name")),
    Call(
        "reissue_token",
        "POST",
        "/v1/users/{name}/reissue",
        _A.USER_REISSUE,
        _a("name", "expires_in?"),
    ),
    # the caller's own second factor (every role)
    Call("totp_enrol", "POST", "/v1/me/totp", _A.USER_TOTP_ENROL, login=True),
    Call(
        "totp_confirm", "POST", "/v1/me/totp/confirm", _A.USER_TOTP_CONFIRM, _a("code"), login=True
    ),
    # datasets
    Call("list_datasets", "GET", "/v1/datasets", _A.DATASET_LIST),
    Call("show_dataset", "GET", "/v1/datasets/{name}", _A.DATASET_SHOW, _a("name", "version?")),
    Call(
        "ingest_dataset",
        "POST",
        "/v1/datasets/{name}",
        _A.DATASET_INGEST,
        (Arg("name"), Arg("source", UPLOAD), Arg("contract", CONTRACT)),
    ),
    Call(
        "ingest_demo",
        "POST",
        "/v1/datasets/{name}/demo",
        _A.DATASET_INGEST,
        _a("name", "patients", "seed?"),
    ),
    Call(
        "set_dataset_cap",
        "POST",
        "/v1/datasets/{dataset}/cap",
        _A.DATASET_CAP,
        _a("dataset", "epsilon", "delta?"),
    ),
    Call("dataset_caps", "GET", "/v1/datasets/{dataset}/caps", _A.DATASET_CAP_SHOW, _a("dataset")),
    Call(
        "delete_dataset",
        "POST",
        "/v1/datasets/{name}/delete",
        _A.DATASET_DELETE,
        _a("name", "version?"),
    ),
    # projects
    Call("list_projects", "GET", "/v1/projects", _A.PROJECT_LIST),
    Call("create_project", "POST", "/v1/projects", _A.PROJECT_CREATE, _a("name", "purpose")),
    Call("show_project", "GET", "/v1/projects/{name}", _A.PROJECT_SHOW, _a("name")),
    Call(
        "set_gpu_quota",
        "POST",
        "/v1/projects/{project}/gpu-quota",
        _A.PROJECT_GPU_QUOTA,
        _a("project", "gpus?"),
    ),
    Call(
        "add_project_member",
        "POST",
        "/v1/projects/{project}/members",
        _A.PROJECT_MEMBER_ADD,
        _a("project", "user"),
    ),
    Call("close_project", "POST", "/v1/projects/{name}/close", _A.PROJECT_CLOSE, _a("name")),
    # access
    Call(
        "request_access",
        "POST",
        "/v1/access/requests",
        _A.ACCESS_REQUEST,
        _a(
            "project",
            "dataset",
            "columns",
            "mechanisms",
            "epsilon",
            "delta",
            "quote?",
            "dataset_version?",
        ),
    ),
    Call("list_requests", "GET", "/v1/access/requests", _A.ACCESS_LIST, _a("pending_only?")),
    Call(
        "show_request",
        "GET",
        "/v1/access/requests/{request_id}",
        _A.ACCESS_LIST,
        _a("request_id"),
    ),
    Call(
        "approve",
        "POST",
        "/v1/access/requests/{request_id}/approve",
        _A.ACCESS_APPROVE,
        (*_a("request_id", "epsilon?", "delta?"), Arg("expires_at", DATE, False)),
    ),
    Call(
        "deny",
        "POST",
        "/v1/access/requests/{request_id}/deny",
        _A.ACCESS_DENY,
        _a("request_id", "reason"),
    ),
    Call("list_grants", "GET", "/v1/access/grants", _A.ACCESS_LIST, _a("project?", "dataset?")),
    Call(
        "revoke_grant",
        "POST",
        "/v1/access/grants/{grant_id}/revoke",
        _A.ACCESS_REVOKE,
        _a("grant_id"),
    ),
    # jobs
    Call("submit", "POST", "/v1/jobs", _A.JOB_SUBMIT, (Arg("spec", SPEC),), background=True),
    Call("list_jobs", "GET", "/v1/jobs", _A.JOB_LIST),
    Call("job_status", "GET", "/v1/jobs/{job_id}", _A.JOB_STATUS, _a("job_id")),
    Call("cancel_job", "POST", "/v1/jobs/{job_id}/cancel", _A.JOB_CANCEL, _a("job_id")),
    Call(
        "job_result",
        "POST",
        "/v1/jobs/{job_id}/result",
        _A.JOB_RESULT,
        (Arg("job_id"), Arg("out", OUTDIR)),
    ),
    Call(
        "dry_run",
        "POST",
        "/v1/dry-runs",
        _A.JOB_QUOTE,
        (Arg("spec", SPEC), Arg("on")),
    ),
    # for_request: a quote to attach to an access request (missing grant or budget listed)
    Call(
        "quote",
        "POST",
        "/v1/quotes",
        _A.JOB_QUOTE,
        (Arg("spec", SPEC), Arg("for_request", VALUE, False)),
    ),
    # the search for a spec's "auto" hyperparameters on free rows (charges nothing)
    Call("tune", "POST", "/v1/tunes", _A.JOB_QUOTE, (Arg("spec", SPEC), Arg("on", VALUE, False))),
    Call(
        "quote_curve",
        "POST",
        "/v1/quotes/curve",
        _A.JOB_QUOTE,
        (Arg("spec", SPEC), Arg("on"), Arg("out_dir", OUTDIR)),
    ),
    # synthetic data
    Call(
        "synth_dummy",
        "POST",
        "/v1/synth/dummy",
        _A.SYNTH_DUMMY,
        (*_a("dataset", "rows"), Arg("out", OUTDIR), *_a("seed?")),
    ),
    Call(
        "synth_fit",
        "POST",
        "/v1/synth/fits",
        _A.SYNTH_FIT,
        _a(
            "project",
            "dataset",
            "epsilon",
            "delta?",
            "method?",
            "rows?",
            "seed?",
            "columns?",
            "label?",
        ),
        background=True,
    ),
    Call("synth_report", "GET", "/v1/synth/{job_id}/report", _A.SYNTH_REPORT, _a("job_id")),
    Call(
        "synth_release",
        "POST",
        "/v1/synth/{job_id}/release",
        _A.SYNTH_RELEASE,
        _a("job_id", "rows?"),
    ),
    # budget and audit
    Call("budget", "GET", "/v1/projects/{project}/budget", _A.BUDGET_SHOW, _a("project")),
    # analysts' DP queries (answered in the service; ``dry`` only quotes)
    Call(
        "run_query",
        "POST",
        "/v1/projects/{project}/queries",
        _A.QUERY_RUN,
        _a("project", "query", "dry?"),
    ),
    Call("list_queries", "GET", "/v1/projects/{project}/queries", _A.QUERY_LIST, _a("project")),
    Call("audit_list", "GET", "/v1/audit", _A.AUDIT_LIST, _a("limit?")),
    Call("audit_verify", "POST", "/v1/audit/verify", _A.AUDIT_VERIFY),
)

BY_NAME: dict[str, Call] = {c.name: c for c in CALLS}

#: the largest upload or returned file set, in bytes (a release is weights and two JSONs)
MAX_TRANSFER_BYTES = 256 * 1024 * 1024

#: stands for the client's output folder in a result (a path inside the zone never leaves)
OUT_MARK = "{out}"
