"""The synthetic-data report's scores, each computed inside the zone on real rows.

* fidelity (``score_fidelity``): sdmetrics' ``QualityReport``, with and without its
  real-correlation threshold for column pairs; warnings are counted, never shown;
* usefulness (``fit_score``): AUROC on held-out real rows of a model trained on synthetic
  (TSTR) or on real (TRTR) rows;
* closeness (``dcr_weights``, ``dcr_points``, ``nearest_distances``): distances to the closest
  real record on contract-scaled features plus the label;
* copies (``new_row_share``): the share of synthetic rows that copy no real row exactly.

``privacy.synth.report.build_report`` puts them together (its module docstring says what each
measures and against which rows). sdmetrics and scikit-learn are imported lazily.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from connectors.preprocess import FeaturePlan
from connectors.preprocess_steps import StepKind
from connectors.schema import SchemaContract
from connectors.schema_columns import ColumnSpec
from foundation.errors import SchemaError
from privacy.synth.report_contract import TABLE_NAME, contract_frame
from privacy.synth.report_types import PairScore, TSTRModel


@dataclass(frozen=True)
class Fidelity:
    quality: float
    column_shapes: float
    column_pair_trends: float | None
    all_pairs: float | None
    shape_scores: dict[str, float]
    pairs: tuple[PairScore, ...]
    notes: tuple[str, ...]


def _finite_or_none(value: object) -> float | None:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def score_fidelity(real: pd.DataFrame, synth: pd.DataFrame, metadata: dict[str, Any]) -> Fidelity:
    from sdmetrics.reports import QualityReport

    notes: list[str] = []
    report = QualityReport()
    # the same report without sdmetrics' real-correlation threshold scores every pair
    every_pair = QualityReport()
    every_pair.real_correlation_threshold = 0
    every_pair.real_association_threshold = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report.generate({TABLE_NAME: real}, {TABLE_NAME: synth}, metadata, verbose=False)
        every_pair.generate({TABLE_NAME: real}, {TABLE_NAME: synth}, metadata, verbose=False)
        properties = report.get_properties()
        shapes = report.get_details("Column Shapes")
        counted_pairs = report.get_details("Column Pair Trends")
        pairs = every_pair.get_details("Column Pair Trends")
    if caught:
        notes.append(
            f"sdmetrics raised {len(caught)} warning(s) (not shown: they can quote values)"
        )
    by_property = dict(zip(properties["Property"], properties["Score"], strict=True))
    shape_scores: dict[str, float] = {}
    failed_shapes = 0
    for column, score in zip(shapes["Column"], shapes["Score"], strict=True):
        value = _finite_or_none(score)
        if value is None:
            failed_shapes += 1
            continue
        shape_scores[str(column)] = value
    if failed_shapes:
        notes.append(f"sdmetrics could not score the shape of {failed_shapes} column(s)")
    counted: set[tuple[str, str]] = set()
    if "Meets Threshold?" in counted_pairs:
        meets = counted_pairs["Meets Threshold?"].astype("boolean").fillna(False)
        for a, b, ok in zip(
            counted_pairs["Column 1"], counted_pairs["Column 2"], meets, strict=True
        ):
            if ok:
                counted.add((str(a), str(b)))
    pair_scores = []
    for a, b, metric, score in zip(
        pairs["Column 1"], pairs["Column 2"], pairs["Metric"], pairs["Score"], strict=True
    ):
        pair_scores.append(
            PairScore(
                column_1=str(a),
                column_2=str(b),
                metric=str(metric),
                score=_finite_or_none(score),
                counted=(str(a), str(b)) in counted,
            )
        )
    failed_pairs = sum(p.score is None for p in pair_scores)
    if failed_pairs:
        notes.append(f"sdmetrics could not score {failed_pairs} column pair(s)")
    scored = [p.score for p in pair_scores if p.score is not None]
    quality = _finite_or_none(report.get_score())
    column_shapes = _finite_or_none(by_property.get("Column Shapes"))
    if quality is None or column_shapes is None:
        raise SchemaError(
            "sdmetrics could not score the tables (fix: check that the synthetic table has "
            "the contract's column types)"
        )
    return Fidelity(
        quality=quality,
        column_shapes=column_shapes,
        column_pair_trends=_finite_or_none(by_property.get("Column Pair Trends")),
        all_pairs=float(np.mean(scored)) if scored else None,
        shape_scores=shape_scores,
        pairs=tuple(pair_scores),
        notes=tuple(notes),
    )


def fit_score(
    model: TSTRModel,
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    seed: int,
    trained_on: str,
) -> tuple[float, str]:
    """AUROC on the test rows of ``model`` fitted on (x, y); 0.5 when y has one class."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        # a constant predictor: the honest score of a model that learnt nothing
        return 0.5, f"{trained_on}: the label has one class only; its AUROC is set to 0.5"
    from threadpoolctl import threadpool_limits

    # one thread: on a shared 2-core machine OpenMP's spinning threads made gradient boosting
    # 10-20x slower than one thread (measured); these models are small enough for one core
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore")
        if model is TSTRModel.LOGISTIC:
            from sklearn.linear_model import LogisticRegression

            clf: Any = LogisticRegression(C=1.0, max_iter=1_000)
        else:
            from sklearn.ensemble import HistGradientBoostingClassifier

            clf = HistGradientBoostingClassifier(
                max_iter=100, max_leaf_nodes=15, early_stopping=False, random_state=seed
            )
        clf.fit(x, y)
        scores = clf.predict_proba(x_test)[:, 1]
    return float(roc_auc_score(y_test, scores)), ""


def dcr_weights(plan: FeaturePlan) -> np.ndarray:
    """Per-output weights so that a category mismatch adds exactly 1 to the squared distance.

    Numeric outputs are already scaled to [0, 1] by the declared domain; a one-hot pair that
    differs adds 2 before weighting, so one-hot outputs are weighted by 1/sqrt(2).
    """
    weights = []
    for step in plan.steps:
        if step.kind is StepKind.CATEGORY:
            weights.extend([1.0 / math.sqrt(2.0)] * step.width)
        else:
            weights.extend([1.0] * step.width)
    return np.asarray(weights, dtype=np.float64)


def dcr_points(x: np.ndarray, y: np.ndarray, weights: np.ndarray, label: ColumnSpec) -> np.ndarray:
    lo = 0.0 if label.min is None else label.min
    hi = 1.0 if label.max is None else label.max
    scaled_label = (y.astype(np.float64) - lo) / (hi - lo)
    return np.hstack([x.astype(np.float64) * weights, scaled_label[:, None]])


def sample_rows(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(rng.choice(n, size=k, replace=False))


def nearest_distances(queries: np.ndarray, points: np.ndarray) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=1, algorithm="brute", metric="euclidean")
    index.fit(points)
    distances, _ = index.kneighbors(queries)
    return distances[:, 0]


def _row_hashes(table: pa.Table, columns: Sequence[str], contract: SchemaContract) -> np.ndarray:
    frame = contract_frame(table, columns, contract)
    return pd.util.hash_pandas_object(frame, index=False).to_numpy()


def new_row_share(
    real_train: pa.Table,
    real_test: pa.Table,
    synth: pa.Table,
    columns: Sequence[str],
    contract: SchemaContract,
) -> float:
    """Share of synthetic rows whose values in ``columns`` equal those of no real row.

    Rows are compared by a 64-bit hash of their values in the contract's representation
    (collisions would only lower the share, i.e. err on the cautious side).
    """
    real = np.concatenate(
        [_row_hashes(real_train, columns, contract), _row_hashes(real_test, columns, contract)]
    )
    synthetic = _row_hashes(synth, columns, contract)
    return float(1.0 - np.isin(synthetic, real).mean())
