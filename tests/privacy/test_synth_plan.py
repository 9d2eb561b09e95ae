"""``privacy.job_plan.plan_synth`` is exactly the releases each DP engine makes.

The service charges a synthetic-data job the epsilon of the releases it planned from the
contract alone, and fails a job whose worker reports other releases; so the plan must be,
release for release, what the engine does on real rows. Pinned on several column sets (with
and without the label the MST tree is rooted at, one column alone)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.cohort import cohort_contract, generate_cohort
from connectors.ingest import ingest_table
from connectors.schema import SchemaContract
from foundation.engine_env import configure_engine_env
from foundation.errors import SpecError
from privacy.accountant import epsilon_for
from privacy.job_plan import SynthPlan, plan_synth
from privacy.synth.base import fit_and_sample

DELTA = 1e-6
COLUMN_SETS = {
    "with-label": ["age", "sex", "diabetes", "hba1c", "readmitted_30d"],
    "no-label": ["age", "sex", "primary_dx"],
    "one-column": ["age"],
}


@pytest.fixture(scope="module")
def governed(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    configure_engine_env(tmp_path_factory.mktemp("synth-plan-zone"))
    dest = tmp_path_factory.mktemp("gov") / "d"
    report = ingest_table(generate_cohort(600, seed=4), cohort_contract(), dest, secret=b"k" * 32)
    return pq.read_table(report.path)


def _restricted(columns: list[str]) -> SchemaContract:
    """The contract the service hands a synthetic-data job (as ``SyntheticMechanism``)."""
    from sandbox.mechanisms.synthetic import governed_contract
    from sandbox.synth_worker import restricted_contract

    contract = governed_contract(cohort_contract())
    keep = [contract.identifier, *columns]
    return SchemaContract.from_dict(restricted_contract(contract.to_dict(), keep))


@pytest.mark.parametrize("columns", list(COLUMN_SETS.values()), ids=list(COLUMN_SETS))
@pytest.mark.parametrize("method", ["mst", "dp-copula"])
def test_the_plan_is_the_engines_releases(
    governed: pa.Table, method: str, columns: list[str]
) -> None:
    contract = _restricted(columns)
    table = governed.select([f.name for f in contract.governed_arrow_schema()])
    fit = fit_and_sample(
        method, table, contract, epsilon=2.0, delta=DELTA, rows=50, seed=1, noise_seed=2
    )
    plan = plan_synth(method, contract, 2.0, DELTA)
    assert list(plan.steps) == list(fit.steps)
    assert plan.epsilon == epsilon_for(list(fit.steps), DELTA) == fit.epsilon
    assert plan.epsilon <= 2.0
    assert SynthPlan.from_dict(plan.to_dict()) == plan


def test_a_non_dp_method_has_no_plan() -> None:
    with pytest.raises(SpecError, match="method"):
        plan_synth("gaussian-copula", cohort_contract(), 2.0, DELTA)


def test_the_plan_follows_the_target() -> None:
    low = plan_synth("mst", cohort_contract(), 0.5, DELTA)
    high = plan_synth("mst", cohort_contract(), 4.0, DELTA)
    assert len(low.steps) == len(high.steps)
    assert all(
        a.noise_multiplier > b.noise_multiplier for a, b in zip(low.steps, high.steps, strict=True)
    )
    assert low.epsilon <= 0.5 < high.epsilon <= 4.0
