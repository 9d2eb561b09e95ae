"""DP-SGD per-step cost: our book-keeping clipping beside non-private SGD and Opacus.

Model: MLP 40-256-256-1 with BCE-with-logits, the one-logit equivalent of a 2-output
softmax with cross-entropy (the trainer is for binary labels; the 2-logit form only adds a
redundant output row). 50,000 synthetic rows in memory, Poisson sampling with expected
batch 512, ``torch.set_num_threads(2)`` on the CPU.

    (a) non-private SGD: the same Poisson batch path (``trainer.poisson_batch``), forward,
        backward, SGD update; no clipping, no noise
    (b) ours: ``train_dpsgd`` with book-keeping clipping (``training.fastdp``)
    (c) ``train_dpsgd`` with Opacus ghost clipping
    (d) ``train_dpsgd`` with Opacus per-sample gradients (hooks)

(b)-(d) include noise and the update, so "x non-private" is the whole price of privacy
per step. Each timed run takes ``--steps`` steps; methods are interleaved round by round
(so load from other processes falls on all of them alike) and the table gives the median
and the best of ``--rounds`` runs. Also timed alone: sampling plus batch assembly, as a
share of a step.

    python benchmarks/bench_dpsgd.py [--device cpu|cuda] [--steps 50] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout without an install

from training.dpsgd_config import Clipping, DPSGDConfig  # noqa: E402
from training.models import ModelConfig, ModelKind, build_model  # noqa: E402
from training.trainer import poisson_batch, train_dpsgd  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ROWS, FEATURES, HIDDEN, BATCH = 50_000, 40, (256, 256), 512
LR, CLIP, SIGMA = 0.1, 1.0, 1.0

METHODS = ("non-private", "ours (book-keeping)", "opacus ghost", "opacus hooks")
CLIPPING = {
    "ours (book-keeping)": Clipping.BOOK_KEEPING,
    "opacus ghost": Clipping.OPACUS_GHOST,
    "opacus hooks": Clipping.OPACUS_HOOKS,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _data(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(ROWS, FEATURES, generator=gen)
    w = torch.randn(FEATURES, generator=gen) / FEATURES**0.5
    y = (torch.rand(ROWS, generator=gen) < torch.sigmoid(X @ w)).float()
    return X.to(device), y.to(device)


def _model(device: torch.device) -> torch.nn.Module:
    return build_model(ModelConfig(ModelKind.MLP, HIDDEN), FEATURES, 1, seed=0).to(device)


def non_private_run(X: torch.Tensor, y: torch.Tensor, steps: int, device: torch.device) -> float:
    """Seconds per step of plain SGD over the trainer's own sampling path."""
    model = _model(device)
    y = y.reshape(-1, 1)
    q = BATCH / ROWS
    gen = torch.Generator(device=device).manual_seed(1)
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")
    params = list(model.parameters())
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        Xb, yb = poisson_batch(X, y, q, gen)
        for p in params:
            p.grad = None
        loss_fn(model(Xb), yb).backward()
        with torch.no_grad():  # the same multi-tensor update the trainer uses
            torch._foreach_add_(params, [p.grad for p in params], alpha=-LR / BATCH)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def dp_run(
    kind: Clipping, X: torch.Tensor, y: torch.Tensor, steps: int, device: torch.device
) -> float:
    model = _model(device)
    cfg = DPSGDConfig(
        sample_rate=BATCH / ROWS,
        steps=steps,
        lr=LR,
        max_grad_norm=CLIP,
        noise_multiplier=SIGMA,
        seed=1,
        device=device.type,
        clipping=kind,
    )
    return train_dpsgd(model, X, y, cfg).seconds / steps


def sampling_time(
    X: torch.Tensor, y: torch.Tensor, device: torch.device, calls: int = 300
) -> float:
    gen = torch.Generator(device=device).manual_seed(2)
    y = y.reshape(-1, 1)
    times = []
    for _ in range(calls):
        _sync(device)
        t0 = time.perf_counter()
        poisson_batch(X, y, BATCH / ROWS, gen)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine(device: torch.device) -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import opacus

        info["opacus"] = opacus.__version__
    except ImportError:  # pragma: no cover - the trainer would have failed first
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ap.add_argument("--device", choices=devices, default="cpu")
    ap.add_argument("--steps", type=int, default=50, help="steps per timed run")
    ap.add_argument("--rounds", type=int, default=7, help="timed runs per method (interleaved)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    X, y = _data(device)
    runs: dict[str, Callable[[], float]] = {
        "non-private": lambda: non_private_run(X, y, args.steps, device),
        **{
            name: (lambda k=kind: dp_run(k, X, y, args.steps, device))
            for name, kind in CLIPPING.items()
        },
    }
    load_before = os.getloadavg()
    for run in runs.values():  # warm-up: allocator, BLAS threads, Opacus imports
        run()
    per_step: dict[str, list[float]] = {name: [] for name in METHODS}
    for r in range(args.rounds):
        for name in METHODS:
            per_step[name].append(runs[name]())
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{n} {per_step[n][-1] * 1e3:.2f} ms" for n in METHODS),
            flush=True,
        )
    sample = sampling_time(X, y, device)
    load_after = os.getloadavg()

    base_med = statistics.median(per_step["non-private"])
    base_best = min(per_step["non-private"])
    rows = []
    for name in METHODS:
        med, best = statistics.median(per_step[name]), min(per_step[name])
        rows.append(
            {
                "method": name,
                "median_ms": med * 1e3,
                "best_ms": best * 1e3,
                "x_nonprivate_median": med / base_med,
                "x_nonprivate_best": best / base_best,
                "runs_ms": [t * 1e3 for t in per_step[name]],
            }
        )
    ours_med = statistics.median(per_step["ours (book-keeping)"])
    result = {
        "device": device.type,
        "machine": machine(device),
        "setup": {
            "rows": ROWS,
            "features": FEATURES,
            "hidden": list(HIDDEN),
            "outputs": 1,
            "loss": "BCEWithLogits, sum (1-logit equivalent of 2-output cross-entropy)",
            "expected_batch": BATCH,
            "sample_rate": BATCH / ROWS,
            "steps_per_run": args.steps,
            "rounds": args.rounds,
            "noise_multiplier": SIGMA,
            "max_grad_norm": CLIP,
        },
        "load_average_before": load_before,
        "load_average_after": load_after,
        "methods": rows,
        "sampling_ms": sample * 1e3,
        "sampling_share_of_nonprivate_step": sample / base_med,
        "sampling_share_of_our_step": sample / ours_med,
        "target_ours_x_nonprivate": 1.5,
    }

    m = result["machine"]
    lines = [
        f"# DP-SGD per-step time ({device.type})",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} CPUs visible, torch threads {m['torch_threads']})"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']}, opacus {m.get('opacus', '?')}, Python {m['python']}.",
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; "
        f"after: {', '.join(f'{v:.2f}' for v in load_after)}.",
        "",
        f"MLP {FEATURES}-{'-'.join(map(str, HIDDEN))}-1, BCE-with-logits (1-logit equivalent of 2-output CE), "
        f"{ROWS:,} rows in memory, Poisson sampling q = {BATCH}/{ROWS:,} (expected batch {BATCH}); "
        f"DP runs add noise (sigma {SIGMA}, C {CLIP}). {args.rounds} interleaved runs of {args.steps} steps each.",
        "",
        "| method | median ms/step | best ms/step | x non-private (median) | x non-private (best) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['median_ms']:.2f} | {row['best_ms']:.2f} | "
            f"{row['x_nonprivate_median']:.2f} | {row['x_nonprivate_best']:.2f} |"
        )
    lines += [
        "",
        f"Sampling + batch assembly (`poisson_batch`): {sample * 1e3:.3f} ms, "
        f"{100 * sample / base_med:.1f}% of a non-private step, {100 * sample / ours_med:.1f}% of ours "
        "(target <= 10%).",
        f"Target: ours <= 1.5x non-private; measured {ours_med / base_med:.2f}x (median).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"dpsgd_{device.type}.md").write_text(text)
    (args.out / f"dpsgd_{device.type}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
