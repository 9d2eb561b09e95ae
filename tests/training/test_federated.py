"""Federated DP training with Flower: the simulation, the reference loop, the privacy figures.

Simulations share one local Ray (``ray_local``, session-scoped): each run attaches to it
from its child process, so Ray's start is paid once. One cohort (3,000 patients with
canaries) is ingested per module; sites hospital-a/b/c have ~330-740 training persons,
hospital-h ~70 (below the default min_site_rows of 200).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from federated_harness.reference import run_reference
from safetensors import safe_open

from connectors.cohort import Canaries, cohort_contract, generate_cohort
from connectors.ingest import ingest_table
from connectors.schema import SchemaContract
from foundation.errors import SpecError
from privacy.accountant import GaussianStep, epsilon_for, plan_dpsgd
from privacy.dp_metrics import dp_binary_metrics
from training.dpsgd_config import Optimizer
from training.federated.config import ClientDPConfig, FederatedConfig, Strategy
from training.federated.metrics import (
    EVAL_BINS,
    metrics_from_histogram,
    pooled_metrics,
    site_evaluation,
)
from training.federated.payload import FederatedPayload, derive_seed, load_payload
from training.federated.rounds import select_sites
from training.federated.site import (
    SiteStatus,
    evaluate_site,
    initial_state,
    setup_site,
    train_round,
)
from training.federated.site_plan import SiteLedger
from training.federated.weights import SiteUpdate, load_weights, weighted_average
from training.models import ModelConfig

FEATURES = ("age", "sex", "diabetes", "hba1c", "creatinine", "prior_admissions", "length_of_stay")
LABEL = "readmitted_30d"
SITES = ("hospital-a", "hospital-b", "hospital-c")
SIM_TIMEOUT_S = 240


@dataclass(frozen=True)
class World:
    root: Path
    contract: SchemaContract
    canaries: Canaries
    secret_hex: str
    ingest_secret: bytes


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("federated")
    canaries = Canaries.make(7)
    contract = cohort_contract()
    ingest_secret = secrets.token_bytes(32)
    ingest_table(
        generate_cohort(3000, seed=11, canaries=canaries), contract, root / "ds", ingest_secret
    )
    return World(root, contract, canaries, secrets.token_hex(32), ingest_secret)


def make_config(**overrides: Any) -> FederatedConfig:
    values: dict[str, Any] = {
        "rounds": 2,
        "sites": SITES,
        "label": LABEL,
        "features": FEATURES,
        "model": ModelConfig("mlp", (16,)),
        "epsilon": 1.0,
        "delta": 1e-6,
        "max_grad_norm": 1.0,
        "batch_size": 64,
        "lr": 0.5,
        "seed": 3,
    }
    values.update(overrides)
    return FederatedConfig(**values)


def make_payload(world: World, name: str, **overrides: Any) -> FederatedPayload:
    extra = overrides.pop("site_data_paths", {})
    return FederatedPayload(
        job_id=f"job-{name}",
        dataset="cohort",
        dataset_path=world.root / "ds",
        contract=world.contract,
        config=make_config(**overrides),
        out_dir=world.root / name / "out",
        noise_secret_hex=world.secret_hex,
        site_data_paths=extra,
    )


def simulate(world: World, name: str, *, factory: str | None = None, **overrides: Any) -> Any:
    from training.federated.simulation import DEFAULT_CLIENT_FACTORY, run_federated_simulation

    payload = make_payload(world, name, **overrides)
    path = payload.write(world.root / name / "payload.json")
    lines: list[dict[str, Any]] = []
    result = run_federated_simulation(
        path,
        timeout_s=SIM_TIMEOUT_S,
        zone_dir=world.root / "zone",
        on_round=lines.append,
        client_factory=factory or DEFAULT_CLIENT_FACTORY,
        log_path=world.root / name / "engine.log",
    )
    return payload, path, result, lines


def rounds_of(result: Any) -> list[dict[str, Any]]:
    return [json.loads(x) for x in result.rounds_path.read_text().splitlines() if x.strip()]


# --- simulations (real Flower on the shared local Ray) -------------------------------------


@pytest.fixture(scope="module")
def fedavg(world: World, ray_local: Any) -> Any:
    # hospital-h has ~70 training persons: it must be left out, not fail the job
    return simulate(world, "fedavg", sites=(*SITES, "hospital-h"))


@pytest.mark.ray
def test_simulation_writes_rounds_summary_and_weights(fedavg: Any) -> None:
    payload, _, result, seen = fedavg
    lines = rounds_of(result)
    assert [line["round"] for line in lines] == [1, 2]
    assert seen == lines  # the progress callback saw every line, in order
    for line in lines:
        assert set(line["sites"]) == set(SITES)
        assert line["trained"] == sorted(SITES) and line["dropped"] == []
        assert line["server_epsilon"] is None
    assert all(site["dp_metrics"] is None for site in lines[0]["sites"].values())
    # every site released its evaluation (at ~190 test persons under sigma ~40 per cell a
    # metric can be undefined, i.e. null: that is the DP answer, not a failure)
    last = lines[-1]["sites"].values()
    assert all(
        set(s["dp_metrics"])
        >= {"auroc", "accuracy", "ece", "n_noisy", "sigma", "ci95", "unreliable"}
        for s in last
    )
    summary = json.loads(result.summary_path.read_text())
    assert summary["status"] == "completed" and summary["rounds_done"] == 2
    assert summary["strategy"] == "fedavg" and summary["dropped"] == []
    assert summary["privacy"]["unit"] == "person"
    assert summary["global_dp_metrics"]["bins"] == EVAL_BINS
    # pooled metrics are the sum of the sites' histograms: sigma adds in quadrature
    sigmas = [s["dp_metrics"]["sigma"] for s in summary["sites"].values()]
    assert summary["global_dp_metrics"]["sigma"] == pytest.approx(
        float(np.sqrt(np.sum(np.square(sigmas))))
    )
    with safe_open(str(result.weights_path), framework="numpy") as fh:
        meta = json.loads((fh.metadata() or {})["model"])
        assert meta == {"kind": "mlp", "hidden": [16]}
        assert sorted(fh.keys()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert set(result.epsilons) == set(SITES)
    assert result.rounds == 2 and len(result.round_seconds) == 2 and result.cold_start_s > 0


@pytest.mark.ray
def test_site_epsilon_within_budget_and_independently_recomputed(fedavg: Any) -> None:
    payload, _, result, _ = fedavg
    cfg = payload.config
    summary = json.loads(result.summary_path.read_text())
    lines = rounds_of(result)
    for site, fig in summary["sites"].items():
        assert fig["epsilon"] <= cfg.epsilon
        # the plan again, from the public n alone
        plan = plan_dpsgd(
            cfg.epsilon, cfg.delta, fig["n"], cfg.batch_size, cfg.rounds * cfg.local_epochs
        )
        assert fig["plan"]["noise_multiplier"] == plan.noise_multiplier
        assert fig["plan"]["sample_rate"] == plan.sample_rate
        assert fig["steps"] == plan.steps == cfg.rounds * fig["plan"]["steps_per_round"]
        assert fig["evals"] == 1
        history = [
            GaussianStep(plan.noise_multiplier, plan.sample_rate, fig["steps"]),
            GaussianStep(plan.eval_sigma, 1.0, 1),
        ]
        assert fig["epsilon"] == pytest.approx(epsilon_for(history, cfg.delta), rel=1e-12)
        assert result.epsilons[site] == fig["epsilon"]
        # after round 1: half the steps, no evaluation yet
        first = lines[0]["sites"][site]
        half = [GaussianStep(plan.noise_multiplier, plan.sample_rate, first["steps"])]
        assert first["steps"] == plan.steps // cfg.rounds
        assert first["epsilon"] == pytest.approx(epsilon_for(half, cfg.delta), rel=1e-12)
        assert lines[-1]["sites"][site]["epsilon"] == fig["epsilon"]


@pytest.mark.ray
def test_too_small_site_is_left_out_with_a_clear_message(fedavg: Any) -> None:
    _, _, result, _ = fedavg
    summary = json.loads(result.summary_path.read_text())
    (entry,) = summary["excluded"]
    assert entry["site"] == "hospital-h"
    assert "'hospital-h'" in entry["reason"] and "federated.min_site_rows (200)" in entry["reason"]
    assert result.excluded == ("hospital-h",)
    assert all("hospital-h" not in line["sites"] for line in rounds_of(result))


@pytest.mark.ray
def test_reference_loop_gives_the_simulations_weights_bit_for_bit(fedavg: Any) -> None:
    _, path, result, _ = fedavg
    ref = run_reference(path)
    sim = load_weights(result.weights_path)
    assert set(ref) == set(sim)
    for key in ref:
        assert ref[key].dtype == sim[key].dtype == np.float32
        assert np.array_equal(ref[key], sim[key]), key


# slow: a second whole federated simulation (~60-90 s on 2 cores); CI runs it (make test-slow)
@pytest.mark.slow
@pytest.mark.ray
def test_same_seed_twice_gives_identical_global_weights(world: World, fedavg: Any) -> None:
    _, _, first, _ = fedavg
    _, _, again, _ = simulate(world, "fedavg-again", sites=(*SITES, "hospital-h"))
    a, b = load_weights(first.weights_path), load_weights(again.weights_path)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert first.epsilons == again.epsilons


# slow: a FedProx simulation with client DP and site sampling (~50 s); CI runs it
# (make test-slow)
@pytest.mark.slow
@pytest.mark.ray
def test_fedprox_with_client_dp_and_site_sampling(world: World, ray_local: Any) -> None:
    dp = ClientDPConfig(noise_multiplier=1.0, clipping_norm=0.5)
    payload, path, result, _ = simulate(
        world,
        "fedprox",
        strategy=Strategy.FEDPROX,
        mu=0.1,
        clients_per_round=2,
        client_dp=dp,
    )
    cfg = payload.config
    lines = rounds_of(result)
    for line in lines:
        assert line["trained"] == select_sites(SITES, 2, cfg.seed, line["round"])
    # the server's own accountant: unit = site, no amplification (public sampling)
    server = epsilon_for([GaussianStep(1.0, 1.0, cfg.rounds)], cfg.delta)
    assert result.server_epsilon == pytest.approx(server, rel=1e-12)
    assert lines[-1]["server_epsilon"] == pytest.approx(server, rel=1e-12)
    summary = json.loads(result.summary_path.read_text())
    assert summary["server_dp"]["unit"] == "site" and summary["server_dp"]["sample_rate"] == 1.0
    # a site sampled in one round only has spent one round's steps (plus its evaluation)
    for site, fig in summary["sites"].items():
        rounds_in = sum(site in line["trained"] for line in lines)
        assert fig["steps"] == rounds_in * fig["plan"]["steps_per_round"]
    ref = run_reference(path)
    sim = load_weights(result.weights_path)
    assert all(np.array_equal(ref[k], sim[k]) for k in ref)


# slow: a federated simulation with a killed site (~50 s); CI runs it (make test-slow)
@pytest.mark.slow
@pytest.mark.ray
def test_crashing_site_does_not_kill_the_job_and_is_charged(world: World, ray_local: Any) -> None:
    sidecar = world.root / "crash" / "payload.json.faults.json"
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    sidecar.write_text(json.dumps({"crash": [{"site": "hospital-b", "round": 2}]}))
    payload, _, result, _ = simulate(
        world, "crash", factory="federated_harness.faults:faulty_client_app", rounds=3
    )
    lines = rounds_of(result)
    assert [line["round"] for line in lines] == [1, 2, 3]
    assert lines[1]["dropped"] == ["hospital-b"]
    # the node died before answering: the server cannot know whether it read its rows
    assert lines[1]["dropped_detail"]["hospital-b"]["touched"] is None
    assert lines[1]["trained"] == ["hospital-a", "hospital-c"]
    assert lines[2]["trained"] == ["hospital-a", "hospital-c"]
    assert lines[2]["sites"]["hospital-b"]["status"] == "out"
    summary = json.loads(result.summary_path.read_text())
    assert summary["status"] == "completed" and summary["dropped"] == ["hospital-b"]
    b = summary["sites"]["hospital-b"]
    # charged rounds 1 and 2 as planned (it may have trained before it died), no evaluation
    assert b["steps"] == 2 * b["plan"]["steps_per_round"] and b["evals"] == 0
    history = [GaussianStep(b["plan"]["noise_multiplier"], b["plan"]["sample_rate"], b["steps"])]
    assert b["epsilon"] == pytest.approx(epsilon_for(history, payload.config.delta), rel=1e-12)
    assert b["touched"] is None and b["dp_metrics"] is None
    assert result.dropped == ("hospital-b",)


@pytest.mark.ray
def test_canaries_never_appear_in_any_output(world: World, fedavg: Any) -> None:
    files = [
        f
        for f in world.root.rglob("*")
        if f.is_file() and "ds" not in f.relative_to(world.root).parts
    ]
    assert any(f.name == "rounds.jsonl" for f in files) and any(f.suffix == ".log" for f in files)
    for f in files:
        data = f.read_bytes()
        for canary in world.canaries.values():
            assert canary.encode() not in data, f"{canary} in {f.name}"


# --- the pieces, without an engine ---------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"rounds": 0}, "federated.rounds"),
        ({"sites": ()}, "federated.sites"),
        ({"sites": ("hospital-a", "hospital-a")}, "federated.sites"),
        ({"clients_per_round": 4}, "federated.clients_per_round"),
        ({"min_sites": 3, "clients_per_round": 2}, "federated.min_sites"),
        ({"strategy": "fedsgd"}, "federated.strategy"),
        ({"strategy": Strategy.FEDPROX, "mu": 0.0}, "federated.mu"),
        ({"mu": 0.1}, "federated.mu"),
        (
            {"secure_aggregation": True, "client_dp": ClientDPConfig(1.0, 1.0)},
            "federated.client_dp",
        ),
        ({"epsilon": 0}, "federated.epsilon"),
        ({"delta": 1.0}, "federated.delta"),
        ({"batch_size": 0}, "federated.batch_size"),
        ({"min_site_rows": 0}, "federated.min_site_rows"),
        ({"num_cpus": 0}, "federated.num_cpus"),
    ],
)
def test_config_errors_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as err:
        make_config(**overrides)
    assert err.value.field == field


def test_config_defaults_resolve() -> None:
    cfg = make_config()
    assert cfg.clients_per_round == 3 and cfg.min_sites == 2 and cfg.min_site_rows == 200
    assert cfg.num_cpus == 1.0 and cfg.strategy is Strategy.FEDAVG
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rounds = 5  # type: ignore[misc]


def test_payload_round_trip_and_checks(world: World, tmp_path: Path) -> None:
    payload = make_payload(world, "rt", client_dp=ClientDPConfig(1.0, 0.5))
    path = payload.write(tmp_path / "payload.json")
    again = load_payload(path)
    assert again.config == payload.config and again.to_dict() == payload.to_dict()
    assert world.secret_hex not in repr(payload)
    assert (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(SpecError) as err:
        make_payload(world, "x", sites=("hospital-a", "hospital-z"))
    assert err.value.field == "federated.sites"
    with pytest.raises(SpecError) as err:
        make_payload(world, "x", features=("age", "readmitted_30d"))
    assert err.value.field == "features"
    data = payload.to_dict() | {"extra": 1}
    with pytest.raises(SpecError, match="payload.extra"):
        FederatedPayload.from_json(json.dumps(data))
    short = payload.to_dict() | {"noise_secret_hex": "ab" * 8 + "z"}
    with pytest.raises(SpecError, match="noise_secret_hex"):
        FederatedPayload.from_json(json.dumps(short))


def test_noise_seeds_depend_on_secret_site_and_round() -> None:
    a, b = secrets.token_bytes(32), secrets.token_bytes(32)
    seeds = {derive_seed(a, "train", s, r) for s in SITES for r in (1, 2)}
    assert len(seeds) == 6
    assert derive_seed(a, "train", "hospital-a", 1) == derive_seed(a, "train", "hospital-a", 1)
    assert derive_seed(a, "train", "hospital-a", 1) != derive_seed(b, "train", "hospital-a", 1)


def test_site_histogram_is_the_draw_behind_dp_binary_metrics() -> None:
    rng = np.random.default_rng(0)
    scores, labels = rng.random(500), (rng.random(500) < 0.3).astype(np.int64)
    metrics, hist = site_evaluation(scores, labels, 5.0, 42)
    assert metrics == dp_binary_metrics(
        scores, labels, 5.0, np.random.default_rng(42), bins=EVAL_BINS
    )
    # the server's post-processing of a histogram is dp_binary_metrics' own: the same
    # figures; the intervals' redraws come from the server's own seed
    again = metrics_from_histogram(hist, 5.0, 7)
    assert (again.auroc, again.accuracy, again.ece, again.n_noisy) == (
        metrics.auroc,
        metrics.accuracy,
        metrics.ece,
        metrics.n_noisy,
    )
    assert again == metrics_from_histogram(hist, 5.0, 7)
    pooled = pooled_metrics([(hist, 3.0), (hist, 4.0)], 7)
    assert pooled is not None and pooled.sigma == pytest.approx(5.0)
    assert pooled_metrics([], 7) is None


def _evaluated_summary(payload: FederatedPayload, sites: tuple[str, ...]) -> dict[str, Any]:
    """The server's summary after every site evaluated the initial model (no Flower)."""
    from training.federated.rounds import Reply, ServerRun

    state = initial_state(payload)
    run = ServerRun(payload, None, state)
    setups = [setup_site(payload, site) for site in sites]
    run.register(list(enumerate(setups)))
    replies = {}
    for setup in setups:
        assert setup.plan is not None
        out = evaluate_site(payload, setup.plan, SiteLedger(), state)
        replies[setup.site] = Reply(
            setup.site, out.status, out.touched, out.reason, out.ledger, histogram=out.histogram
        )
    run.close_evaluation(list(sites), replies)
    return run.summary("completed")


def _assert_honest(m: dict[str, Any]) -> None:
    assert set(m["ci95"]) == {"auroc", "accuracy", "ece", "n_noisy"}
    for key in ("auroc", "accuracy", "ece"):
        lo, hi = m["ci95"][key]
        assert 0.0 <= lo <= hi <= 1.0
        if m[key] is None:  # undefined under the noise: whole range, flagged
            assert (lo, hi) == (0.0, 1.0) and m["unreliable"]
        else:
            assert lo <= m[key] <= hi
    if m["n_noisy"] == 0.0:  # the noise pushed the count below zero: flagged
        assert m["unreliable"]
    assert m["unreliable"] == (m["unreliable_reason"] is not None)


def test_charged_evaluation_gives_figures_with_intervals_and_flags(world: World) -> None:
    """Each site charged for its evaluation gets figures with 95% intervals and the
    unreliable flag, and so does the pool (the card once showed bare nulls: ~100-190 test
    persons per site under sigma ~40 per cell)."""
    payload = make_payload(world, "honest")
    summary = _evaluated_summary(payload, SITES)
    assert summary["evaluation"] != "skipped"
    for info in summary["sites"].values():
        assert info["evals"] == 1
        _assert_honest(info["dp_metrics"])
        # this budget cannot inform at this size, and the figures say so
        assert info["dp_metrics"]["unreliable"]
    pooled = summary["global_dp_metrics"]
    _assert_honest(pooled)
    sigmas = [s["dp_metrics"]["sigma"] for s in summary["sites"].values()]
    assert pooled["sigma"] == pytest.approx(float(np.sqrt(np.sum(np.square(sigmas)))))
    json.dumps(summary, allow_nan=False)
    # the public sizes alone said so in advance (half positives, the best case: swamped)
    from training.federated.metrics import evaluation_swamped

    assert evaluation_swamped([190, 120, 90], epsilon=1.0, delta=1e-6)
    assert not evaluation_swamped([20_000] * 3, epsilon=1.0, delta=1e-6)


def test_evaluation_off_is_neither_run_nor_charged(world: World) -> None:
    """``evaluate = False`` (the spec's privacy.evaluate = false): the plan gives the
    evaluation's share to training, nothing is reserved for it, a site asked anyway reads
    nothing and is charged nothing, and the summary says "skipped"."""
    from training.federated.rounds import ServerRun

    on = setup_site(make_payload(world, "eval-on"), "hospital-a").plan
    payload = make_payload(world, "eval-off", evaluate=False, sites=("hospital-a",))
    setup = setup_site(payload, "hospital-a")
    plan = setup.plan
    assert on is not None and plan is not None
    assert plan.eval_sigma is None and plan.card()["eval_sigma"] is None
    assert plan.noise_multiplier < on.noise_multiplier  # the whole budget trains
    assert len(plan.history(5, 0)) == 1  # the DP-SGD steps only
    with pytest.raises(SpecError):
        plan.epsilon(5, 1)
    from training.federated.site_plan import SitePlan

    assert SitePlan.from_record(plan.to_record()) == plan
    assert "eval-sigma" not in plan.to_record()
    # every planned round fits with no evaluation reserved
    steps = plan.steps_per_round * payload.config.rounds
    assert plan.fits(steps, 0)
    state = initial_state(payload)
    spent = SiteLedger(steps, 0, payload.config.rounds)
    out = evaluate_site(payload, plan, spent, state)
    assert out.status is SiteStatus.REFUSED and not out.touched and out.ledger == spent
    assert out.histogram is None
    run = ServerRun(payload, None, state)
    run.register([(0, setup)])
    run.skip_evaluation()
    summary = run.summary("completed")
    assert summary["evaluation"] == "skipped" and summary["global_dp_metrics"] is None
    assert summary["sites"]["hospital-a"]["evals"] == 0
    assert FederatedConfig.from_dict(payload.config.to_dict()).evaluate is False


def test_aggregation_is_fixed_order_and_weighted() -> None:
    rng = np.random.default_rng(1)
    updates = [
        SiteUpdate(f"s{i}", float(w), {"w": rng.normal(size=(4, 3)).astype(np.float32)})
        for i, w in enumerate((500, 120, 77, 310))
    ]
    first = weighted_average(updates)["w"]
    for perm in ([3, 1, 0, 2], [2, 3, 1, 0]):
        again = weighted_average([updates[i] for i in perm])["w"]
        assert np.array_equal(first, again)  # bit-identical whatever the arrival order
    expected = sum(u.weight * u.state["w"].astype(np.float64) for u in updates) / 1007
    assert np.allclose(first, expected, atol=1e-6)
    with pytest.raises(SpecError):
        weighted_average([updates[0], updates[0]])


def test_site_sampling_is_a_function_of_the_public_seed() -> None:
    pool = [f"hospital-{c}" for c in "abcdefgh"]
    picks = [select_sites(pool, 3, 5, r) for r in range(1, 6)]
    assert picks == [select_sites(list(reversed(pool)), 3, 5, r) for r in range(1, 6)]
    assert all(len(p) == 3 and p == sorted(p) for p in picks)
    assert len({tuple(p) for p in picks}) > 1
    assert select_sites(pool, 8, 5, 1) == sorted(pool)


def test_site_spend_when_it_fails_before_or_after_reading(world: World) -> None:
    payload = make_payload(world, "site")
    setup = setup_site(payload, "hospital-b")
    assert setup.status is SiteStatus.READY and setup.touched and setup.plan is not None
    plan = setup.plan
    state = initial_state(payload)
    # fails before any row is read (its governed file is missing): nothing spent
    broken = make_payload(world, "site", site_data_paths={"hospital-b": world.root / "missing"})
    out = train_round(broken, plan, SiteLedger(), 1, state)
    assert out.status is SiteStatus.FAILED and not out.touched and out.ledger == SiteLedger()
    assert out.reason
    # fails after reading (its split no longer matches the plan): the round is charged
    wrong = dataclasses.replace(plan, n_train=plan.n_train + 1)
    out = train_round(payload, wrong, SiteLedger(), 1, state)
    assert out.status is SiteStatus.FAILED and out.touched
    assert out.ledger == SiteLedger(plan.steps_per_round, 0, 1)
    # a site at the end of its budget refuses before reading anything
    spent = SiteLedger(plan.steps_per_round * payload.config.rounds, 0, payload.config.rounds)
    out = train_round(payload, plan, spent, 3, state)
    assert out.status is SiteStatus.REFUSED and not out.touched and out.ledger == spent
    assert "epsilon budget" in out.reason
    # the evaluation fits after every planned round, a second one does not
    ok = evaluate_site(payload, plan, spent, state)
    assert ok.status is SiteStatus.EVALUATED and ok.ledger.evals == 1
    assert plan.epsilon(ok.ledger.train_steps, 1) <= payload.config.epsilon
    again = evaluate_site(payload, plan, ok.ledger, state)
    assert again.status is SiteStatus.REFUSED


def test_site_epsilon_equals_the_accountant(world: World) -> None:
    plan = setup_site(make_payload(world, "eps"), "hospital-a").plan
    assert plan is not None
    for steps, evals in ((0, 0), (plan.steps_per_round, 0), (0, 1), (2 * plan.steps_per_round, 1)):
        assert plan.epsilon(steps, evals) == epsilon_for(plan.history(steps, evals), plan.delta)


def test_deployment_node_config_picks_site_and_own_data_path(world: World, tmp_path: Path) -> None:
    import pyarrow.compute as pc
    from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

    from training.federated.client import SITE_RECORD, handle_setup, site_of

    # hospital-b's own governed file, ingested with the same secret: same persons, same split
    table = generate_cohort(3000, seed=11, canaries=world.canaries)
    own = table.filter(pc.equal(table["hospital"], "hospital-b"))
    ingest_table(own, world.contract, tmp_path / "b", world.ingest_secret)
    payload = make_payload(world, "deploy")
    path = payload.write(tmp_path / "payload.json")
    node = {
        "partition-id": 1,
        "num-partitions": 3,
        "data-path": str(tmp_path / "b" / "data.parquet"),
    }
    ctx = Context(
        run_id=1,
        node_id=7,
        node_config=node,
        state=RecordDict(),
        run_config={"job-payload": str(path)},
    )
    assert site_of(ctx, payload) == ("hospital-b", tmp_path / "b" / "data.parquet")
    # a SuperNode's message, as the Deployment Engine delivers it (no engine needed here)
    meta = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="0",
        created_at=time.time(),
        ttl=3600.0,
        message_type=MessageType.QUERY,
    )
    msg = Message(content=RecordDict({"config": ConfigRecord({"phase": "setup"})}), metadata=meta)
    reply = handle_setup(msg, ctx, None)
    rec = reply.content.config_records[SITE_RECORD]
    assert rec["site"] == "hospital-b" and rec["status"] == "ready"
    assert rec["n"] == setup_site(payload, "hospital-b").plan.n_train  # type: ignore[union-attr]
    assert "safe-zone.site" in ctx.state.config_records
    bad = Context(
        run_id=1, node_id=7, node_config={"partition-id": 5}, state=RecordDict(), run_config={}
    )
    with pytest.raises(SpecError) as err:
        site_of(bad, payload)
    assert err.value.field == "node_config.partition-id"


def test_config_carries_the_optimizer_and_old_configs_mean_sgd() -> None:
    cfg = make_config(optimizer="adamw", weight_decay=0.05, lr=0.03)
    assert cfg.optimizer is Optimizer.ADAMW and cfg.weight_decay == 0.05
    assert FederatedConfig.from_dict(cfg.to_dict()) == cfg
    # a payload written before the optimizer existed trained its sites with SGD
    old = make_config().to_dict()
    del old["optimizer"], old["weight_decay"]
    assert FederatedConfig.from_dict(old).optimizer is Optimizer.SGD
    for bad, field in (
        ({"optimizer": "rmsprop"}, "federated.optimizer"),
        ({"optimizer": "adam", "weight_decay": 0.1}, "federated.weight_decay"),
        ({"optimizer": "adamw", "weight_decay": -1.0}, "federated.weight_decay"),
    ):
        with pytest.raises(SpecError) as err:
            make_config(**bad)
        assert err.value.field == field


def test_sites_train_with_adam_and_fedprox_keeps_one_adam_over_the_round(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each site applies the job's optimizer to its privatized gradients. FedProx runs its
    steps one call each: they must share one Adam (its moments over the round), not start a
    fresh one per step."""
    import torch

    from training import trainer

    given: list[Any] = []
    real = trainer.train_dpsgd

    def recording(*args: Any, **kwargs: Any) -> Any:
        given.append(kwargs.get("optimizer"))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_dpsgd", recording)
    states = {}
    for name, overrides in (
        ("sgd", {}),
        ("adam", {"optimizer": "adam", "lr": 0.03}),
        ("prox", {"optimizer": "adam", "lr": 0.03, "strategy": Strategy.FEDPROX, "mu": 0.1}),
    ):
        given.clear()
        payload = make_payload(world, f"opt-{name}", **overrides)
        plan = setup_site(payload, "hospital-b").plan
        assert plan is not None
        out = train_round(payload, plan, SiteLedger(), 1, initial_state(payload))
        assert out.status is SiteStatus.TRAINED and out.state is not None
        states[name] = out.state
        if name == "prox":
            assert len(given) == plan.steps_per_round
            shared = given[0]
            assert isinstance(shared, torch.optim.Adam)
            assert all(o is shared for o in given)
            steps = {int(s["step"]) for s in shared.state.values()}
            assert steps == {plan.steps_per_round}  # one Adam step per DP step, one moment run
        else:
            assert given == [None]  # one call; the trainer builds the optimizer itself
    for a, b in (("sgd", "adam"), ("adam", "prox")):
        assert any(not np.array_equal(states[a][k], states[b][k]) for k in states[a])
