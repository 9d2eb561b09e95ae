"""Feature scaling under DP-SGD: the zone's contract-only scaling beside standardisation.

Issue 12 asks for preprocessing that stays contract-only (no statistic of the rows) and still
gives DP-SGD inputs it can learn from. This isolates that one choice: on the public clinical
tables of ``benchmarks/bench_utility.py`` (split by person 80/20, the 80% trains, the 20% is
scored), the same DP-SGD run (Opacus 1.6, RDP, Poisson sampling, Adam, MLP [64, 64], the
zone's own rule's hyperparameters for the table's size, ``training.autotune.prior``) and the
same torch seeds train on three feature matrices:

- **zone**: ``FeaturePlan.from_contract`` as the zone builds it now: a declared typical range
  maps to [-2, 2] (``connectors.preprocess_steps.TYPICAL_SPAN``), a domain to [0, 1];
- **zone, unit span**: the same plan read back without ``span`` (how a plan released before
  spans transforms): typical ranges on [0, 1];
- **standardised** (the plain baseline, what a competent analyst writes with the rows in
  hand): ``bench_utility.peer_features``, standardised on the train part's statistics (not
  DP: a statistic of the rows the zone may not use for free).

Held-out AUROC, mean over seeds x noise draws; the table gives each side and the zone minus
each of the other two. Results: ``benchmarks/results/feature_scale.{md,json}``.

    python benchmarks/bench_feature_scale.py [--tables ...] [--seeds 3] [--draws 2]
        [--epsilons 1,3,8]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_synth import person_split  # noqa: E402
from bench_utility import HIDDEN, fit_score, peer_features  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from synth_public import IDENTIFIER, LABEL, TABLES  # noqa: E402

from connectors.preprocess import FeaturePlan  # noqa: E402
from training.autotune import prior  # noqa: E402
from training.dpsgd_config import Optimizer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SIDES = ("zone", "zone_unit_span", "standardised")
warnings.filterwarnings("ignore", module="opacus")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def unit_span(plan: FeaturePlan) -> FeaturePlan:
    """The plan as one released before spans reads back (typical ranges on [0, 1])."""
    data = plan.to_dict()
    for step in data["steps"]:
        step.pop("span", None)
    return FeaturePlan.from_dict(data)


def matrices(name: str, seed: int) -> tuple[dict[str, tuple[Any, Any]], Any, Any]:
    spec = TABLES[name]
    contract = spec.contract()
    features = [c for c in contract.names if c not in (IDENTIFIER, LABEL)]
    train, test = person_split(spec.arrow(), IDENTIFIER, seed)
    plan = FeaturePlan.from_contract(contract, features)
    old = unit_span(plan)
    peer = peer_features(contract, features).fit(train.select(features).to_pandas())
    out = {
        "zone": (plan.transform(train), plan.transform(test)),
        "zone_unit_span": (old.transform(train), old.transform(test)),
        "standardised": tuple(
            peer.transform(t.select(features).to_pandas()).astype(np.float32) for t in (train, test)
        ),
    }
    ytr = np.asarray(train.column(LABEL).to_numpy(), dtype=np.float32)
    yte = np.asarray(test.column(LABEL).to_numpy(), dtype=np.float32)
    return out, ytr, yte  # type: ignore[return-value]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    runs = []
    for name in args.tables:
        for seed in range(args.seeds):
            xs, ytr, yte = matrices(name, seed)
            h = prior(len(ytr), Optimizer.ADAM)
            cfg = {"lr": h.lr, "epochs": h.epochs, "clip": h.max_grad_norm}
            for eps in args.epsilons:
                for draw in range(args.draws):
                    row: dict[str, Any] = {"table": name, "seed": seed, "eps": eps, "draw": draw}
                    row["hyper"] = {**cfg, "batch": h.batch_size}
                    for side in SIDES:
                        Xtr, Xte = xs[side]
                        # the same torch seed for every side: the same init, sample and noise
                        scores, _ = fit_score(
                            Xtr, ytr, Xte, cfg, batch=h.batch_size, seed=1000 * seed + draw, eps=eps
                        )
                        ok = np.isfinite(scores).all()
                        row[side] = float(roc_auc_score(yte, scores)) if ok else float("nan")
                    runs.append(row)
                    print(json.dumps(row), flush=True)
    return {"runs": runs}


def summarise(runs: list[dict[str, Any]], tables: list[str], epsilons: list[float]) -> list[dict]:
    rows = []
    for eps in epsilons:
        for t in tables:
            rs = [r for r in runs if r["table"] == t and r["eps"] == eps]
            row: dict[str, Any] = {"eps": eps, "table": t, "runs": len(rs)}
            for side in SIDES:
                row[side] = float(np.nanmean([r[side] for r in rs]))
            row["zone_minus_unit"] = row["zone"] - row["zone_unit_span"]
            row["zone_minus_standardised"] = row["zone"] - row["standardised"]
            rows.append(row)
    return rows


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Feature scaling under DP-SGD: contract-only scaling beside standardisation",
        "",
        f"Tables: {', '.join(meta['tables'])}; seeds {meta['seeds']} x noise draws "
        f"{meta['draws']}; epsilons {', '.join(f'{e:g}' for e in meta['epsilons'])}; delta "
        "1e-6. The same Opacus DP-SGD run (Adam, MLP [64, 64], the zone's rule's "
        "hyperparameters for the table's size, the same torch seed) on three feature "
        "matrices; held-out AUROC (20% of persons), mean over seeds x draws. See the "
        "module docstring of `benchmarks/bench_feature_scale.py`.",
        "",
        f"Machine: {meta['machine']}; wall time {meta['wall_s']:.0f} s.",
        "",
        "| epsilon | table | runs | zone (typical on [-2, 2]) | zone, unit span (before) "
        "| standardised (baseline) | zone − unit span | zone − standardised |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['eps']:g} | {r['table']} | {r['runs']} | {r['zone']:.3f} | "
            f"{r['zone_unit_span']:.3f} | {r['standardised']:.3f} | "
            f"{r['zone_minus_unit']:+.3f} | {r['zone_minus_standardised']:+.3f} |"
        )
    d_unit = np.mean([r["zone_minus_unit"] for r in rows])
    d_std = np.mean([r["zone_minus_standardised"] for r in rows])
    lines += [
        "",
        f"Mean over the cells: zone − unit span {d_unit:+.3f}, zone − standardised {d_std:+.3f}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tables", type=_csv, default=list(TABLES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--draws", type=int, default=2, help="noise draws per seed")
    p.add_argument("--epsilons", type=lambda s: [float(x) for x in _csv(s)], default=[1, 3, 8])
    p.add_argument("--out", type=Path, default=RESULTS / "feature_scale")
    a = p.parse_args(argv)
    unknown = [t for t in a.tables if t not in TABLES]
    if unknown:
        p.error(f"--tables: unknown {unknown}; known: {list(TABLES)}")
    t0 = time.perf_counter()
    result = run(a)
    meta = {
        "tables": a.tables,
        "seeds": a.seeds,
        "draws": a.draws,
        "epsilons": a.epsilons,
        "hidden": list(HIDDEN),
        "machine": f"{platform.machine()}, Python {platform.python_version()}, one torch thread",
        "wall_s": time.perf_counter() - t0,
    }
    rows = summarise(result["runs"], a.tables, a.epsilons)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "summary": rows, **result}, indent=1), encoding="utf-8"
    )
    text = render(meta, rows)
    a.out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
