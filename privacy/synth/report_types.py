"""What a synthetic-data report holds: ``SynthReport`` and its two views.

``steward_view()`` is everything (scores, per-column and per-pair detail, row counts, notes;
column names but no value from any row); ``aggregate_view()`` the scalar scores a steward may
release to the researcher as a non-DP release. ``privacy.synth.report.build_report`` fills it
in (its module docstring says what each score measures); ``TSTRModel`` is the model it trains
on synthetic and on real rows; ``PairScore`` one column pair's trend score.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any


class TSTRModel(StrEnum):
    """The model trained on synthetic (TSTR) and on real (TRTR) rows; same settings for both."""

    #: scikit-learn LogisticRegression (lbfgs, C=1, up to 1,000 iterations)
    LOGISTIC = "logistic"
    #: scikit-learn HistGradientBoostingClassifier (100 iterations of at most 15 leaves, no
    #: early stopping)
    GRADIENT_BOOSTING = "gradient-boosting"


@dataclass(frozen=True)
class PairScore:
    """One column pair's trend score from sdmetrics (steward view)."""

    column_1: str
    column_2: str
    #: "CorrelationSimilarity" or "ContingencySimilarity"
    metric: str
    #: None when sdmetrics could not compute it (its error text is dropped: it can quote values)
    score: float | None
    #: whether the pair's real correlation/association passes sdmetrics' threshold, i.e.
    #: whether it counts towards ``column_pair_trends``
    counted: bool


@dataclass(frozen=True)
class SynthReport:
    """Fidelity, usefulness and closeness of one synthetic table. Build with ``build_report``."""

    #: sdmetrics' overall quality score (mean of the two properties below)
    quality: float
    #: sdmetrics' Column Shapes property (KSComplement / TVComplement per column, averaged)
    column_shapes: float
    #: sdmetrics' Column Pair Trends over the pairs that pass its real-correlation threshold;
    #: None when no pair passes
    column_pair_trends: float | None
    #: the mean trend score over every column pair (no threshold)
    column_pair_trends_all_pairs: float | None
    #: column -> shape score, in the order of ``columns``
    column_shape_scores: Mapping[str, float]
    #: every pair's score (steward view)
    column_pair_scores: tuple[PairScore, ...]
    #: AUROC on ``real_test`` of the model trained on the synthetic rows
    tstr_auroc: float
    #: AUROC on ``real_test`` of the same model trained on ``real_train``
    trtr_auroc: float
    #: ``trtr_auroc - tstr_auroc``: positive when the synthetic data lost signal
    tstr_gap: float
    tstr_model: TSTRModel
    #: distance from synthetic rows to their nearest ``real_train`` row: median, 5th percentile
    dcr_median: float
    dcr_p05: float
    #: the same for held-out real rows (``real_test``): the yardstick for the two above
    dcr_holdout_median: float
    dcr_holdout_p05: float
    #: how many synthetic rows the DCR figures are over (a seeded sample when fewer than all)
    dcr_rows: int
    #: share of synthetic rows that copy no real row exactly, in every compared column
    new_row_share: float
    #: the same over ``quasi_identifiers`` only; None when none were named
    new_row_share_qi: float | None
    #: real training rows, real held-out rows, synthetic rows (exact counts: steward view only)
    n_real: int
    n_real_test: int
    n_synth: int
    label: str
    features: tuple[str, ...]
    #: the columns the copy check compared (features, label, and other shared contract columns)
    compared_columns: tuple[str, ...]
    quasi_identifiers: tuple[str, ...] = ()
    #: things the steward should know (fallbacks, counted warnings); never quote a value
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.column_shape_scores, MappingProxyType):
            object.__setattr__(
                self, "column_shape_scores", MappingProxyType(dict(self.column_shape_scores))
            )

    def aggregate_view(self) -> dict[str, float | int | None]:
        """The scalar scores a steward may release to the researcher, as a non-DP release.

        Each is computed on real rows without noise, so none leaves without the steward's
        release (which the release record names as non-DP). Left out even then: the
        train-on-real AUROC (a non-private model trained and scored on real rows), the
        distances to the closest real record and the exact-match shares (membership
        signals about single persons): those stay in the steward's view. No strings, no
        per-column detail, no count of real rows; ``n_synth`` is the size the researcher
        asked for.
        """
        return {
            "quality": self.quality,
            "column_shapes": self.column_shapes,
            "column_pair_trends": self.column_pair_trends,
            "column_pair_trends_all_pairs": self.column_pair_trends_all_pairs,
            "tstr_auroc": self.tstr_auroc,
            "n_synth": self.n_synth,
        }

    def _steward_only_scores(self) -> dict[str, float | None]:
        return {
            "trtr_auroc": self.trtr_auroc,
            "tstr_gap": self.tstr_gap,
            "dcr_median": self.dcr_median,
            "dcr_p05": self.dcr_p05,
            "dcr_holdout_median": self.dcr_holdout_median,
            "dcr_holdout_p05": self.dcr_holdout_p05,
            "new_row_share": self.new_row_share,
            "new_row_share_qi": self.new_row_share_qi,
        }

    def steward_view(self) -> dict[str, Any]:
        """Everything, JSON-safe. Names columns; holds no value from any row."""
        out: dict[str, Any] = dict(self.aggregate_view())
        out.update(self._steward_only_scores())
        out.update(
            {
                "n_real": self.n_real,
                "n_real_test": self.n_real_test,
                "dcr_rows": self.dcr_rows,
                "tstr_model": self.tstr_model.value,
                "label": self.label,
                "features": list(self.features),
                "compared_columns": list(self.compared_columns),
                "quasi_identifiers": list(self.quasi_identifiers),
                "column_shape_scores": dict(self.column_shape_scores),
                "column_pair_scores": [
                    {
                        "column_1": p.column_1,
                        "column_2": p.column_2,
                        "metric": p.metric,
                        "score": p.score,
                        "counted": p.counted,
                    }
                    for p in self.column_pair_scores
                ],
                "notes": list(self.notes),
            }
        )
        return out
