"""``scale = "log"`` in the synthesizers and the DP query histograms.

A heavy-tailed column declared ``scale = "log"`` gets bins of equal width in ``log(1 + x)``
over its declared domain (from the contract alone, so the DP accounting is unchanged), its
values are drawn uniformly (in ``log(1 + x)``) within their bin, and it keeps far more
resolution than equal-width bins: the quantitative checks below compare both scales on the
same lognormal values.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from connectors.scales import Scale
from connectors.schema import SchemaContract
from foundation.engine_env import configure_engine_env
from privacy.dpquery.cells import bin_cells
from privacy.dpquery.engine import quote, run
from privacy.dpquery.spec import QuerySpec, columns_needed
from privacy.synth import SynthMethod, fit_and_sample
from privacy.synth.codec import NUMERIC_BINS, Codec, ValueKind

HI = 1_000.0
PERSONS = 3_000

CONTRACT = f"""
[columns.crp]
type = "float64"
role = "feature"
min = 0
max = {HI}
scale = "log"

[columns.crp_linear]
type = "float64"
role = "feature"
min = 0
max = {HI}

[columns.visits]
type = "int32"
role = "feature"
min = 0
max = 5000
scale = "log"

[columns.y]
type = "int8"
role = "label"
"""


@pytest.fixture(scope="module", autouse=True)
def _engine_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    configure_engine_env(tmp_path_factory.mktemp("synth-zone"))


def contract(text: str = CONTRACT) -> SchemaContract:
    return SchemaContract.from_toml_text(text)


def heavy_tailed(n: int, seed: int) -> np.ndarray:
    """Lognormal lab values (median 5, a long right tail), inside [0, HI]."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(math.log(5.0), 1.2, n), 0.0, HI)


def table(n: int = PERSONS, seed: int = 0) -> pa.Table:
    x = heavy_tailed(n, seed)
    rng = np.random.default_rng(seed + 1)
    y = (rng.random(n) < 1 / (1 + np.exp(-(np.log1p(x) - 1.8) * 2))).astype(np.int8)
    visits = np.minimum(np.round(rng.lognormal(1.0, 1.0, n)), 5000).astype(np.int32)
    return pa.table(
        {
            "crp": pa.array(x),
            "crp_linear": pa.array(x),
            "visits": pa.array(visits, pa.int32()),
            "y": pa.array(y, pa.int8()),
        }
    )


# -- the synthesizers' codec ------------------------------------------------------------------
def test_codec_bins_are_log_spaced_from_the_contract() -> None:
    codec = Codec.from_contract(contract())
    log, linear = codec.columns[codec.index("crp")], codec.columns[codec.index("crp_linear")]
    assert log.kind is linear.kind is ValueKind.BINNED
    assert log.scale is Scale.LOG and linear.scale is Scale.LINEAR
    assert log.n_values == linear.n_values == NUMERIC_BINS  # the same domain size
    edges = log.edges
    assert edges[0] == 0.0 and edges[-1] == HI and len(edges) == NUMERIC_BINS + 1
    np.testing.assert_allclose(np.diff(np.log1p(edges)), math.log1p(HI) / NUMERIC_BINS)
    np.testing.assert_allclose(np.diff(linear.edges), HI / NUMERIC_BINS)
    # narrow where the bulk lies, wide in the tail
    assert edges[1] < 0.3 and edges[-1] - edges[-2] > 190


def test_codec_encodes_by_the_edges_and_decodes_within_the_bin() -> None:
    codec = Codec.from_contract(contract())
    col = codec.columns[codec.index("crp")]
    edges = col.edges
    x = np.concatenate([heavy_tailed(5_000, 3), edges, [-5.0, 2 * HI]])
    codes = col.encode(pa.array(x))
    inner = np.searchsorted(edges[1:-1], np.clip(x, 0, HI), side="right")
    assert np.array_equal(codes, inner)
    assert codes[-2] == 0 and codes[-1] == NUMERIC_BINS - 1  # clamped into the edge bins
    assert col.encode(pa.array([None], pa.float64()))[0] == col.missing_code

    rng = np.random.default_rng(5)
    for k in (0, 7, 20, NUMERIC_BINS - 1):
        values = np.asarray(col.decode(np.full(4_000, k), rng), dtype=np.float64)
        assert np.all((values >= edges[k]) & (values <= edges[k + 1]))
        assert np.unique(values).size > 3_900  # drawn within the bin, not at a fixed point
        # uniform on log(1 + x) within the bin
        where = (np.log1p(values) - np.log1p(edges[k])) / (
            np.log1p(edges[k + 1]) - np.log1p(edges[k])
        )
        assert stats.kstest(where, "uniform").pvalue > 1e-3
        assert np.mean(col.encode(pa.array(values)) == k) > 0.999


def test_a_heavy_tailed_column_keeps_its_resolution_under_log_bins() -> None:
    codec = Codec.from_contract(contract())
    log, linear = codec.columns[codec.index("crp")], codec.columns[codec.index("crp_linear")]
    x = heavy_tailed(20_000, 11)

    def occupied(codes: np.ndarray) -> int:  # bins holding at least 0.5% of the values
        return int((np.bincount(codes, minlength=NUMERIC_BINS) >= 0.005 * x.size).sum())

    log_bins, linear_bins = occupied(log.encode(pa.array(x))), occupied(linear.encode(pa.array(x)))
    assert log_bins >= 15 and log_bins >= 4 * linear_bins, (log_bins, linear_bins)

    # a value's round trip through its bin: under 15% on the log scale, more than
    # the value itself on the linear one
    rng = np.random.default_rng(1)

    def error(col) -> float:  # type: ignore[no-untyped-def]
        back = np.asarray(col.decode(col.encode(pa.array(x)), rng), dtype=np.float64)
        return float(np.median(np.abs(back - x) / x))

    assert error(log) < 0.15 and error(linear) > 1.0


def test_integer_log_columns_decode_to_integers_inside_the_domain() -> None:
    codec = Codec.from_contract(contract())
    col = codec.columns[codec.index("visits")]
    assert col.kind is ValueKind.BINNED and col.scale is Scale.LOG
    values = col.decode(np.arange(NUMERIC_BINS).repeat(50), np.random.default_rng(0))
    assert values.type == pa.int32()
    v = np.asarray(values)
    assert v.min() >= 0 and v.max() <= 5000 and np.all(np.diff(v.reshape(-1, 50).mean(1)) >= 0)


# -- end to end: MST and dp-copula ----------------------------------------------------------
@pytest.mark.parametrize("method", [SynthMethod.MST, SynthMethod.DP_COPULA])
def test_synthesizers_follow_the_scale_and_charge_the_same(method: SynthMethod) -> None:
    real = table()
    args: dict[str, Any] = {
        "epsilon": 3.0, "delta": 1e-6, "rows": 4_000, "seed": 1, "noise_seed": 2,
    }  # fmt: skip
    result = fit_and_sample(method, real, contract(), **args)
    # the same contract with every column linear: the same releases, so the same charge
    linear_text = CONTRACT.replace('scale = "log"', "")
    baseline = fit_and_sample(method, real, contract(linear_text), **args)
    assert result.steps == baseline.steps and result.epsilon == baseline.epsilon

    x = np.asarray(real["crp"], dtype=np.float64)
    for name, want in (("crp", 0.25), ("crp_linear", None)):
        synth = np.asarray(result.table[name].drop_null(), dtype=np.float64)
        assert synth.min() >= 0 and synth.max() <= HI
        gaps = [
            abs(math.log1p(np.quantile(synth, q)) - math.log1p(np.quantile(x, q)))
            for q in (0.1, 0.5, 0.9)
        ]
        if want is not None:  # log bins: the quantiles land where the real ones are
            assert max(gaps) < want, gaps
        else:  # equal-width bins of 31 units: the bulk (median 5) is smeared over [0, 31]
            assert max(gaps) > 0.5, gaps


# -- DP query histograms ----------------------------------------------------------------------
def _hist(column: str, bins: int = 10) -> QuerySpec:
    return QuerySpec.from_dict(
        {"dataset": "d", "kind": "histogram", "epsilon": 1.0, "column": column, "bins": bins}
    )


def test_query_histogram_bins_are_log_spaced() -> None:
    c = contract()
    cells = bin_cells(c.column("crp"), 10)
    edges = np.asarray(cells.edges)
    assert edges[0] == 0.0 and edges[-1] == HI
    # log-spaced; the inner edges are rounded to 3 significant digits for their labels
    np.testing.assert_allclose(np.diff(np.log1p(edges)), math.log1p(HI) / 10, rtol=0.02)
    assert cells.labels[0] == "[0, 0.995)" and cells.labels[-2] == "[501, 1000]"
    assert cells.labels[-1] == "(missing)"
    codes = cells.codes(pa.array([0.0, 0.994, 0.995, 999.0, 1e6, None]))
    assert codes.tolist() == [0, 0, 1, 9, 9, 10]
    # a linear column keeps its equal-width bins
    assert bin_cells(c.column("crp_linear"), 4).edges == (0.0, 250.0, 500.0, 750.0, 1000.0)


def test_query_histogram_of_a_log_column_costs_the_same_and_resolves_the_bulk() -> None:
    c = contract()
    real = table(20_000, 3)
    log_quote, linear_quote = quote(_hist("crp"), c), quote(_hist("crp_linear"), c)
    same = [{k: v for k, v in p.items() if k != "measures"} for p in log_quote.parts]
    assert same == [{k: v for k, v in p.items() if k != "measures"} for p in linear_quote.parts]
    assert log_quote.epsilon == linear_quote.epsilon
    assert any("log-spaced" in n for n in log_quote.notes)
    assert not any("log-spaced" in n for n in linear_quote.notes)

    def cells_with_signal(spec: QuerySpec) -> int:  # noisy count well above the noise
        answer = run(spec, c, real.select(columns_needed(spec)))
        return sum(f.value > 200 for f in answer.figures)

    assert cells_with_signal(_hist("crp")) >= 6 and cells_with_signal(_hist("crp_linear")) <= 1


# -- the report's plot of a log column --------------------------------------------------------
def test_the_report_plots_a_log_column_on_a_log_axis(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from privacy.synth.report_plots import _numeric_panel

    fig = Figure()
    ax = fig.add_subplot()
    x = heavy_tailed(2_000, 0)
    _numeric_panel(ax, contract().column("crp"), x, x[::-1].copy())
    assert ax.get_xscale() == "function"
    assert ax.get_xlim() == pytest.approx((0.0, HI))
    fig.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1_000
