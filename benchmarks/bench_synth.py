"""DP synthetic data beside SDV's non-DP baselines: cost, fidelity, usefulness, closeness.

Two parts (``--tables cohort|public|all``, default all):

**cohort**: the demo cohort (``generate_cohort(patients, seed=0)``, one row per patient),
ingested as the zone would (``connectors.ingest.ingest_table``: direct identifiers dropped,
the identifier pseudonymised) into a temporary directory and read back with pyarrow. The
synthesizers see the pseudonym, the contract's feature columns and the label, under a contract
narrowed to those columns. The rows are split by person (a hash of the pseudonym) into 80%
train, what every synthesizer is fitted on, and 20% test, held out for TSTR/TRTR.

**public**: public clinical tables shipped inside pip packages (scikit-survival's gbsg2,
whas500, aids and flchain, lifelines' rossi; ``benchmarks/synth_public.py`` holds each table's
loader, binary label and hand-written contract), each ingested the same way into its own
fresh directory and split the same way. MST at each of ``--public-epsilons`` (default 1 and 3)
is fitted ``--repeats`` times with different noise seeds (the tables hold 432 to 7,874
persons, so one noise draw says little; the figures are the mean and standard deviation over
the draws) beside SDV's GaussianCopula (not DP) on the same train split.

Each method runs through ``privacy.synth.fit_and_sample`` (CTGAN through
``privacy.synth.baselines.fit_and_sample_sdv`` to set its epochs) and samples as many rows as
it was fitted on; ``privacy.synth.report.build_report`` scores the output (logistic regression
for TSTR and TRTR, DCR over a seeded sample of 5,000 rows). DP methods use delta 1e-6 and a
fixed ``noise_seed`` so the run is reproducible: in the zone the noise seed is always fresh.
All methods run one after another in one process, so load from other processes on the machine
falls on all of them alike; the load average at the start is recorded.

Targets (cohort, checked and printed): every DP fit <= 20x GaussianCopula's fit; at epsilon 3
the best DP method (highest TSTR AUROC) has sdmetrics quality >= 0.85 and TSTR AUROC >= TRTR -
0.03; new-row share >= 0.99 for every DP run. The public part has no targets: it is the
comparison with GaussianCopula that issue 12 asks for.

    python benchmarks/bench_synth.py [--tables all] [--patients 50000]
        [--methods mst,dp-copula,gaussian-copula,ctgan] [--epsilons 1,3,8] [--ctgan-epochs 5]
        [--out benchmarks/results/synth] [--public-methods mst,gaussian-copula]
        [--public-epsilons 1,3] [--repeats 5] [--public-out benchmarks/results/synth_public]

Writes ``<out>.md`` and ``<out>.json`` (cohort) and ``<public-out>.md`` / ``.json`` (public),
and the steward plots of the best DP run at epsilon 3 on the cohort into ``<out>_plots/``
(they show the demo cohort's distributions: fine for made-up patients, steward-only for real
ones).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout without an install
# the public tables' module beside this script (a site-packages "benchmarks" package would
# shadow ``benchmarks.synth_public``)
sys.path.insert(1, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from connectors.cohort import cohort_contract, generate_cohort  # noqa: E402
from connectors.governed_file import DATA_FILE  # noqa: E402
from connectors.ingest import ingest_table  # noqa: E402
from connectors.schema import SchemaContract  # noqa: E402
from foundation.engine_env import configure_engine_env  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: a fixed pseudonymisation key for the demo cohort (reproducible split; not a secret)
BENCH_SECRET = hashlib.sha256(b"safe-zone bench_synth demo cohort").digest()
DELTA = 1e-6
TEST_FRACTION = 0.2
DP_METHODS = ("mst", "dp-copula")
BASELINE_METHODS = ("gaussian-copula", "ctgan")
#: quasi-identifiers for the second copy check: demographics plus the diagnosis code
QUASI_IDENTIFIERS = ("age", "sex", "primary_dx")
TARGET_FIT_RATIO = 20.0
TARGET_QUALITY = 0.85
TARGET_TSTR_SLACK = 0.03
TARGET_NEW_ROWS = 0.99


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", choices=("cohort", "public", "all"), default="all")
    parser.add_argument("--patients", type=int, default=50_000)
    parser.add_argument(
        "--methods",
        type=_csv,
        default=[*DP_METHODS, *BASELINE_METHODS],
        help="comma-separated: mst, dp-copula, gaussian-copula, ctgan, tvae",
    )
    parser.add_argument(
        "--epsilons", type=lambda s: [float(x) for x in _csv(s)], default=[1.0, 3.0, 8.0]
    )
    parser.add_argument("--ctgan-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "synth")
    parser.add_argument(
        "--public-tables",
        type=_csv,
        default=None,
        help="comma-separated names from benchmarks/synth_public.py (default: all of them)",
    )
    parser.add_argument("--public-methods", type=_csv, default=["mst", "gaussian-copula"])
    parser.add_argument(
        "--public-epsilons", type=lambda s: [float(x) for x in _csv(s)], default=[1.0, 3.0]
    )
    parser.add_argument("--repeats", type=int, default=5, help="noise draws per DP run (public)")
    parser.add_argument("--public-out", type=Path, default=RESULTS / "synth_public")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if any(e <= 0 for e in args.public_epsilons):
        parser.error("--public-epsilons must be positive")
    if args.patients < 100:
        parser.error("--patients must be at least 100")
    if args.ctgan_epochs < 1:
        parser.error("--ctgan-epochs must be at least 1")
    if any(e <= 0 for e in args.epsilons):
        parser.error("--epsilons must be positive")
    return args


def narrowed_contract(contract: SchemaContract, keep: tuple[str, ...]) -> SchemaContract:
    """The contract with only the ``keep`` columns (in contract order)."""
    return SchemaContract(
        columns=tuple(c for c in contract.columns if c.name in keep),
        rows_per_person=contract.rows_per_person,
        description=contract.description,
    )


def governed_cohort(patients: int, seed: int, work: Path) -> pa.Table:
    """The cohort as governed Parquet, read back.

    Ingested under a fixed, public secret so that the pseudonyms, and with them the person
    split, are the same on every run: fine for made-up patients, never for real ones.
    """
    contract = cohort_contract()
    source = generate_cohort(patients, seed=seed)
    ingest_table(source, contract, work / "governed", BENCH_SECRET)
    return pq.read_table(work / "governed" / DATA_FILE)


def person_split(table: pa.Table, identifier: str, seed: int) -> tuple[pa.Table, pa.Table]:
    """80/20 by person: a row is test when a hash of (seed, pseudonym) falls below 0.2."""
    ids = table.column(identifier).to_pylist()
    u = np.fromiter(
        (
            int.from_bytes(hashlib.sha256(f"{seed}:{p}".encode()).digest()[:8], "big") / 2**64
            for p in ids
        ),
        dtype=np.float64,
        count=len(ids),
    )
    test = pa.array(u < TEST_FRACTION)
    return table.filter(pc.invert(test)), table.filter(test)


def run_method(
    method: str,
    epsilon: float | None,
    train: pa.Table,
    contract: SchemaContract,
    *,
    seed: int,
    ctgan_epochs: int,
) -> Any:
    from privacy.synth import SynthMethod, fit_and_sample

    kind = SynthMethod(method)
    if kind is SynthMethod.CTGAN:
        from privacy.synth import baselines

        if "epochs" in inspect.signature(baselines.fit_and_sample_sdv).parameters:
            return baselines.fit_and_sample_sdv(
                kind, train, contract, rows=train.num_rows, seed=seed, epochs=ctgan_epochs
            )
    return fit_and_sample(
        kind,
        train,
        contract,
        epsilon=epsilon,
        delta=DELTA if epsilon is not None else None,
        rows=train.num_rows,
        seed=seed,
        noise_seed=seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-synth-"))
    configure_engine_env(work)  # before SDV is imported: its usage log goes under work/
    if args.tables in ("cohort", "all"):
        run_cohort(args, work)
    if args.tables in ("public", "all"):
        run_public(args, work)
    return 0


def run_cohort(args: argparse.Namespace, work: Path) -> None:
    """The demo-cohort part: writes ``args.out`` (.md, .json) and its plots."""
    from privacy.synth.report import build_report
    from privacy.synth.report_plots import save_plots

    load_at_start = os.getloadavg()
    full = cohort_contract()
    features = full.feature_names()
    label = full.label_names()[0]
    identifier = full.identifier
    assert identifier is not None
    contract = narrowed_contract(full, (identifier, *features, label))

    t0 = time.perf_counter()
    governed = governed_cohort(args.patients, 0, work).select(list(contract.names))
    train, test = person_split(governed, identifier, args.seed)
    print(
        f"cohort: {args.patients} patients, {len(features)} features + label; "
        f"train {train.num_rows}, test {test.num_rows} ({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )

    runs: list[tuple[str, float | None]] = []
    for method in args.methods:
        if method in DP_METHODS:
            runs.extend((method, eps) for eps in args.epsilons)
        else:
            runs.append((method, None))
    # the baseline first, so every DP fit can be compared with it as it finishes
    runs.sort(key=lambda r: r[0] != "gaussian-copula")

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    best_plot: tuple[Any, Any] | None = None
    for method, eps in runs:
        name = method if eps is None else f"{method} eps={eps:g}"
        print(f"-- {name}", flush=True)
        try:
            result = run_method(
                method, eps, train, contract, seed=args.seed, ctgan_epochs=args.ctgan_epochs
            )
        except (ImportError, ModuleNotFoundError) as exc:
            skipped.append({"method": name, "why": f"not available ({type(exc).__name__})"})
            print(f"   skipped: not available ({exc.__class__.__name__})", flush=True)
            continue
        t1 = time.perf_counter()
        report = build_report(
            train,
            test,
            result.table,
            contract,
            label=label,
            features=features,
            quasi_identifiers=QUASI_IDENTIFIERS,
            seed=args.seed,
        )
        report_seconds = time.perf_counter() - t1
        view = report.steward_view()
        # per-pair scores (171 pairs a run) and the repeated column lists stay out of the file
        for key in ("column_pair_scores", "features", "label", "quasi_identifiers"):
            view.pop(key)
        view["report_notes"] = view.pop("notes")
        row = {
            "method": method,
            "dp": eps is not None,
            "epsilon_requested": eps,
            "epsilon": result.epsilon,
            "delta": result.delta,
            "fit_s": result.fit_seconds,
            "sample_s": result.sample_seconds,
            "report_s": report_seconds,
            "ctgan_epochs": args.ctgan_epochs if method == "ctgan" else None,
            "synth_notes": list(result.notes),
            **view,
        }
        rows.append(row)
        print(
            f"   fit {result.fit_seconds:.2f} s, sample {result.sample_seconds:.2f} s, "
            f"quality {report.quality:.3f}, TSTR {report.tstr_auroc:.3f} "
            f"(TRTR {report.trtr_auroc:.3f}), new rows {report.new_row_share:.4f}, "
            f"report {report_seconds:.1f} s",
            flush=True,
        )
        if eps == 3.0 and (best_plot is None or report.tstr_auroc > best_plot[0].tstr_auroc):
            best_plot = (report, result.table)

    baseline_fit = next((r["fit_s"] for r in rows if r["method"] == "gaussian-copula"), None)
    for r in rows:
        r["fit_ratio_vs_gaussian_copula"] = r["fit_s"] / baseline_fit if baseline_fit else None

    targets = check_targets(rows)
    plots: list[str] = []
    if best_plot is not None:
        out_dir = args.out.parent / f"{args.out.name}_plots"
        plots = [
            str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
            for p in save_plots(best_plot[0], train, best_plot[1], contract, out_dir)
        ]

    meta = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in load_at_start],
        "patients": args.patients,
        "train_rows": train.num_rows,
        "test_rows": test.num_rows,
        "features": list(features),
        "label": label,
        "delta": DELTA,
        "ctgan_epochs": args.ctgan_epochs,
        "seed": args.seed,
        "tstr_model": "logistic",
        "quasi_identifiers": list(QUASI_IDENTIFIERS),
        "methods_requested": args.methods,
        "skipped": skipped,
        "wall_s": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "targets": targets, "plots": plots, "runs": rows}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2, allow_nan=False))
    args.out.with_suffix(".md").write_text(markdown(meta, rows, targets, plots))
    print(markdown_table(rows))
    for t in targets:
        print(f"target {t['target']}: {'PASS' if t['pass'] else 'FAIL'} ({t['detail']})")


def run_public(args: argparse.Namespace, work: Path) -> None:
    """The public-table part: every table of ``synth_public.TABLES`` (or ``--public-tables``)
    ingested into a fresh directory, split by person, each method fitted and scored; writes
    ``args.public_out`` (.md, .json)."""
    from synth_public import IDENTIFIER, LABEL, TABLES

    from privacy.synth.report import build_report

    names = args.public_tables or list(TABLES)
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise SystemExit(f"--public-tables: unknown table(s) {unknown}; known: {list(TABLES)}")
    load_at_start = os.getloadavg()
    t0 = time.perf_counter()
    tables: list[dict[str, Any]] = []
    warm = True
    for name in names:
        spec = TABLES[name]
        contract = spec.contract()
        dest = work / "public" / name
        ingest_table(spec.arrow(), contract, dest, BENCH_SECRET)
        governed = pq.read_table(dest / DATA_FILE)
        train, test = person_split(governed, IDENTIFIER, args.seed)
        features = [c for c in contract.names if c not in (IDENTIFIER, LABEL)]
        if warm:  # first calls import the engines: keep that out of the fit times
            for method in args.public_methods:
                eps = args.public_epsilons[0] if method in DP_METHODS else None
                run_method(method, eps, train.slice(0, 50), contract, seed=0, ctgan_epochs=1)
            warm = False
        print(
            f"{name}: {governed.num_rows} persons, {len(features)} features + label; "
            f"train {train.num_rows}, test {test.num_rows}",
            flush=True,
        )
        runs: list[dict[str, Any]] = []
        for method in args.public_methods:
            dp = method in DP_METHODS
            for eps in args.public_epsilons if dp else [None]:
                draws = []
                for r in range(args.repeats if dp else 1):
                    result = run_method(
                        method,
                        eps,
                        train,
                        contract,
                        seed=args.seed + r,
                        ctgan_epochs=args.ctgan_epochs,
                    )
                    report = build_report(
                        train,
                        test,
                        result.table,
                        contract,
                        label=LABEL,
                        features=features,
                        quasi_identifiers=spec.quasi_identifiers,
                        seed=args.seed,
                    )
                    draws.append(_public_draw(result, report))
                run = _summarise(method, eps, draws)
                runs.append(run)
                print(
                    f"   {_label(run)}: quality {run['quality']:.3f} "
                    f"(sd {run['quality_sd']:.3f}), TSTR {run['tstr_auroc']:.3f} "
                    f"(TRTR {run['trtr_auroc']:.3f}), fit {run['fit_s']:.2f} s",
                    flush=True,
                )
        tables.append(
            {
                "table": name,
                "source": spec.source,
                "label": spec.label_means,
                "persons": governed.num_rows,
                "train_rows": train.num_rows,
                "test_rows": test.num_rows,
                "features": features,
                "log_scale": [
                    c.name for c in contract.columns if getattr(c.scale, "value", "") == "log"
                ],
                "positive_rate_train": float(pc.mean(train.column(LABEL)).as_py()),
                "runs": runs,
            }
        )
    meta = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in load_at_start],
        "delta": DELTA,
        "seed": args.seed,
        "repeats": args.repeats,
        "methods": args.public_methods,
        "epsilons": args.public_epsilons,
        "tstr_model": "logistic",
        "wall_s": time.perf_counter() - t0,
    }
    out = args.public_out
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "tables": tables}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, allow_nan=False))
    out.with_suffix(".md").write_text(public_markdown(meta, tables))
    print(public_summary(tables))


#: the per-draw figures kept for the public tables (all from ``SynthReport.steward_view``)
_PUBLIC_SCORES = (
    "quality",
    "column_shapes",
    "column_pair_trends",
    "column_pair_trends_all_pairs",
    "tstr_auroc",
    "trtr_auroc",
    "dcr_median",
    "dcr_holdout_median",
    "new_row_share",
)


def _public_draw(result: Any, report: Any) -> dict[str, Any]:
    view = report.steward_view()
    out = {k: view[k] for k in _PUBLIC_SCORES}
    out.update(epsilon=result.epsilon, fit_s=result.fit_seconds, sample_s=result.sample_seconds)
    return out


def _summarise(method: str, eps: float | None, draws: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over the draws of every figure, and the standard deviation of quality and TSTR."""
    run: dict[str, Any] = {
        "method": method,
        "dp": eps is not None,
        "epsilon_requested": eps,
        "ctgan_epochs": None,
        "draws": len(draws),
    }
    for key in (*_PUBLIC_SCORES, "epsilon", "fit_s", "sample_s"):
        values = [d[key] for d in draws if d[key] is not None]
        run[key] = float(np.mean(values)) if values else None
    for key in ("quality", "tstr_auroc"):
        run[f"{key}_sd"] = float(np.std([d[key] for d in draws]))
    run["per_draw"] = draws
    return run


def _find(runs: list[dict[str, Any]], method: str, eps: float | None) -> dict[str, Any] | None:
    return next((r for r in runs if r["method"] == method and r["epsilon_requested"] == eps), None)


def public_summary(tables: list[dict[str, Any]]) -> str:
    """One line per table: quality (and TSTR) of GaussianCopula and of each DP run."""
    columns: list[tuple[str, float | None]] = []
    for t in tables:
        for r in t["runs"]:
            key = (r["method"], r["epsilon_requested"])
            if key not in columns:
                columns.append(key)
    columns.sort(key=lambda k: (k[0] != "gaussian-copula", k[0], k[1] or 0.0))
    names = [m if e is None else f"{m} eps={e:g}" for m, e in columns]
    head = (
        "| table | persons | "
        + " | ".join(f"{n} quality" for n in names)
        + " | TRTR | "
        + " | ".join(f"{n} TSTR" for n in names)
        + " |\n|"
        + "---|" * (3 + 2 * len(names))
        + "\n"
    )
    lines = []
    for t in tables:
        runs = [_find(t["runs"], m, e) for m, e in columns]
        quality = [
            "-"
            if r is None
            else f"{r['quality']:.3f}" + (f" ± {r['quality_sd']:.3f}" if r["draws"] > 1 else "")
            for r in runs
        ]
        tstr = ["-" if r is None else f"{r['tstr_auroc']:.3f}" for r in runs]
        trtr = next((r["trtr_auroc"] for r in runs if r is not None), None)
        lines.append(
            f"| {t['table']} | {t['persons']} | "
            + " | ".join(quality)
            + f" | {_f(trtr, '.3f')} | "
            + " | ".join(tstr)
            + " |"
        )
    return head + "\n".join(lines) + "\n"


def public_markdown(meta: dict[str, Any], tables: list[dict[str, Any]]) -> str:
    parts = [
        "# Synthetic data on public clinical tables: MST beside GaussianCopula\n",
        "Public tables shipped inside pip packages (scikit-survival's `sksurv.datasets`, "
        "lifelines' `lifelines.datasets`), each with a binary label (the study's event "
        "indicator) and a schema contract written by hand in `benchmarks/synth_public.py` "
        "(types, vocabularies and plausible domains from each dataset's published "
        'documentation, not from the rows; heavy-tailed columns `scale = "log"`). Each '
        "table is ingested into a fresh directory, read back and split by person: 80% train "
        "(fitted on, and sampled back in equal number), 20% held out. "
        f"DP: delta {meta['delta']:g}, add/remove one person, one row per person; every DP "
        f"run is {meta['repeats']} noise draws (noise seeds {meta['seed']}.."
        f"{meta['seed'] + meta['repeats'] - 1}), figures are their mean (± standard "
        "deviation); GaussianCopula (SDV, not DP) is one fit. "
        f"Machine: {meta['machine']}, {meta['cpus']} CPUs, shared with other work (load "
        f"average at start {meta['load_average_at_start'][0]}); one run, methods one after "
        f"another. Wall time {meta['wall_s']:.0f} s.\n",
        "## Quality and TSTR\n",
        public_summary(tables),
        "*quality*: sdmetrics' overall score (mean of column shapes and column pair trends "
        "over the pairs past sdmetrics' real-correlation threshold); *TSTR*: logistic "
        "regression trained on the synthetic rows, AUROC on the held-out real rows; *TRTR*: "
        "the same model trained on the real training rows. The held-out parts are small "
        f"({min(t['test_rows'] for t in tables)} to {max(t['test_rows'] for t in tables)} "
        "persons), so TSTR and TRTR move by several hundredths between splits.\n",
        "## Tables\n",
        "| table | persons (train / test) | label | positive rate (train) | features | "
        "declared log scale |\n|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {t['table']} | {t['persons']} ({t['train_rows']} / {t['test_rows']}) | "
            f"{t['label']} | {t['positive_rate_train']:.3f} | {len(t['features'])} | "
            f"{', '.join(t['log_scale']) or '-'} |"
            for t in tables
        )
        + "\n",
        "Sources: " + "; ".join(f"{t['table']}: {t['source']}" for t in tables) + ".\n",
        "## Every figure\n",
    ]
    for t in tables:
        parts.append(f"### {t['table']}\n")
        parts.append(
            "| method | epsilon (spent) | fit s | quality | shapes | pairs (sdm.) | "
            "pairs (all) | TSTR | TRTR | DCR med | holdout DCR med | new rows |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
            + "\n".join(
                f"| {_label(r)} | "
                + ("not DP" if not r["dp"] else f"{r['epsilon_requested']:g} ({r['epsilon']:.3f})")
                + f" | {r['fit_s']:.2f} | {r['quality']:.3f} | {r['column_shapes']:.3f} | "
                f"{_f(r['column_pair_trends'], '.3f')} | "
                f"{_f(r['column_pair_trends_all_pairs'], '.3f')} | {r['tstr_auroc']:.3f} | "
                f"{r['trtr_auroc']:.3f} | {r['dcr_median']:.3f} | "
                f"{r['dcr_holdout_median']:.3f} | {r['new_row_share']:.4f} |"
                for r in t["runs"]
            )
            + "\n"
        )
    parts.append(
        "Column meanings as in `synth.md` (*pairs (sdm.)*: sdmetrics' pair trends over the "
        "pairs past its threshold; *pairs (all)*: the mean over every pair; *DCR*: distance "
        "to the closest real training row on contract-scaled features, *holdout* the same "
        "for held-out real rows). sdmetrics 0.32 bins a numeric column of each table over "
        "that table's own range before comparing pairs, so a synthetic column whose extremes "
        "differ from the real ones (a DP synthesizer cannot know the real extremes) loses "
        "pair score even where its distribution is close.\n"
    )
    return "\n".join(parts)


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    dp = [r for r in rows if r["dp"]]
    ratios = [r["fit_ratio_vs_gaussian_copula"] for r in dp if r["fit_ratio_vs_gaussian_copula"]]
    if ratios:
        worst = max(dp, key=lambda r: r["fit_ratio_vs_gaussian_copula"] or 0.0)
        out.append(
            {
                "target": f"DP fit <= {TARGET_FIT_RATIO:g}x GaussianCopula fit",
                "pass": max(ratios) <= TARGET_FIT_RATIO,
                "detail": f"worst {max(ratios):.3g}x ({_label(worst)})",
            }
        )
    at3 = [r for r in dp if r["epsilon_requested"] == 3.0]
    if at3:
        best = max(at3, key=lambda r: (r["tstr_auroc"], r["quality"]))
        out.append(
            {
                "target": f"best DP at eps=3: quality >= {TARGET_QUALITY}",
                "pass": best["quality"] >= TARGET_QUALITY,
                "detail": f"{_label(best)}: {best['quality']:.3f}",
            }
        )
        out.append(
            {
                "target": f"best DP at eps=3: TSTR >= TRTR - {TARGET_TSTR_SLACK}",
                "pass": best["tstr_auroc"] >= best["trtr_auroc"] - TARGET_TSTR_SLACK,
                "detail": (
                    f"{_label(best)}: TSTR {best['tstr_auroc']:.3f} vs TRTR "
                    f"{best['trtr_auroc']:.3f}"
                ),
            }
        )
    if dp:
        worst_new = min(dp, key=lambda r: r["new_row_share"])
        out.append(
            {
                "target": f"DP new-row share >= {TARGET_NEW_ROWS}",
                "pass": worst_new["new_row_share"] >= TARGET_NEW_ROWS,
                "detail": f"lowest {worst_new['new_row_share']:.4f} ({_label(worst_new)})",
            }
        )
    return out


def _label(r: dict[str, Any]) -> str:
    if r["epsilon_requested"] is None:
        return r["method"] + (f" ({r['ctgan_epochs']} epochs)" if r["ctgan_epochs"] else "")
    return f"{r['method']} eps={r['epsilon_requested']:g}"


def _f(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| method | epsilon (spent) | fit s | x GC fit | sample s | quality | shapes | "
        "pairs (sdm.) | pairs (all) | TSTR | TRTR | gap | DCR med | DCR p5 | "
        "holdout DCR med / p5 | new rows | new rows (QI) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        eps = "not DP" if not r["dp"] else f"{r['epsilon_requested']:g} ({r['epsilon']:.3f})"
        lines.append(
            f"| {_label(r)} | {eps} | {r['fit_s']:.2f} | "
            f"{_f(r['fit_ratio_vs_gaussian_copula'], '.3g')} | {r['sample_s']:.2f} | "
            f"{r['quality']:.3f} | {r['column_shapes']:.3f} | "
            f"{_f(r['column_pair_trends'], '.3f')} | {_f(r['column_pair_trends_all_pairs'], '.3f')} | "
            f"{r['tstr_auroc']:.3f} | {r['trtr_auroc']:.3f} | {r['tstr_gap']:+.3f} | "
            f"{r['dcr_median']:.3f} | {r['dcr_p05']:.3f} | "
            f"{r['dcr_holdout_median']:.3f} / {r['dcr_holdout_p05']:.3f} | "
            f"{r['new_row_share']:.4f} | {_f(r['new_row_share_qi'], '.4f')} |"
        )
    return head + "\n".join(lines) + "\n"


def markdown(
    meta: dict[str, Any],
    rows: list[dict[str, Any]],
    targets: list[dict[str, Any]],
    plots: list[str],
) -> str:
    parts = [
        "# Synthetic data: DP synthesizers beside SDV's non-DP baselines\n",
        f"Demo cohort, {meta['patients']} patients (`generate_cohort(seed=0)`), ingested and "
        f"read back; {len(meta['features'])} contract features + `{meta['label']}`; split by "
        f"person: {meta['train_rows']} train (fitted on, and sampled back in equal number), "
        f"{meta['test_rows']} held out. DP: delta {meta['delta']:g}, add/remove one person, "
        f"one row per person. CTGAN: {meta['ctgan_epochs']} epochs, CPU. "
        f"Machine: {meta['machine']}, {meta['cpus']} CPUs, shared with other work (load average "
        f"at start {meta['load_average_at_start'][0]}); one run, methods one after another. "
        f"Wall time {meta['wall_s']:.0f} s.\n",
        markdown_table(rows),
        "Columns: *quality* is sdmetrics' overall score (mean of *shapes* and *pairs (sdm.)*); "
        "sdmetrics 0.32 scores *pairs (sdm.)* only over column pairs whose real correlation "
        "exceeds 0.5 (or association 0.3), which on this cohort is a handful of pairs; *pairs "
        "(all)* is the mean over every pair. *TSTR*: logistic regression trained on the "
        "synthetic rows, AUROC on the held-out real rows; *TRTR*: the same model trained on "
        "the real training rows; *gap* = TRTR - TSTR. *DCR*: Euclidean distance from a "
        "synthetic row to its nearest real training row, on features scaled by the contract's "
        "domains (a category mismatch counts 1), median and 5th percentile over 5,000 sampled "
        "rows; *holdout DCR* is the same for held-out real rows, the yardstick. *new rows*: "
        "share of synthetic rows that copy no real row in every column; *(QI)*: in "
        f"{', '.join(meta['quasi_identifiers'])} only. *x GC fit*: fit time over "
        "GaussianCopula's.\n",
        "How to read the closeness columns: every category mismatch adds exactly 1 to the "
        "squared distance, so a DCR median near 1.0 means the nearest real row typically "
        "differs in one category; the figure to compare is the holdout yardstick (synthetic "
        "rows markedly *closer* to the training rows than fresh real rows are would suggest "
        "memorisation). An exact-copy check is easily passed: a synthesizer that decodes a "
        "bin to a uniform draw inside it writes non-integral ages, so its rows match no real "
        "row even on a few quasi-identifiers; DCR is not fooled by that.\n",
        "## Targets\n",
        "| target | result | detail |\n|---|---|---|\n"
        + "\n".join(
            f"| {t['target']} | {'PASS' if t['pass'] else 'FAIL'} | {t['detail']} |"
            for t in targets
        )
        + "\n",
    ]
    if meta["skipped"]:
        parts.append(
            "## Not run\n\n"
            + "\n".join(f"- {s['method']}: {s['why']}" for s in meta["skipped"])
            + "\n"
        )
    if plots:
        parts.append(
            "## Plots (best DP run at epsilon 3)\n\n"
            + "\n".join(f"- `{p}`" for p in plots)
            + "\n\nThey draw the cohort's real distributions: for demo data only; for real "
            "data they are steward-only.\n"
        )
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
