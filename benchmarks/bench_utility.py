"""DP-SGD utility: the zone with no hyperparameters written beside a tuned Opacus peer.

Issue 12's comparison, on public clinical tables shipped inside pip packages (scikit-survival's
gbsg2, whas500, aids and flchain, lifelines' rossi; ``benchmarks/synth_public.py`` holds each
loader, binary label and hand-written contract). For each table and seed:

1. **Split by person first** (``bench_synth.person_split``: a hash of (seed, person) below
   0.2 is held out). Only the 80% is ingested; the 20% never enters the zone and stays here
   as Parquet, label kept apart.
2. **Zone**: a fresh dataset (``Service.ingest_dataset``), a grant, and one DP-SGD job per
   epsilon whose spec names the columns, ``model = mlp [64, 64]`` (the model of
   ``docs/examples/job.toml`` and the demo), epsilon, delta and the seed, and nothing else:
   lr, epochs, batch size and clipping norm are the zone's (``docs/tuning.md``); the optimizer
   is its default, Adam; ``privacy.evaluate`` keeps its default (true: the reader keeps 20% of
   the ingested persons for the DP evaluation, which composes in parallel with training on
   these tables, which have an identifier: the zone trains on 64% of the table with all of
   epsilon). The released folder
   (``Service.job_result``) is scored on the held-out rows by the installed entry point
   ``sandbox model predict`` in a subprocess; AUROC is computed here with scikit-learn.
3. **Peer**: plain Opacus 1.6 (``PrivacyEngine(accountant="rdp")``, Poisson sampling), torch
   Adam, the same MLP [64, 64], features preprocessed as a competent user would with the
   train part's statistics (log1p where the contract says ``scale = "log"``, median/mode
   imputation, standardised numerics, one-hot categoricals). Grid lr x clipping norm x epochs
   tuned on a stratified 80/20 validation split of the train part, uncharged (the peer's
   advantage: real tuning costs privacy, and so do the preprocessing statistics); the chosen
   config is retrained on the whole train part at the full epsilon. The noise multiplier is
   calibrated as ``make_private_with_epsilon`` does (``get_noise_multiplier``, RDP), cached
   per (epsilon, sample rate, epochs) since lr and clipping do not change it.
4. **Non-private**: the same MLP with Adam (lr x epochs tuned on the same validation split)
   and scikit-learn's logistic regression (C = 1) on the peer's features.

The zone's noise is unseeded by design (a fresh secret per job); the seed moves the person
split, the peer's validation split and torch seeds, and the zone spec's ``training.seed``
(its reader split and its free-data search). Every model uses one torch thread, as the
zone's search does. Figures are mean ± sd over seeds of the held-out AUROC.

    python benchmarks/bench_utility.py [--quick] [--tables gbsg2,whas500,aids,flchain,rossi]
        [--seeds 3] [--epsilons 1,3,8] [--peer-epochs 10,30] [--out benchmarks/results/utility]
        [--zone-evaluate off]   # the zone trains on the whole 80% too (results/utility_no_eval)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout without an install
sys.path.insert(1, str(ROOT / "benchmarks"))  # synth_public and bench_synth beside this file

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from bench_synth import person_split  # noqa: E402
from sklearn.compose import ColumnTransformer  # noqa: E402
from sklearn.impute import SimpleImputer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler  # noqa: E402
from synth_public import IDENTIFIER, LABEL, TABLES  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: the zone's specs write delta (no default); the examples and docs use 1e-6: both use it
DELTA = 1e-6
HIDDEN = (64, 64)
PEER_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
PEER_CLIPS = (0.5, 1.0, 2.0)
VAL_FRACTION = 0.2
PROJECT = "utility"
# Opacus' notes on its own settings (secure RNG off, a hook on input-free modules): expected
warnings.filterwarnings("ignore", module="opacus")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: gbsg2, one seed, epsilon 3")
    p.add_argument("--tables", type=_csv, default=list(TABLES))
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--epsilons", type=lambda s: [float(x) for x in _csv(s)], default=[1, 3, 8])
    p.add_argument("--peer-epochs", type=lambda s: [int(x) for x in _csv(s)], default=[10, 30])
    p.add_argument("--out", type=Path, default=RESULTS / "utility")
    p.add_argument("--render", action="store_true", help="rewrite <out>.md from <out>.json")
    p.add_argument("--note", default="", help="a line for the report (e.g. which code ran)")
    p.add_argument(
        "--zone-evaluate",
        choices=["default", "off"],
        default="default",
        help="off: the zone's spec also writes privacy.evaluate = false, so it trains on the "
        "same 80%% the peer trains on (the peer's evaluation is outside; so is the zone's then)",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.tables, a.seeds, a.epsilons = ["gbsg2"], 1, [3.0]
    unknown = [t for t in a.tables if t not in TABLES]
    if unknown:
        p.error(f"--tables: unknown {unknown}; known: {list(TABLES)}")
    if a.seeds < 1 or not a.epsilons or any(e <= 0 for e in a.epsilons):
        p.error("--seeds must be >= 1 and --epsilons positive")
    return a


# -- the peer's features and models ---------------------------------------------------------


def peer_features(contract: Any, features: list[str]) -> ColumnTransformer:
    """What a competent user writes: log1p for declared heavy tails, impute, standardise
    numerics, one-hot categoricals (fitted on the train part: not DP, the peer's advantage)."""
    cols = {c.name: c for c in contract.columns}
    strings = [f for f in features if cols[f].type == "string"]
    logs = [
        f for f in features if f not in strings and getattr(cols[f].scale, "value", "") == "log"
    ]
    linear = [f for f in features if f not in strings and f not in logs]
    num = make_pipeline(SimpleImputer(strategy="median"), StandardScaler())
    log = make_pipeline(FunctionTransformer(np.log1p), num)
    one_hot = OneHotEncoder(handle_unknown="ignore", sparse_output=False)
    cat = make_pipeline(SimpleImputer(strategy="most_frequent"), one_hot)
    return ColumnTransformer([("lin", num, linear), ("log", log, logs), ("cat", cat, strings)])


def mlp(n_in: int, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    widths = (n_in, *HIDDEN, 1)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def peer_batch(n: int) -> int:
    """~4 sqrt(n) within [32, 256]: 74 persons at rossi's 345, 256 from 4,096 up."""
    return int(min(256, max(32, round(4 * np.sqrt(n)))))


_SIGMAS: dict[tuple[float, float, int], float] = {}


def sigma_for(eps: float, q: float, epochs: int) -> float:
    """The noise multiplier ``make_private_with_epsilon`` would pick (cached: lr and clipping
    do not change it, and the grid asks the same question 12 times)."""
    from opacus.accountants.utils import get_noise_multiplier

    key = (eps, q, epochs)
    if key not in _SIGMAS:
        _SIGMAS[key] = get_noise_multiplier(
            target_epsilon=eps, target_delta=DELTA, sample_rate=q, epochs=epochs, accountant="rdp"
        )
    return _SIGMAS[key]


def fit_score(X: Any, y: Any, X_eval: Any, cfg: dict, *, batch: int, seed: int, eps: Any) -> Any:
    """Train the MLP with Adam at ``cfg`` (lr, epochs, clip), through Opacus when ``eps``;
    scores on ``X_eval`` and the epsilon Opacus' own accountant reports."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model = mlp(X.shape[1], seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    data = TensorDataset(torch.from_numpy(X), torch.from_numpy(y))
    loader = DataLoader(data, batch_size=batch, shuffle=True)
    engine = PrivacyEngine(accountant="rdp") if eps is not None else None
    if engine is not None:
        sigma = sigma_for(eps, 1 / len(loader), cfg["epochs"])
        # Poisson sampling is make_private's default (poisson_sampling=True)
        kw = {"noise_multiplier": sigma, "max_grad_norm": cfg["clip"]}
        model, opt, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, **kw
        )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(cfg["epochs"]):
        for xb, yb in loader:
            if len(xb) == 0:  # an empty Poisson batch: nothing to step on (vanishingly rare)
                continue
            opt.zero_grad()
            loss_fn(model(xb).reshape(-1), yb).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        scores = torch.sigmoid(model(torch.from_numpy(X_eval)).reshape(-1)).numpy()
    return scores, engine.get_epsilon(DELTA) if engine is not None else None


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    # a diverged run (NaN scores) counts as a failure, never as an error
    return float(roc_auc_score(y, s)) if np.isfinite(s).all() else float("nan")


def tuned(Xtr: Any, ytr: Any, Xte: Any, yte: Any, *, seed: int, eps: Any, epochs: list) -> dict:
    """Grid on a stratified validation split of the train part, best config retrained on the
    whole train part, AUROC on the held-out rows."""
    Xa, Xv, ya, yv = train_test_split(
        Xtr, ytr, test_size=VAL_FRACTION, stratify=ytr, random_state=seed
    )
    # the same sample rate for tuning and the final run (the noise multiplier follows it)
    batch = peer_batch(len(Xtr))
    tune_batch = max(8, round(batch * len(Xa) / len(Xtr)))
    grid = []
    for lr in PEER_LRS:
        for clip in PEER_CLIPS if eps is not None else (None,):
            for ep in epochs:
                cfg = {"lr": lr, "clip": clip, "epochs": ep}
                s, _ = fit_score(Xa, ya, Xv, cfg, batch=tune_batch, seed=seed, eps=eps)
                grid.append({**cfg, "val_auroc": _auroc(yv, s)})
    best = max(grid, key=lambda g: -1.0 if np.isnan(g["val_auroc"]) else g["val_auroc"])
    s, spent = fit_score(Xtr, ytr, Xte, best, batch=batch, seed=seed, eps=eps)
    out = {"auroc": _auroc(yte, s), "chosen": {**best, "batch": batch}, "epsilon": spent}
    return {**out, "grid": grid}


_STORED = {
    "lr": ("training", "lr"),
    "epochs": ("training", "epochs"),
    "batch": ("training", "batch_size"),
    "clip": ("privacy", "max_grad_norm"),
}

# -- the zone -------------------------------------------------------------------------------


class Zone:
    """One zone for the run; a dataset, a grant per (table, seed); a job per epsilon."""

    def __init__(self, root: Path, epsilons: list[float], evaluate: bool | None = None) -> None:
        from sandbox.service import Service

        self.svc, op = Service.init_zone(root)
        operator = self.svc.authenticate(op)
        _, st = self.svc.add_user(operator, "sam", "steward")
        _, rt = self.svc.add_user(operator, "rita", "researcher")
        self.steward, self.researcher = self.svc.authenticate(st), self.svc.authenticate(rt)
        self.svc.create_project(self.researcher, PROJECT, "issue 12 utility benchmark")
        self.epsilons = epsilons
        self.evaluate = evaluate  # None: the spec leaves privacy.evaluate to its default
        self.work = root.parent
        self.cli = Path(sys.executable).parent / "sandbox"

    def ingest(self, name: str, train: pa.Table, contract: Any, features: list[str]) -> None:
        src = self.work / f"{name}-train.parquet"
        pq.write_table(train, src)
        self.svc.ingest_dataset(self.steward, name, src, contract)
        src.unlink()  # the zone holds its own governed copy now
        # one grant covers every epsilon of the run on this dataset
        budget = (float(sum(self.epsilons)), DELTA * len(self.epsilons))
        cols = [*features, LABEL]
        req = self.svc.request_access(self.researcher, PROJECT, name, cols, ["dp-sgd"], *budget)
        self.svc.approve(self.steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=1))

    def run(self, name: str, features: list[str], eps: float, seed: int, test: Path) -> dict:
        """One job with no hyperparameters written; its release scored outside the zone."""
        from sandbox.jobspec import parse_job_spec

        written = {"project": PROJECT, "dataset": name, "label": LABEL, "features": features}
        written["model"] = {"kind": "mlp", "hidden": list(HIDDEN)}
        written["privacy"] = {"epsilon": eps, "delta": DELTA}
        if self.evaluate is not None:
            written["privacy"]["evaluate"] = self.evaluate
        written["training"] = {"seed": seed}  # not a hyperparameter: the reader's split
        spec = parse_job_spec(written)
        t0 = time.perf_counter()
        job = self.svc.submit(self.researcher, spec)
        out = self.work / f"release-{job.id}"
        self.svc.job_result(self.researcher, job.id, out)
        job_s = time.perf_counter() - t0
        scores = self.work / f"scores-{job.id}.parquet"
        # the installed entry point, in its own process: what a researcher runs outside
        cmd = [self.cli, "model", "predict", out, "--from", test, "--out", scores, "--json"]
        # (with this checkout's code first on the path, the code the zone ran)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        result, stored = job.result or {}, job.spec or {}
        return {
            "job": job.id,
            "scores": pq.read_table(scores).column("score").to_numpy(),
            "epsilon": result.get("epsilon"),
            # the stored spec holds the values the zone chose
            "chosen": {k: stored[s][f] for k, (s, f) in _STORED.items()},
            "tuning_on": (result.get("tuning") or {}).get("source"),
            # how its training and its DP evaluation composed (a run before plans named it:
            # sequential)
            "composition": (result.get("plan") or {}).get("composition", "sequential"),
            "tuning_reason": (result.get("tuning") or {}).get("reason"),
            # the zone's own DP evaluation (a DP release), beside the held-out truth
            "dp_metrics": result.get("metrics"),
            "job_s": job_s,
            "predict_s": time.perf_counter() - t0 - job_s,
        }


# -- the run --------------------------------------------------------------------------------


def run_table(name: str, seed: int, zone: Zone, args: argparse.Namespace) -> dict[str, Any]:
    spec = TABLES[name]
    contract = spec.contract()
    features = [c for c in contract.names if c not in (IDENTIFIER, LABEL)]
    train, test = person_split(spec.arrow(), IDENTIFIER, seed)
    ytr = np.asarray(train.column(LABEL).to_numpy(), dtype=np.float32)
    yte = np.asarray(test.column(LABEL).to_numpy(), dtype=np.float32)
    # the held-out rows stay here: features only in the file the CLI scores
    test_file = zone.work / f"{name}-s{seed}-heldout.parquet"
    pq.write_table(test.select(features), test_file)
    dataset = f"{name}-s{seed}"
    zone.ingest(dataset, train, contract, features)

    prep = peer_features(contract, features).fit(train.select(features).to_pandas())
    Xtr = prep.transform(train.select(features).to_pandas()).astype(np.float32)
    Xte = prep.transform(test.select(features).to_pandas()).astype(np.float32)
    out: dict[str, Any] = {"table": name, "seed": seed, "train_rows": train.num_rows}
    out.update(test_rows=test.num_rows, test_positives=int(yte.sum()), peer_inputs=Xtr.shape[1])
    t0 = time.perf_counter()
    logit = LogisticRegression(max_iter=5000).fit(Xtr, ytr)
    out["logistic"] = float(roc_auc_score(yte, logit.predict_proba(Xte)[:, 1]))
    np_run = tuned(Xtr, ytr, Xte, yte, seed=seed, eps=None, epochs=args.peer_epochs)
    out["nonprivate"] = {**np_run, "seconds": time.perf_counter() - t0}
    print(
        f"{name} seed {seed}: train {train.num_rows}, held out {test.num_rows}; "
        f"logistic {out['logistic']:.3f}, non-private MLP {np_run['auroc']:.3f}",
        flush=True,
    )
    out["by_epsilon"] = {}
    for eps in args.epsilons:
        t1 = time.perf_counter()
        peer = tuned(Xtr, ytr, Xte, yte, seed=seed, eps=eps, epochs=args.peer_epochs)
        peer["seconds"] = time.perf_counter() - t1
        try:
            z = zone.run(dataset, features, eps, seed, test_file)
            z["auroc"] = float(roc_auc_score(yte, z.pop("scores")))
        except Exception as exc:  # noqa: BLE001 - a failed path is a finding, reported
            z = {"auroc": float("nan"), "error": f"{type(exc).__name__}: {exc}"}
        out["by_epsilon"][f"{eps:g}"] = {"peer": peer, "zone": z}
        c = peer["chosen"]
        print(
            f"   eps {eps:g}: peer {peer['auroc']:.3f} (lr {c['lr']:g}, C {c['clip']:g}, "
            f"{c['epochs']} ep, B {c['batch']}; {peer['seconds']:.0f} s), zone {z['auroc']:.3f}"
            + (f" ({z['chosen']}; {z['job_s']:.0f} s)" if "chosen" in z else f" [{z['error']}]"),
            flush=True,
        )
    return out


def _ms(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(np.mean(v)), float(np.std(v))


def summarise(runs: list[dict[str, Any]], tables: list[str], epsilons: list[float]) -> dict:
    """Per epsilon and table: means and sds over seeds, zone - peer, gap closed."""
    out: dict[str, Any] = {}
    for eps in epsilons:
        key = f"{eps:g}"
        rows = []
        for t in tables:
            rs = [r for r in runs if r["table"] == t]
            row: dict[str, Any] = {"table": t, "seeds": len(rs)}
            row["logistic"] = _ms([r["logistic"] for r in rs])[0]
            row["nonprivate"], row["nonprivate_sd"] = _ms([r["nonprivate"]["auroc"] for r in rs])
            for side in ("peer", "zone"):
                row[side], row[f"{side}_sd"] = _ms(
                    [r["by_epsilon"][key][side]["auroc"] for r in rs]
                )
            gap = row["nonprivate"] - row["peer"]
            row["zone_minus_peer"] = row["zone"] - row["peer"]
            # undefined when the peer is at or above the non-private model
            row["gap_closed"] = row["zone_minus_peer"] / gap if gap > 0 else None
            rows.append(row)
        out[key] = rows
    return out


def verdicts(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's two criteria on the means over seeds, judged as they come out."""
    behind = [
        f"{r['table']} at eps {k} ({r['zone_minus_peer']:+.3f})"
        for k, rows in summary.items()
        for r in rows
        if not r["zone_minus_peer"] >= 0  # a NaN (failed job) is behind
    ]
    every = "zone (mean) at or above the peer (mean) on every table, every epsilon"
    out = [{"criterion": every, "pass": not behind, "detail": ", ".join(behind) or "-"}]
    if "3" in summary:
        short = []
        for r in summary["3"]:
            g = r["gap_closed"]
            # no gap (the peer at or above the non-private MLP): nothing to close, so met
            # when the zone is at or above the peer
            if g is None and not r["zone_minus_peer"] >= 0:
                short.append(f"{r['table']} (no gap; zone below peer)")
            elif g is not None and not g >= 0.5:
                short.append(f"{r['table']} ({g:.2f})")
        half = "at eps 3 the zone closes >= half the peer's gap to the non-private MLP, every table"
        out.append({"criterion": half, "pass": not short, "detail": ", ".join(short) or "-"})
    return out


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


def choices(meta: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """What each side chose, and the zone's own DP evaluation beside the held-out truth."""
    lines = []
    for t in meta["tables"]:
        for k in (f"{e:g}" for e in meta["epsilons"]):
            cells = [r["by_epsilon"][k] for r in runs if r["table"] == t]
            zone = sorted({_cfg(c["zone"]["chosen"]) for c in cells if "chosen" in c["zone"]})
            peer = [_cfg(c["peer"]["chosen"]) for c in cells]
            dp = [c["zone"]["dp_metrics"] for c in cells if c["zone"].get("dp_metrics")]
            # the zone withholds its DP AUROC where the noise swamps the counts (None)
            got = [m["auroc"] for m in dp if m.get("auroc") is not None]
            dp_auc = f"{np.mean(got):.3f} over {len(got)}" if got else "withheld"
            flagged = sum(bool(m.get("unreliable")) for m in dp)
            lines.append(
                f"| {t} | {k} | {'; '.join(zone) or '-'} | {'; '.join(peer)} | {dp_auc} "
                f"({flagged}/{len(dp)} flagged unreliable) |"
            )
    return (
        "## What each side chose\n\n"
        "| table | epsilon | zone (lr / epochs / batch / C) | peer per seed (lr / epochs / "
        "batch / C) | zone's own DP AUROC, mean |\n|---|---|---|---|---|\n"
        + "\n".join(lines)
        + "\n\nThe zone's search ran on "
        f"{meta['zone_tuning_sources']} rows; where they carry no signal it keeps the rule's "
        "prior (`docs/tuning.md`). *Zone's own DP AUROC*: the job's DP evaluation on its "
        "internal 20% (a DP release, what a researcher sees inside), beside the held-out AUROC "
        "above.\n"
    )


def _cfg(c: dict[str, Any]) -> str:
    return f"{c['lr']:g} / {c['epochs']} / {c['batch']} / {c['clip']:g}"


def markdown(meta: dict, summary: dict, checks: list[dict], runs: list[dict]) -> str:
    parts = [
        "# DP-SGD utility: the zone (no hyperparameters written) beside tuned Opacus\n",
        f"Tables: {', '.join(meta['tables'])}; seeds {meta['seeds']}; epsilons "
        f"{', '.join(f'{e:g}' for e in meta['epsilons'])}; delta {meta['delta']:g} for both. "
        "Each table is split by person 80/20; only the 80% is ingested, the 20% is held out "
        "and scored outside the zone (`sandbox model predict` in a subprocess for the zone; "
        "AUROC with scikit-learn). Model: MLP [64, 64], Adam, for both.\n",
        "- **zone**: a spec with columns, model, epsilon, delta, seed and nothing else: lr, "
        "epochs, batch and clipping chosen by the zone (`docs/tuning.md`) on its free rows "
        f"(here: {meta['zone_tuning_sources']}). {_evaluation_sentence(meta)} Its features are "
        "scaled by the "
        "contract alone (it may use no statistic of the rows): by each numeric column's "
        "declared `typical` range (written by hand in `benchmarks/synth_public.py`, as a "
        "steward would from the study's published description and clinical reference "
        "ranges), else by its domain. Its noise is unseeded (a fresh secret per job).\n"
        "- **peer**: Opacus 1.6, RDP accountant, Poisson sampling, full epsilon on training; "
        "features standardised with the train part's statistics (log1p on declared log "
        "columns, imputation, one-hot). Grid lr "
        f"{{{', '.join(f'{x:g}' for x in PEER_LRS)}}} x clipping "
        f"{{{', '.join(f'{x:g}' for x in PEER_CLIPS)}}} x epochs "
        f"{{{', '.join(str(x) for x in meta['peer_epochs'])}}}, batch ~4 sqrt(n) in "
        "[32, 256], tuned on a stratified 20% validation split of the train part, then "
        "retrained on the whole train part. **The tuning and the preprocessing statistics "
        "are uncharged**: the peer's advantage (a real analyst would pay privacy for both).\n"
        "- **non-private**: the same MLP with Adam (lr x epochs tuned on the same validation "
        "split); *logistic*: scikit-learn, C = 1, on the peer's features.\n",
        f"Machine: {meta['machine']}, {meta['cpus']} CPUs shared with other work (load "
        f"average at start {meta['load_average_at_start'][0]}, at end "
        f"{meta['load_average_at_end'][0]}); one torch thread. Wall time "
        f"{meta['wall_s']:.0f} s."
        + ("" if meta.get("complete", True) else " **Partial: the run was cut short.**")
        + (f" {meta['note']}" if meta.get("note") else "")
        + "\n",
    ]
    for key, rows in summary.items():
        parts.append(f"## epsilon {key}\n")
        parts.append(
            "| table | seeds | logistic | non-private MLP | peer (mean ± sd) | zone (mean ± sd) "
            "| zone − peer | gap closed |\n|---|---|---|---|---|---|---|---|\n"
            + "\n".join(
                f"| {r['table']} | {r['seeds']} | {r['logistic']:.3f} | {r['nonprivate']:.3f} ± "
                f"{r['nonprivate_sd']:.3f} | {r['peer']:.3f} ± {r['peer_sd']:.3f} | "
                f"{_f(r['zone'])} ± {_f(r['zone_sd'])} | {_f(r['zone_minus_peer'], '+.3f')} | "
                f"{_f(r['gap_closed'], '.2f')} |"
                for r in rows
            )
            + "\n"
        )
    parts.append(
        "*gap closed* = (zone − peer) / (non-private MLP − peer); '-' where the peer is at "
        "or above the non-private MLP; where that gap is a few thousandths the ratio is large "
        "and says little. Held-out sets are small (see `utility.json`: "
        "`test_rows`, `test_positives`), so a seed's AUROC moves by several hundredths.\n"
    )
    parts.append(
        "## Verdict\n\n"
        + "\n".join(
            f"- {c['criterion']}: **{'yes' if c['pass'] else 'no'}**"
            + ("" if c["pass"] else f" (short on: {c['detail']})")
            for c in checks
        )
        + "\n"
    )
    parts.append(choices(meta, runs))
    if meta["failures"]:
        parts.append(
            "## Zone jobs that failed\n\n" + "\n".join(f"- {f}" for f in meta["failures"]) + "\n"
        )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:  # the report's code changed, not the run: summary, verdicts, md again
        d = json.loads(args.out.with_suffix(".json").read_text())
        return write(args.out, d["meta"], d["runs"])
    torch.set_num_threads(1)
    start = (os.getloadavg(), time.perf_counter())
    work = Path(tempfile.mkdtemp(prefix="bench-utility-"))
    from foundation.engine_env import configure_engine_env

    configure_engine_env(work)
    zone = Zone(work / "zone", args.epsilons, None if args.zone_evaluate == "default" else False)
    runs: list[dict[str, Any]] = []
    try:
        for name in args.tables:
            for seed in range(args.seeds):
                runs.append(run_table(name, seed, zone, args))
                # a checkpoint after every (table, seed): a run cut short keeps what it did
                try:
                    write(args.out, run_meta(args, runs, *start, done=False), runs, quiet=True)
                except Exception as exc:  # noqa: BLE001 - a report bug must not end the run
                    print(f"checkpoint not written: {type(exc).__name__}: {exc}", flush=True)
    finally:
        zone.svc.close()
    return write(args.out, run_meta(args, runs, *start, done=True), runs)


def _evaluation_sentence(meta: dict[str, Any]) -> str:
    """What the zone's default DP evaluation took from training in this run."""
    if meta.get("zone_evaluate") == "off":
        return (
            "Its spec also writes `privacy.evaluate = false` (`--zone-evaluate off`): no DP "
            "evaluation inside, so it trains on the whole ingested 80% with all of epsilon, as "
            "the peer does; both are scored only on the held-out 20%."
        )
    if meta.get("zone_compositions") == ["parallel"]:
        return (
            "Its default `privacy.evaluate = true` keeps 20% of the ingested persons for the DP "
            "evaluation; the tables have an identifier, so the evaluation's persons are never "
            "the training's and the two compose in parallel (each gets the whole epsilon): it "
            "trains on 64% of the table with all of epsilon."
        )
    return (
        "Its default `privacy.evaluate = true` spends 20% of epsilon on the DP evaluation and "
        "keeps 20% of the ingested persons for it: it trains on 64% of the table with 80% of "
        "epsilon."
    )


def run_meta(args: argparse.Namespace, runs: list, load: Any, t0: float, *, done: bool) -> dict:
    zone_runs = [e["zone"] for r in runs for e in r["by_epsilon"].values()]
    sources = {str(z.get("tuning_on")) for z in zone_runs if "error" not in z}
    compositions = {str(z.get("composition", "sequential")) for z in zone_runs if "error" not in z}
    return {
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in load],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "complete": done,
        # the tables that have at least one seed done (all of them once complete)
        "tables": [t for t in args.tables if any(r["table"] == t for r in runs)],
        "seeds": args.seeds,
        "epsilons": args.epsilons,
        "delta": DELTA,
        "hidden": list(HIDDEN),
        "peer_lrs": list(PEER_LRS),
        "peer_clips": list(PEER_CLIPS),
        "peer_epochs": args.peer_epochs,
        "zone_tuning_sources": ", ".join(sorted(sources)) or "-",
        "zone_compositions": sorted(compositions),
        "zone_evaluate": args.zone_evaluate,
        "failures": [
            f"{r['table']} seed {r['seed']} eps {k}: {e['zone']['error']}"
            for r in runs
            for k, e in r["by_epsilon"].items()
            if "error" in e["zone"]
        ],
        "quick": args.quick,
        "note": args.note,
        "wall_s": time.perf_counter() - t0,
    }


def write(out: Path, meta: dict[str, Any], runs: list[dict], *, quiet: bool = False) -> int:
    summary = summarise(runs, meta["tables"], meta["epsilons"])
    checks = verdicts(summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "summary": summary, "verdicts": checks, "runs": runs}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=float))
    text = markdown(meta, summary, checks, runs)
    out.with_suffix(".md").write_text(text)
    if not quiet:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
