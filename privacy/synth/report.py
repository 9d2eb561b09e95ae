"""How good, how useful and how close to the real rows is a synthetic table?

``build_report`` runs inside the zone, on real rows, and returns a ``SynthReport`` with two
views:

* ``steward_view()`` -- everything: the scores below, per-column shape scores, per-pair trend
  scores, row counts, notes. It names columns (from the contract) but holds no value from any
  row. For the data steward only.
* ``aggregate_view()`` -- scalar scores only (no strings, no per-column detail, no exact real
  row count). This is what a researcher may see, and only once the steward has released it:
  the scores are computed on real rows without noise, so they are a steward-reviewed release,
  not a DP one (``docs/privacy-model.md``).

What is measured, and against which real rows:

* **Fidelity** (synthetic vs ``real_train``, the rows the synthesizer was fitted on):
  sdmetrics' ``QualityReport`` (its overall score, Column Shapes and Column Pair Trends, and
  each column's shape score). sdmetrics 0.32 averages Column Pair Trends only over pairs whose
  *real* correlation exceeds 0.5 (or association 0.3); ``column_pair_trends_all_pairs`` is the
  plain mean over every pair, for comparison. ``column_pair_trends`` is None when no pair
  passes that threshold (the overall score is then Column Shapes alone, as sdmetrics does).
* **Usefulness** (``docs/engines.md``: the quality score does not measure it): train the same
  model once on the synthetic rows (TSTR) and once on ``real_train`` (TRTR), and score both on
  the same real held-out ``real_test`` rows (AUROC). ``tstr_gap = trtr_auroc - tstr_auroc``
  (positive: the synthetic data lost signal). Independent marginals (each column shuffled on
  its own; measured on 8,000 cohort rows) score Column Shapes 1.00, a mean pair trend of 0.96
  over all pairs, and a TSTR AUROC at chance (0.45-0.59 over 8 seeds, TRTR 0.71-0.74): which
  is why both are always reported together.
* **Closeness to real people**: DCR, the Euclidean distance from each synthetic row to its
  nearest ``real_train`` row, median and 5th percentile; the same figures for the held-out real
  rows (``dcr_holdout_*``) are the yardstick: synthetic rows much closer to the training rows
  than fresh real rows are suggest memorisation. ``new_row_share``: the share of synthetic rows
  that are not an exact copy of any real row (train or test) in every compared column, and in
  the quasi-identifier columns alone when the caller names them.

Every preprocessing parameter comes from the schema contract, never from rows: strings
outside a column's declared vocabulary are compared as the one value "other" (a synthesizer
cannot know an undeclared vocabulary without a release), DCR features are scaled by the
declared domains (``connectors.preprocess.FeaturePlan``), and the plots bin by the declared
domains and label bars with declared categories only.

sdmetrics is imported lazily (it pulls in plotly); SDV itself is not imported here:
``contract_metadata`` writes SDV's metadata dictionary format, which sdmetrics reads directly
and ``sdv.metadata.Metadata.load_from_dict`` accepts. Warnings raised inside sdmetrics and
scikit-learn are recorded and counted, never printed (they can quote values), and sdmetrics'
per-pair error texts are dropped for the same reason.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from connectors.errors import SchemaError, SpecError
from connectors.preprocess import FeaturePlan, StepKind
from connectors.schema import ColumnSpec, Role, SchemaContract

#: the table name in the metadata dictionary given to sdmetrics
TABLE_NAME = "data"
#: what a string outside a column's declared vocabulary becomes (schema.py: "anything else
#: maps to 'other'"); the synthesizers decode their "other" code to the same string
OTHER = "other"
#: DCR compares at most this many synthetic (and held-out real) rows with every training row:
#: 5,000 x 40,000 rows x ~60 encoded features is ~1e10 multiply-adds (seconds on two cores),
#: and a median or 5th percentile of 5,000 distances is a stable summary.
DEFAULT_DCR_ROWS = 5_000
#: how many marginal comparisons ``save_plots`` draws (the worst-shaped columns first)
DEFAULT_MARGINALS = 6
#: histogram bins across a numeric column's declared domain
_HIST_BINS = 30
#: an integer column whose declared domain spans at most this many values gets one bar per
#: value (0/1 flags, counts such as prior admissions) instead of a histogram
_MAX_INTEGER_BARS = 31


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


# --- the contract as SDV / sdmetrics metadata -------------------------------------------------


def _sdtype(spec: ColumnSpec) -> str:
    if spec.role is Role.IDENTIFIER:
        return "id"
    if spec.role is Role.LABEL:
        # a class, not a quantity: compared by TVComplement / contingency tables
        return "categorical"
    if spec.type == "bool":
        return "boolean"
    if spec.is_temporal:
        return "datetime"
    if spec.is_integer and spec.min is not None and spec.max is not None:
        if math.floor(spec.max) - math.ceil(spec.min) <= 1:
            return "categorical"  # a 0/1 flag is a category (as privacy.synth.baselines says)
    if spec.is_numeric:
        return "numerical"
    return "categorical"


def contract_metadata(
    contract: SchemaContract, columns: Sequence[str] | None = None
) -> dict[str, Any]:
    """SDV's single-table metadata dictionary for ``columns`` (default: all but direct ids).

    Types map to sdtypes: integer and float -> numerical, except integers whose declared
    domain holds at most two values (0/1 flags) -> categorical; string -> categorical; bool ->
    boolean; date/timestamp -> datetime; the identifier -> id (the primary key when each
    person has one row); the label -> categorical. Direct identifiers are never included.
    ``sdv.metadata.Metadata.load_from_dict`` accepts the result; sdmetrics reads it as is.
    """
    if not isinstance(contract, SchemaContract):
        raise SpecError("contract", "must be a SchemaContract", "load the dataset's contract")
    if columns is None:
        columns = [c.name for c in contract.columns if c.role is not Role.DIRECT_IDENTIFIER]
    out: dict[str, Any] = {}
    for name in columns:
        spec = _contract_column(contract, name, "columns")
        if spec.role is Role.DIRECT_IDENTIFIER:
            raise SpecError(
                "columns",
                f"{name!r} is a direct identifier",
                "direct identifiers never leave ingest: remove it",
            )
        meta: dict[str, Any] = {"sdtype": _sdtype(spec)}
        if spec.type == "date32":
            meta["datetime_format"] = "%Y-%m-%d"
        out[name] = meta
    table: dict[str, Any] = {"columns": out}
    ident = contract.identifier
    if ident is not None and ident in out and contract.rows_per_person.value == "one":
        table["primary_key"] = ident
    return {"METADATA_SPEC_VERSION": "V1", "tables": {TABLE_NAME: table}}


def _contract_column(contract: SchemaContract, name: object, field_name: str) -> ColumnSpec:
    if not isinstance(name, str) or name not in contract.names:
        shown = repr(name) if isinstance(name, str) else "a non-string entry"
        raise SpecError(
            field_name,
            f"{shown} is not a column of the schema contract",
            "use one of: " + ", ".join(contract.names),
        )
    return contract.column(name)


# --- tables in the contract's representation -------------------------------------------------


def _contract_frame(
    table: pa.Table, columns: Sequence[str], contract: SchemaContract
) -> pd.DataFrame:
    """``columns`` of ``table`` as pandas, in the contract's terms.

    Numbers become float64 (float32 columns rounded through float32, so a float64 synthetic
    value and the stored float32 real value compare equal), nulls NaN/None, strings outside the
    declared vocabulary ``"other"`` (the contract's rule; it merges with a declared "other"),
    bools True/False/None, dates datetime64.
    """
    data: dict[str, Any] = {}
    for name in columns:
        spec = contract.column(name)
        column = table.column(name)
        if spec.is_numeric:
            values = _as_float(column, name)
            if spec.type == "float32":
                with np.errstate(over="ignore", invalid="ignore"):
                    values = values.astype(np.float32).astype(np.float64)
            data[name] = values
        elif spec.type == "bool":
            data[name] = pd.array(_as_bool(column, name), dtype="object")
        elif spec.is_temporal:
            data[name] = pd.to_datetime(column.to_pandas())
        else:
            cats = spec.categories
            strings = pc.cast(column, pa.string()) if column.type != pa.string() else column
            if cats is not None:
                known = pc.is_in(strings, value_set=pa.array(list(cats), pa.string()))
                strings = pc.if_else(
                    pc.or_kleene(known, pc.is_null(strings)),
                    strings,
                    pa.scalar(OTHER, pa.string()),
                )
            data[name] = strings.to_numpy(zero_copy_only=False).astype(object)
    return pd.DataFrame(data)


def _as_float(column: pa.ChunkedArray, name: str) -> np.ndarray:
    t = column.type
    if pa.types.is_dictionary(t):
        column, t = pc.cast(column, t.value_type), t.value_type
    if pa.types.is_boolean(t):
        column = pc.cast(column, pa.int8())
    elif not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)):
        raise SchemaError(
            f"column {name!r}: its type is not numeric (fix: give it the contract's type)",
            column=name,
        )
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def _as_bool(column: pa.ChunkedArray, name: str) -> np.ndarray:
    t = column.type
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        column = pc.not_equal(column, 0)
    elif not pa.types.is_boolean(t):
        raise SchemaError(
            f"column {name!r}: its type is not bool (fix: give it the contract's type)",
            column=name,
        )
    return np.asarray(column.to_pylist(), dtype=object)


def _labels(table: pa.Table, label: str, where: str) -> np.ndarray:
    """The label as 0/1 int8; a null or a value other than 0/1 is refused by row number."""
    column = table.column(label)
    if pa.types.is_boolean(column.type):
        column = pc.cast(column, pa.int8())
    values = _as_float(column, label)
    bad = np.flatnonzero(~np.isin(values, (0.0, 1.0)))  # NaN (null) is not in the set
    if bad.size:
        row = int(bad[0]) + 1
        raise SchemaError(
            f"{where}: column {label!r}: row {row} is null or not 0/1 "
            "(fix: a binary label holds only 0 and 1)",
            column=label,
            row=row,
        )
    return values.astype(np.int8)


# --- the report ------------------------------------------------------------------------------


def build_report(
    real_train: pa.Table,
    real_test: pa.Table,
    synth: pa.Table,
    contract: SchemaContract,
    *,
    label: str,
    features: Sequence[str],
    quasi_identifiers: Sequence[str] = (),
    model: TSTRModel = TSTRModel.LOGISTIC,
    dcr_rows: int = DEFAULT_DCR_ROWS,
    seed: int = 0,
) -> SynthReport:
    """Score ``synth`` against the real rows. Inside the zone only (see the module docstring).

    ``real_train`` is what the synthesizer was fitted on; ``real_test`` is held out from it,
    split by person. ``features`` and ``label`` must be contract columns present in all three
    tables; ``features`` are what the TSTR/TRTR model reads and, with the label, what sdmetrics
    compares. ``quasi_identifiers`` (contract columns in both tables) get their own copy check.
    ``seed`` fixes the DCR row sample and the gradient-boosting model.
    """
    if not isinstance(contract, SchemaContract):
        raise SpecError("contract", "must be a SchemaContract", "load the dataset's contract")
    for field_name, table in (
        ("real_train", real_train),
        ("real_test", real_test),
        ("synth", synth),
    ):
        if not isinstance(table, pa.Table):
            raise SpecError(field_name, "must be a pyarrow.Table", "pass a pa.Table")
        if table.num_rows == 0:
            raise SpecError(field_name, "has no rows", "pass a non-empty table")
    label_spec = _contract_column(contract, label, "label")
    if label_spec.role is not Role.LABEL:
        raise SpecError(
            "label",
            f"{label!r} has role {label_spec.role.value}, not label",
            "use one of: " + ", ".join(contract.label_names()),
        )
    plan = FeaturePlan.from_contract(contract, features)  # validates features, names "features"
    try:
        model = TSTRModel(model)
    except ValueError:
        raise SpecError(
            "model", "is not a known TSTR model", "use " + ", ".join(m.value for m in TSTRModel)
        ) from None
    if isinstance(dcr_rows, bool) or not isinstance(dcr_rows, int) or dcr_rows < 1:
        raise SpecError("dcr_rows", "must be a positive integer", f"pass e.g. {DEFAULT_DCR_ROWS}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpecError("seed", "must be a non-negative integer", "pass e.g. 0")
    if isinstance(quasi_identifiers, str):
        raise SpecError("quasi_identifiers", "must be a list of column names", 'write ["age"]')
    qi = tuple(quasi_identifiers)
    for name in qi:
        _contract_column(contract, name, "quasi_identifiers")
    if len(set(qi)) != len(qi):
        raise SpecError("quasi_identifiers", "lists a column twice", "list each column once")

    report_columns = (*plan.features, label)
    for field_name, table in (
        ("real_train", real_train),
        ("real_test", real_test),
        ("synth", synth),
    ):
        _require_columns(table, report_columns, field_name)
    _require_columns(synth, qi, "synth")
    _require_columns(real_train, qi, "real_train")
    _require_columns(real_test, qi, "real_test")

    notes: list[str] = []
    y_train = _labels(real_train, label, "real_train")
    y_test = _labels(real_test, label, "real_test")
    y_synth = _labels(synth, label, "synth")
    if len(np.unique(y_test)) < 2:
        raise SpecError(
            "real_test",
            "holds only one label class, so AUROC is undefined",
            "hold out more persons",
        )
    if len(np.unique(y_train)) < 2:
        raise SpecError("real_train", "holds only one label class", "fit on more persons")

    # fidelity: sdmetrics on the contract's representation of the report columns
    real_frame = _contract_frame(real_train, report_columns, contract)
    synth_frame = _contract_frame(synth, report_columns, contract)
    fidelity = _quality(real_frame, synth_frame, contract_metadata(contract, report_columns))
    notes.extend(fidelity.notes)

    # usefulness: the same model on synthetic and on real training rows, scored on real_test
    x_train, x_test, x_synth = (plan.transform(t) for t in (real_train, real_test, synth))
    trtr, trtr_note = _fit_score(model, x_train, y_train, x_test, y_test, seed, "real_train")
    tstr, tstr_note = _fit_score(model, x_synth, y_synth, x_test, y_test, seed, "synth")
    notes.extend(n for n in (trtr_note, tstr_note) if n)

    # closeness: DCR on contract-scaled features plus the label
    weights = _dcr_weights(plan)
    real_points = _dcr_points(x_train, y_train, weights, label_spec)
    rng = np.random.default_rng([seed, 0xDC2])
    synth_idx = _sample(rng, synth.num_rows, dcr_rows)
    test_idx = _sample(rng, real_test.num_rows, dcr_rows)
    synth_points = _dcr_points(x_synth[synth_idx], y_synth[synth_idx], weights, label_spec)
    test_points = _dcr_points(x_test[test_idx], y_test[test_idx], weights, label_spec)
    dcr_synth = _nearest_distances(synth_points, real_points)
    dcr_test = _nearest_distances(test_points, real_points)
    if synth_idx.size < synth.num_rows:
        notes.append(
            f"DCR over a seeded sample of {synth_idx.size} of the synthetic rows "
            f"and {test_idx.size} held-out real rows"
        )

    # copies: every contract column the synthetic and real tables share (but the identifier)
    compared = tuple(
        c.name
        for c in contract.columns
        if c.role not in (Role.IDENTIFIER, Role.DIRECT_IDENTIFIER)
        and all(c.name in t.column_names for t in (real_train, real_test, synth))
    )
    new_all = _new_row_share(real_train, real_test, synth, compared, contract)
    new_qi = _new_row_share(real_train, real_test, synth, qi, contract) if qi else None

    return SynthReport(
        quality=fidelity.quality,
        column_shapes=fidelity.column_shapes,
        column_pair_trends=fidelity.column_pair_trends,
        column_pair_trends_all_pairs=fidelity.all_pairs,
        column_shape_scores=fidelity.shape_scores,
        column_pair_scores=fidelity.pairs,
        tstr_auroc=tstr,
        trtr_auroc=trtr,
        tstr_gap=trtr - tstr,
        tstr_model=model,
        dcr_median=float(np.median(dcr_synth)),
        dcr_p05=float(np.percentile(dcr_synth, 5)),
        dcr_holdout_median=float(np.median(dcr_test)),
        dcr_holdout_p05=float(np.percentile(dcr_test, 5)),
        dcr_rows=int(synth_idx.size),
        new_row_share=new_all,
        new_row_share_qi=new_qi,
        n_real=real_train.num_rows,
        n_real_test=real_test.num_rows,
        n_synth=synth.num_rows,
        label=label,
        features=plan.features,
        compared_columns=compared,
        quasi_identifiers=qi,
        notes=tuple(notes),
    )


def _require_columns(table: pa.Table, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise SchemaError(
            f"{where}: column {missing[0]!r} is missing "
            "(fix: the real and synthetic tables need every feature and the label)",
            column=missing[0],
        )


@dataclass(frozen=True)
class _Fidelity:
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


def _quality(real: pd.DataFrame, synth: pd.DataFrame, metadata: dict[str, Any]) -> _Fidelity:
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
    return _Fidelity(
        quality=quality,
        column_shapes=column_shapes,
        column_pair_trends=_finite_or_none(by_property.get("Column Pair Trends")),
        all_pairs=float(np.mean(scored)) if scored else None,
        shape_scores=shape_scores,
        pairs=tuple(pair_scores),
        notes=tuple(notes),
    )


def _fit_score(
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


def _dcr_weights(plan: FeaturePlan) -> np.ndarray:
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


def _dcr_points(x: np.ndarray, y: np.ndarray, weights: np.ndarray, label: ColumnSpec) -> np.ndarray:
    lo = 0.0 if label.min is None else label.min
    hi = 1.0 if label.max is None else label.max
    scaled_label = (y.astype(np.float64) - lo) / (hi - lo)
    return np.hstack([x.astype(np.float64) * weights, scaled_label[:, None]])


def _sample(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(rng.choice(n, size=k, replace=False))


def _nearest_distances(queries: np.ndarray, points: np.ndarray) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=1, algorithm="brute", metric="euclidean")
    index.fit(points)
    distances, _ = index.kneighbors(queries)
    return distances[:, 0]


def _row_hashes(table: pa.Table, columns: Sequence[str], contract: SchemaContract) -> np.ndarray:
    frame = _contract_frame(table, columns, contract)
    return pd.util.hash_pandas_object(frame, index=False).to_numpy()


def _new_row_share(
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


# --- plots (steward only) --------------------------------------------------------------------


def save_plots(
    report: SynthReport,
    real: pa.Table,
    synth: pa.Table,
    contract: SchemaContract,
    out_dir: str | Path,
    *,
    max_marginals: int = DEFAULT_MARGINALS,
) -> list[Path]:
    """Write the report's plots as PNG files into ``out_dir``; returns their paths.

    STEWARD ONLY: ``marginals.png`` draws the real rows' distributions (histograms of numeric
    columns, category shares of the others), which is a release of the real data; so is
    ``column_shapes.png`` in its detail. Never hand these files to a researcher. Bins and bars
    come from the contract (declared domains and vocabularies, plus "other" and "missing"), so
    no undeclared value is ever drawn, but the heights are real-data statistics.

    Files: ``column_shapes.png`` (each column's shape score), ``marginals.png`` (real vs
    synthetic for up to ``max_marginals`` columns, the worst-shaped first), ``utility.png``
    (TSTR vs TRTR AUROC). Matplotlib's ``Figure`` is rendered by the Agg canvas directly:
    pyplot and its global backend state are never touched.
    """
    if not isinstance(report, SynthReport):
        raise SpecError("report", "must be a SynthReport", "build it with build_report")
    if not isinstance(contract, SchemaContract):
        raise SpecError("contract", "must be a SchemaContract", "load the dataset's contract")
    if isinstance(max_marginals, bool) or not isinstance(max_marginals, int) or max_marginals < 0:
        raise SpecError("max_marginals", "must be a non-negative integer", "pass e.g. 6")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(report.column_shape_scores)
    ordered = sorted(columns, key=lambda c: report.column_shape_scores[c])
    chosen = ordered[:max_marginals]
    _require_columns(real, chosen, "real")
    _require_columns(synth, chosen, "synth")
    paths = [
        _plot_shapes(report, out / "column_shapes.png"),
        _plot_utility(report, out / "utility.png"),
    ]
    if chosen:
        paths.insert(
            1, _plot_marginals(report, real, synth, contract, chosen, out / "marginals.png")
        )
    return paths


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _plot_shapes(report: SynthReport, path: Path) -> Path:
    names = list(report.column_shape_scores)
    scores = [report.column_shape_scores[n] for n in names]
    fig = _figure(8.0, 0.3 * len(names) + 1.5)
    ax = fig.add_subplot()
    bars = ax.barh(range(len(names)), scores, color="#4c72b0")
    ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.12)  # room for the labels
    ax.set_xlabel("sdmetrics column shape score (1 = same distribution)")
    ax.set_title(f"Column shapes: {report.column_shapes:.3f}  quality: {report.quality:.3f}")
    return _save(fig, path)


def _plot_utility(report: SynthReport, path: Path) -> Path:
    fig = _figure(5.0, 3.5)
    ax = fig.add_subplot()
    bars = ax.bar(
        ["train on real\n(TRTR)", "train on synthetic\n(TSTR)"],
        [report.trtr_auroc, report.tstr_auroc],
        color=["#55a868", "#4c72b0"],
    )
    ax.bar_label(bars, fmt="%.3f")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("AUROC on held-out real rows")
    ax.set_title(f"{report.tstr_model.value}: gap {report.tstr_gap:+.3f}")
    return _save(fig, path)


def _plot_marginals(
    report: SynthReport,
    real: pa.Table,
    synth: pa.Table,
    contract: SchemaContract,
    columns: Sequence[str],
    path: Path,
) -> Path:
    ncols = min(3, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    fig = _figure(4.2 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(columns) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, columns, strict=False):
        spec = contract.column(name)
        real_col = _contract_frame(real, [name], contract)[name]
        synth_col = _contract_frame(synth, [name], contract)[name]
        title = f"{name} (shape {report.column_shape_scores[name]:.3f})"
        narrow = (
            spec.is_integer
            and spec.min is not None
            and spec.max is not None
            and spec.max - spec.min + 1 <= _MAX_INTEGER_BARS
        )
        if spec.is_numeric and spec.role is not Role.LABEL and spec.min is not None and not narrow:
            _numeric_panel(ax, spec, real_col.to_numpy(), synth_col.to_numpy())
        else:
            _category_panel(ax, spec, real_col, synth_col)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _numeric_panel(ax: Any, spec: ColumnSpec, real: np.ndarray, synth: np.ndarray) -> None:
    lo, hi = float(spec.min), float(spec.max)  # type: ignore[arg-type]
    edges = _nice_edges(lo, hi)
    for values, colour, name in ((real, "#55a868", "real"), (synth, "#4c72b0", "synthetic")):
        known = values[~np.isnan(values)]
        missing = 1.0 - known.size / max(values.size, 1)
        ax.hist(
            np.clip(known, lo, hi),
            bins=edges,
            density=True,
            histtype="step",
            linewidth=1.5,
            color=colour,
            label=f"{name} ({missing:.0%} missing)",
        )
    ax.set_xlim(edges[0], edges[-1])
    ax.tick_params(labelsize=7)


def _nice_edges(lo: float, hi: float) -> np.ndarray:
    """About ``_HIST_BINS`` bins over [lo, hi] with a 1-2-5 width on multiples of the width.

    Bins of a round width keep values recorded to whole units (ages in years, pressures in
    mmHg) from piling up unevenly, as they do in bins of 2.9 units.
    """
    raw = (hi - lo) / _HIST_BINS
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 5.0, 10.0) if m * magnitude >= raw)
    start = math.floor(lo / step) * step
    return np.arange(start, hi + step, step)


def _category_panel(ax: Any, spec: ColumnSpec, real: pd.Series, synth: pd.Series) -> None:
    if spec.type == "bool":
        levels: list[Any] = [False, True]
        names = ["false", "true"]
    elif spec.is_numeric:
        # a narrow integer domain (a 0/1 flag, a label): one bar per declared value
        lo = math.ceil(spec.min) if spec.min is not None else 0
        hi = math.floor(spec.max) if spec.max is not None else 1
        levels = [float(v) for v in range(lo, hi + 1)]
        names = [str(v) for v in range(lo, hi + 1)]
    else:
        cats = list(spec.categories or ())
        levels = cats if OTHER in cats else [*cats, OTHER]
        names = list(levels)
    names.append("missing")

    def shares(values: pd.Series) -> np.ndarray:
        n = max(len(values), 1)
        missing = values.isna().to_numpy()
        present = values[~missing]
        counts = [float((present == level).sum()) for level in levels]
        return np.asarray([*counts, float(missing.sum())]) / n

    x = np.arange(len(names))
    ax.bar(x - 0.2, shares(real), width=0.4, color="#55a868", label="real")
    ax.bar(x + 0.2, shares(synth), width=0.4, color="#4c72b0", label="synthetic")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("share of rows", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
