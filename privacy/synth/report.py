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

The report's parts: ``report_types`` (``SynthReport`` and its views), ``report_contract`` (the
contract as metadata and frames), ``report_scores`` (each score) and ``report_plots``
(``save_plots``, steward only), all under ``privacy.synth``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from connectors.preprocess import FeaturePlan
from connectors.schema import SchemaContract
from connectors.schema_columns import Role
from foundation.errors import SpecError
from privacy.synth.report_contract import (
    binary_labels,
    contract_column,
    contract_frame,
    contract_metadata,
    require_columns,
)
from privacy.synth.report_scores import (
    dcr_points,
    dcr_weights,
    fit_score,
    nearest_distances,
    new_row_share,
    sample_rows,
    score_fidelity,
)
from privacy.synth.report_types import SynthReport, TSTRModel

#: DCR compares at most this many synthetic (and held-out real) rows with every training row:
#: 5,000 x 40,000 rows x ~60 encoded features is ~1e10 multiply-adds (seconds on two cores),
#: and a median or 5th percentile of 5,000 distances is a stable summary.
DEFAULT_DCR_ROWS = 5_000


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
    label_spec = contract_column(contract, label, "label")
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
        contract_column(contract, name, "quasi_identifiers")
    if len(set(qi)) != len(qi):
        raise SpecError("quasi_identifiers", "lists a column twice", "list each column once")

    report_columns = (*plan.features, label)
    for field_name, table in (
        ("real_train", real_train),
        ("real_test", real_test),
        ("synth", synth),
    ):
        require_columns(table, report_columns, field_name)
    require_columns(synth, qi, "synth")
    require_columns(real_train, qi, "real_train")
    require_columns(real_test, qi, "real_test")

    notes: list[str] = []
    y_train = binary_labels(real_train, label, "real_train")
    y_test = binary_labels(real_test, label, "real_test")
    y_synth = binary_labels(synth, label, "synth")
    if len(np.unique(y_test)) < 2:
        raise SpecError(
            "real_test",
            "holds only one label class, so AUROC is undefined",
            "hold out more persons",
        )
    if len(np.unique(y_train)) < 2:
        raise SpecError("real_train", "holds only one label class", "fit on more persons")

    # fidelity: sdmetrics on the contract's representation of the report columns
    real_frame = contract_frame(real_train, report_columns, contract)
    synth_frame = contract_frame(synth, report_columns, contract)
    fidelity = score_fidelity(real_frame, synth_frame, contract_metadata(contract, report_columns))
    notes.extend(fidelity.notes)

    # usefulness: the same model on synthetic and on real training rows, scored on real_test
    x_train, x_test, x_synth = (plan.transform(t) for t in (real_train, real_test, synth))
    trtr, trtr_note = fit_score(model, x_train, y_train, x_test, y_test, seed, "real_train")
    tstr, tstr_note = fit_score(model, x_synth, y_synth, x_test, y_test, seed, "synth")
    notes.extend(n for n in (trtr_note, tstr_note) if n)

    # closeness: DCR on contract-scaled features plus the label
    weights = dcr_weights(plan)
    real_points = dcr_points(x_train, y_train, weights, label_spec)
    rng = np.random.default_rng([seed, 0xDC2])
    synth_idx = sample_rows(rng, synth.num_rows, dcr_rows)
    test_idx = sample_rows(rng, real_test.num_rows, dcr_rows)
    synth_points = dcr_points(x_synth[synth_idx], y_synth[synth_idx], weights, label_spec)
    test_points = dcr_points(x_test[test_idx], y_test[test_idx], weights, label_spec)
    dcr_synth = nearest_distances(synth_points, real_points)
    dcr_test = nearest_distances(test_points, real_points)
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
    new_all = new_row_share(real_train, real_test, synth, compared, contract)
    new_qi = new_row_share(real_train, real_test, synth, qi, contract) if qi else None

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
