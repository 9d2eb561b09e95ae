"""Submit -> running on a warm local Ray, beside a plain Ray task on the same Ray.

The project's figure is the time from ``Service.submit`` to the worker marking the job
RUNNING (policy decision, ledger reservation, job row, Ray scheduling, worker start); the
baseline is a bare ``ray.remote`` no-op round trip on the same warm cluster. Also reported:
Ray's cold start (paid once per zone process, not per job).

    python benchmarks/bench_submit.py [--patients 5000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from figures import write_figures  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import ray
    from factories import job_spec, make_world

    from sandbox.jobs import JobState
    from sandbox.ray_backend import RayBackend

    root = Path(tempfile.mkdtemp(prefix="bench-submit-")) / "zone"
    backend = RayBackend(root)
    w = make_world(root, backend, patients=args.patients, grant_epsilon=50.0)
    cold = backend.warm_up()

    @ray.remote(num_cpus=1)
    def noop() -> int:
        return 1

    ray.get(noop.remote())  # warm a worker
    plain = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ray.get(noop.remote())
        plain.append(time.perf_counter() - t0)

    to_running = []
    total = []
    for i in range(args.repeats):
        spec = job_spec(**{"training.epochs": 1, "training.seed": i, "privacy.epsilon": 1.0})
        t0 = time.perf_counter()
        seen: dict[str, float] = {}
        stop = threading.Event()

        def watch(stop=stop, seen=seen, t0=t0) -> None:
            while not stop.is_set():
                for j in w.svc.jobs.list():
                    if j.state is not JobState.QUEUED and j.id not in seen:
                        seen[j.id] = time.perf_counter() - t0
                time.sleep(0.005)

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        job = w.svc.submit(w.researcher, spec)
        total.append(time.perf_counter() - t0)
        stop.set()
        th.join()
        to_running.append(seen.get(job.id, float("nan")))
    w.svc.close()

    med_run = statistics.median(to_running)
    med_plain = statistics.median(plain)
    rows = {
        "machine": platform.processor() or platform.machine(),
        "ray_cold_start_s": round(cold, 3),
        "plain_ray_task_roundtrip_ms": round(med_plain * 1000, 2),
        "submit_to_running_ms": round(med_run * 1000, 1),
        f"submit_to_done_s (1 epoch, {args.patients} patients)": round(statistics.median(total), 3),
        "ratio_submit_to_running_vs_plain_task": round(med_run / med_plain, 1),
        "repeats": args.repeats,
    }
    print(write_figures("submit", "Submit -> running on a warm local Ray", rows))


if __name__ == "__main__":
    main()
