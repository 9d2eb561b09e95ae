"""What admission checks and plans for a spec-driven job (DP-SGD, its dry runs and quotes,
the hyperparameter search, federated jobs): its columns against the contract, the access
decision (chokepoint 1), the batch against a public size, and the accountant's plan on the
training split's size the service knows (``persons x TRAIN_FRACTION``).

``sandbox.mechanisms.dpsgd`` re-exports these names; they live here so that the search
(``sandbox.mechanisms.tuning``), which plans exactly as admission does, and the DP-SGD
mechanism, which runs the search at admission, import them without a circle.
"""

from __future__ import annotations

from typing import Any

from connectors.schema import SchemaContract
from foundation.errors import PolicyDenied, SpecError
from policies.decisions import JobAccessRequest, Mechanism, decide_job_access
from policies.roles import Actor
from sandbox.context import ZoneContext
from sandbox.jobspec import JobSpec
from sandbox.spec_fields import resolved
from sandbox.worker import EVAL_SHARE

#: the reader's person split: the train part is what DP-SGD trains on
TRAIN_FRACTION = 0.8


def check_columns(spec: JobSpec, contract: SchemaContract) -> None:
    known = {c.name for c in contract.columns}
    for field_name, cols in (("features", spec.features), ("label", (spec.label,))):
        for c in cols:
            if c not in known:
                raise SpecError(
                    field_name,
                    f"column {c!r} is not in dataset {spec.dataset!r}",
                    f"known columns: {', '.join(sorted(known))}",
                )
    if spec.label not in contract.label_names():
        raise SpecError(
            "label",
            f"column {spec.label!r} is not a label in the schema contract",
            f"labels: {', '.join(contract.label_names())}",
        )


def decide(ctx: ZoneContext, actor: Actor, spec: JobSpec, mechanism: Mechanism) -> str:
    """Chokepoint 1: the access decision, before anything is reserved or opened."""
    decision = decide_job_access(
        JobAccessRequest(
            user=actor.name,
            role=actor.role,
            project=spec.project,
            dataset=spec.dataset,
            columns=spec.columns,
            mechanism=mechanism,
            epsilon=spec.privacy.epsilon,
            delta=spec.privacy.delta,
        ),
        ctx.store.project_view(spec.project),
        ctx.store.grants_for(spec.project, spec.dataset),
        ctx.clock(),
    )
    if not decision.allowed:
        raise PolicyDenied(decision.reason, missing=decision.missing, grantor=decision.grantor)
    return decision.grant_id or ""


def check_batch_size(spec: JobSpec, dataset: Any) -> None:
    """Refuse a batch larger than the training split before anything is reserved, when the
    counts are public (with private counts this check would be a free oracle on the exact
    size: the worker checks after reading instead, and the job is charged)."""
    if not dataset.counts_public:
        return
    n_train = int(dataset.persons * TRAIN_FRACTION)
    if resolved(spec.training.batch_size, "training.batch_size") > n_train:
        raise SpecError(
            "training.batch_size",
            f"is larger than the training split ({n_train} persons)",
            f"set batch_size <= {n_train}",
        )


def disjoint_eval(dataset: Any) -> bool:
    """Whether a DP-SGD job's evaluation reads only persons its training never reads: the
    reader splits by a hash of each person's pseudonym when the contract has an identifier
    column (``connectors.reader``), a rule of the person alone, so the two releases compose
    in parallel (``privacy.accountant.epsilon_parallel``). Without one the split is by row
    position, which other persons move: they compose sequentially."""
    return SchemaContract.from_dict(dataset.contract).identifier is not None


def plan_spec(spec: JobSpec, n_train: int, *, disjoint: bool) -> Any:
    """The accountant's plan (``privacy.job_plan.JobPlan``) for a DP-SGD ``spec`` on
    ``n_train`` training persons: the one planning the submit, the quote and dry runs share.
    ``disjoint``: ``disjoint_eval`` of the dataset."""
    from privacy.job_plan import plan_job

    return plan_job(
        spec.privacy.epsilon,
        spec.privacy.delta,
        n_train,
        # an "auto" spec is resolved before it is planned (``sandbox.tuning``)
        resolved(spec.training.batch_size, "training.batch_size"),
        resolved(spec.training.epochs, "training.epochs"),
        # privacy.evaluate = false: no evaluation release, its share goes to training
        evaluate=spec.privacy.evaluate,
        eval_share=EVAL_SHARE,
        disjoint_eval=disjoint,
    )


def service_plan(
    spec: JobSpec, n_train: int, *, counts_public: bool, disjoint: bool
) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
    """The service's plan for ``spec`` on ``n_train`` training persons: ``(plan, None)``
    (``disjoint``: ``disjoint_eval`` of the dataset).

    A spec the planner refuses for this size (a batch above the split, delta >= 1/n, a
    target no noise reaches) is refused now when the size is public. With private counts
    that refusal would be a free oracle on the exact size: the job is admitted and charged
    like one whose batch is too large, and ``(None, error)`` carries the refusal (its
    field and fix; the problem without the size) for the worker to raise after reading."""
    from privacy import accountant

    # refusals that do not depend on the size stay free
    accountant._check_epsilon(spec.privacy.epsilon)
    accountant._check_delta(spec.privacy.delta)
    try:
        dp = plan_spec(spec, n_train, disjoint=disjoint)
    except SpecError as exc:
        if counts_public:
            raise
        problem = "cannot be met on this dataset's training split (its size is private)"
        return None, {"field": exc.field, "problem": problem, "fix": exc.fix}
    return dp.to_dict(), None


def n_train_of(dataset: Any) -> int:
    """The training split's size the service plans with (the split itself is drawn per
    person by the reader; the plan's sample rate bounds the run whatever its exact size)."""
    return int(dataset.persons * TRAIN_FRACTION)


def spec_mechanism(spec: JobSpec) -> str:
    """The grant mechanism a training spec runs under (``federated`` or ``dp-sgd``)."""
    return "federated" if spec.federated is not None else "dp-sgd"
