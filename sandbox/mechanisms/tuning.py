"""Hyperparameters chosen for free: the search that resolves a spec's ``"auto"`` fields.

A DP-SGD spec may leave ``lr``, ``epochs``, ``batch_size`` and ``max_grad_norm`` out or write
``"auto"`` (``sandbox.jobspec``). Before such a spec is planned (a submit's admission, a
quote, a dry run) or when ``sandbox tune`` asks, :func:`resolve` picks them:

1. The rule (``training.autotune``) makes a prior and a small grid around it from public
   numbers only: the training split's size the zone plans with (the dataset's public count
   x ``TRAIN_FRACTION``; with private counts the fixed :data:`ASSUMED_N_TRAIN`, never the
   exact count: chokepoint 10), the optimizer and the fields the spec wrote.
2. Each candidate is planned exactly as admission would plan the job (``plan_spec``: the
   same epsilon, delta and composition with the evaluation on that size) and trained on free rows
   (``free_data``: the project's released DP synthetic table, else dummy rows from the
   contract; at most :data:`FREE_TRAIN_ROWS` to train, up to :data:`FREE_TEST_ROWS` more
   held out, so the scores' standard errors are ~0.01-0.02) with the plan's steps
   and the plan's noise per averaged gradient (``sigma C / B``; a batch above
   :data:`SIM_MAX_BATCH` or the free rows is simulated at a smaller batch with ``sigma``
   scaled alike, Sander et al. 2023), :data:`REPEATS` times; its mean AUROC on the held-out
   free rows is its score.
3. When some candidate learned on the free rows, ``training.autotune.combined`` adds one
   more (each field's best move); then ``choose`` picks (no signal, or the prior within one
   standard error of the best, keeps the prior). The chosen values are written into
   the spec; the record (:class:`Tuning`) goes into the job's result and its model card.

Nothing here opens a real row: no ``DatasetHandle``, no reader, no ledger, no job row. The
search's noise is seeded from the spec's seed (its rows are not real, so its noise need not
be secret, and the same spec resolves the same way everywhere); a charged run's noise comes
from its own secret (``sandbox.worker.noise_seed``) and is never this.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from foundation.errors import SpecError
from policies.store_records import DatasetRecord
from sandbox.context import ZoneContext
from sandbox.jobspec import JobSpec
from sandbox.mechanisms.dpsgd_plan import (
    TRAIN_FRACTION,
    disjoint_eval,
    n_train_of,
    plan_spec,
    spec_mechanism,
)
from sandbox.mechanisms.free_data import default_source, free_table
from training.autotune import FIELDS, Hyper, auroc_se, candidates, choose, combined, learned

#: the most free rows the search trains on, and scores on (a synthetic table is subsampled;
#: a small one is split 80/20). Training cost grows with the first, scoring is nearly free
FREE_TRAIN_ROWS, FREE_TEST_ROWS = 1600, 2400
#: the training split the rule and the search assume when the dataset's counts are private
#: (a fixed, public figure: the exact count must not steer what a researcher sees). The
#: rule's batch for it is 125 and the search's largest 250, so a private table whose
#: training split is smaller fails after reading, charged, like any batch too large
ASSUMED_N_TRAIN = 1000
#: the largest batch a simulated step draws; a larger one keeps its noise-to-batch ratio
SIM_MAX_BATCH = 256
#: the longest schedule the search simulates (the rule's own stay under ~1,200 steps; a
#: longer one the spec wrote is not searched: the prior is kept)
MAX_SIM_STEPS = 2000
#: training runs per candidate (their mean AUROC is its score): one run's DP noise moves its
#: AUROC by a few hundredths
REPEATS = 2
#: payload key of the tuning record (the service's; a worker's result never carries it)
TUNING_KEY = "tuning"


@dataclass(frozen=True)
class Tuning:
    """What the search did: shown by ``sandbox tune``, kept in the job's result and card.

    Key names avoid ``sandbox.disclosure.COUNT_DERIVED``: with private counts every figure
    here follows from :data:`ASSUMED_N_TRAIN`, not from the dataset's size."""

    #: "dummy" or "synthetic:JOB"
    source: str
    #: the fields the search chose (the others are the spec's)
    fields: tuple[str, ...]
    #: the training split the rule and each candidate's plan assumed
    planned_persons: int
    #: "public count" or "assumed: the dataset's counts are private"
    persons_basis: str
    #: free rows trained on / held out
    free_train_rows: int
    free_test_rows: int
    #: each candidate: its values, what it moves, its AUROC on the held-out free rows and
    #: its standard error (or why the planner refused it), and whether it was chosen
    candidates: list[dict[str, Any]]
    chosen: dict[str, float | int]
    reason: str
    rule: str = "training.autotune (docs/tuning.md)"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fields"] = list(self.fields)
        return d


def summary(tuning: dict[str, Any]) -> str:
    """One line for an audit event: ``"lr 0.03, epochs 38, ... on dummy"``."""
    chosen = ", ".join(f"{k} {v:g}" for k, v in tuning["chosen"].items())
    return f"{chosen} on {tuning['source']}"


def apply(spec: JobSpec, h: Hyper) -> JobSpec:
    """``spec`` with ``h``'s four values written in (every field resolved)."""
    training = replace(spec.training, lr=h.lr, epochs=h.epochs, batch_size=h.batch_size)
    return replace(
        spec, training=training, privacy=replace(spec.privacy, max_grad_norm=h.max_grad_norm)
    )


def resolve(
    ctx: ZoneContext,
    spec: JobSpec,
    on: str | None = None,
    dataset: DatasetRecord | None = None,
) -> tuple[JobSpec, dict[str, Any] | None]:
    """``spec`` with every ``"auto"`` field chosen, and the search's record (None when the
    spec had none: it comes back as it is). ``on``: the free rows, else ``default_source``;
    ``dataset``: the version record when the caller has looked it up already."""
    if not spec.auto_fields:
        return spec, None
    if spec.federated is not None:
        raise SpecError("mode", '"auto" hyperparameters cover DP-SGD jobs', "write the values")
    tuning = search(ctx, spec, on or default_source(ctx, spec), dataset)
    return apply(spec, Hyper(**tuning.chosen)), tuning.to_dict()  # type: ignore[arg-type]


def search(
    ctx: ZoneContext, spec: JobSpec, on: str, dataset: DatasetRecord | None = None
) -> Tuning:
    """Run the rule's grid on the free rows ``on`` names (see the module docstring)."""
    if dataset is None:
        dataset = ctx.dataset_version_for(spec.project, spec.dataset, spec_mechanism(spec))
    if dataset.counts_public:
        n, basis = n_train_of(dataset), "public count"
    else:
        n, basis = ASSUMED_N_TRAIN, "assumed: the dataset's counts are private"
    auto = spec.auto_fields
    written = {f: _written(spec, f) for f in FIELDS if f not in auto}
    # a model with no hidden layer takes the linear learning-rate prior
    linear = not spec.model.hidden
    grid = list(candidates(n, spec.training.optimizer, auto, written, linear=linear))
    data = _free_rows(ctx, spec, on, dataset)
    disjoint = disjoint_eval(dataset)
    rows: list[dict[str, Any]] = []
    scores: list[float | None] = []
    ses: list[float] = []
    with _one_thread():
        for c in grid:
            row, score, se = _evaluate(spec, c.hyper, n, data, disjoint)
            rows.append({**row, "moves": c.moves or "prior"})
            scores.append(score)
            ses.append(se)
    if all("refused" in row for row in rows):
        # every candidate refused by the planner: the spec's own problem (a delta at or above
        # 1/n, an epsilon no noise reaches), raised as the planner words it
        plan_spec(apply(spec, grid[0].hyper), n, disjoint=disjoint)
        raise SpecError("privacy.epsilon", rows[0]["refused"], "change epsilon or delta")
    last = combined(grid, scores, n, spec.training.optimizer, auto, linear=linear)
    # without signal in the free rows (dummy rows) the moves' scores are noise: nothing to
    # combine, the prior stays
    if learned(scores, ses) and last not in [c.hyper for c in grid]:
        with _one_thread():
            row, score, se = _evaluate(spec, last, n, data, disjoint)
        rows.append({**row, "moves": "combined"})
        scores.append(score)
        ses.append(se)
        grid.append(replace(grid[0], hyper=last, moves="combined"))
    picked = choose(scores, ses)
    if all(s is None for s in scores):
        why = next(row["not_run"] for row in rows if "not_run" in row)
        picked = replace(picked, reason=f"{why}: the rule's prior is kept")
    for i, row in enumerate(rows):
        row["chosen"] = i == picked.index
    return Tuning(
        source=on,
        fields=auto,
        planned_persons=n,
        persons_basis=basis,
        free_train_rows=int(data[0].shape[0]),
        free_test_rows=int(data[2].shape[0]),
        candidates=rows,
        chosen=grid[picked.index].hyper.to_dict(),
        reason=picked.reason,
    )


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread while the search trains: its models and batches are small, and
    a thread pool only spins on them (measured: 5x slower on 2 busy cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _written(spec: JobSpec, field: str) -> float | int:
    section, key = field.split(".")
    value = getattr(getattr(spec, section), key)
    if value is None:  # pragma: no cover - auto_fields names every None
        raise SpecError(field, "is auto")
    return value


def _free_rows(
    ctx: ZoneContext, spec: JobSpec, on: str, dataset: DatasetRecord
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The free rows' features and labels, split at random (seeded by the spec): at most
    ``FREE_TRAIN_ROWS`` to train (80% of a smaller table), the rest held out (at most
    ``FREE_TEST_ROWS``)."""
    import pyarrow.compute as pc

    from connectors.preprocess import FeaturePlan

    total = FREE_TRAIN_ROWS + FREE_TEST_ROWS
    table, contract = free_table(ctx, spec, on, dummy_rows=total, dataset=dataset)
    table = table.filter(pc.is_valid(table.column(spec.label)))
    rng = np.random.default_rng(spec.training.seed)
    order = rng.permutation(table.num_rows)[:total]
    if len(order) < 10:
        raise SpecError("--on", f"{on} has too few rows to tune on", "use --on dummy")
    train = min(FREE_TRAIN_ROWS, int(len(order) * TRAIN_FRACTION))
    plan = FeaturePlan.from_contract(contract, spec.features)
    parts = []
    for rows in (order[:train], order[train:]):
        part = table.take(np.sort(rows))
        X = plan.transform(part)
        y = np.asarray(part.column(spec.label).to_numpy(zero_copy_only=False), dtype=np.float32)
        parts += [X, y]
    return parts[0], parts[1], parts[2], parts[3]


def _evaluate(
    spec: JobSpec,
    h: Hyper,
    n: int,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    disjoint: bool,
) -> tuple[dict[str, Any], float | None, float]:
    """Plan ``h`` as admission would on ``n`` persons, train it :data:`REPEATS` times on the
    free rows with that plan's steps and noise per averaged gradient, score it on the
    held-out free rows: the mean AUROC, and its standard error (the held-out rows' sampling
    error, Hanley & McNeil, and the spread between the runs). Every candidate draws the same
    seeds (the spec's, then the next): their differences are the candidates'."""
    import torch

    from training.dpsgd_config import DPSGDConfig
    from training.models import build_model
    from training.scoring import predict_proba
    from training.trainer import train_dpsgd

    row: dict[str, Any] = h.to_dict()
    try:
        plan = plan_spec(apply(spec, h), n, disjoint=disjoint)
    except SpecError as exc:
        row["refused"] = exc.problem
        return row, None, float("inf")
    row["steps_at_plan"] = int(plan.steps)
    X_tr, y_tr, X_te, y_te = data
    positives, negatives = int(y_te.sum()), int((1 - y_te).sum())
    if positives == 0 or negatives == 0:
        row["not_run"] = "the held-out free rows hold one class only"
        return row, None, float("inf")
    if plan.steps > MAX_SIM_STEPS:
        # a schedule the spec wrote may be long; admission stays bounded
        row["not_run"] = f"more than {MAX_SIM_STEPS} steps: too long to search at admission"
        return row, None, float("inf")
    m = X_tr.shape[0]
    batch = min(h.batch_size, m, SIM_MAX_BATCH)
    aurocs = []
    for r in range(REPEATS):
        cfg = DPSGDConfig(
            sample_rate=batch / m,
            steps=int(plan.steps),
            steps_per_epoch=int(plan.steps),
            lr=h.lr,
            max_grad_norm=h.max_grad_norm,
            # the job's noise per averaged gradient, sigma C / B, at the simulated batch
            noise_multiplier=float(plan.noise_multiplier) * batch / h.batch_size,
            seed=spec.training.seed + r,
            optimizer=spec.training.optimizer,
            weight_decay=spec.training.weight_decay,
        )
        model = build_model(spec.model, X_tr.shape[1], seed=spec.training.seed + r)
        train_dpsgd(model, torch.from_numpy(X_tr), torch.from_numpy(y_tr), cfg)
        aurocs.append(_auroc(predict_proba(model, X_te), y_te))
    auroc = float(np.mean(aurocs))
    spread = float(np.std(aurocs, ddof=1)) / np.sqrt(REPEATS) if REPEATS > 1 else 0.0
    se = float(np.hypot(auroc_se(auroc, positives, negatives), spread))
    row.update(auroc=round(auroc, 4), se=round(se, 4))
    return row, auroc, se


def _auroc(scores: np.ndarray, y: np.ndarray) -> float:
    """The Mann-Whitney AUROC, ties counted half (average ranks)."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
