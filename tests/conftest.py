from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pg_cluster
import pytest
from sqlalchemy import Engine

from foundation.engine_env import configure_engine_env

# Each pytest worker is one core's worth of work (`make test` runs two on two cores). torch's
# own pool would add a second thread per worker and spin it between the tests' small ops:
# ~25% more CPU on the training tests (tests/training/test_optimizers.py, test_trainer.py,
# tests/sandbox/test_tuning.py: 19.8 -> 14.8 CPU-s alone; the whole run, interleaved with one
# without it: 670 -> 654 busy CPU-s, 355.7 -> 349.8 s). Set before anything imports torch;
# child processes (CLI calls, Ray's raylet and workers) inherit it, and Ray gives each actor
# its own count from its CPUs anyway.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole test session (each start costs seconds)."""
    import ray

    scratch = Path(tempfile.mkdtemp(prefix="sz-test-"))
    configure_engine_env(scratch)
    from sandbox.ray_backend import RayBackend

    tmp = Path(tempfile.mkdtemp(prefix="szr-"))
    # the product's start: a second try when the raylet misses Ray's fixed 30 s on busy cores
    RayBackend._init(
        ray,
        {
            "address": "local",
            "num_cpus": 2,
            "include_dashboard": False,
            "_temp_dir": str(tmp),
            "log_to_driver": False,
            "logging_level": "ERROR",
        },
    )
    yield ray
    ray.shutdown()


def pytest_report_header(config: pytest.Config) -> str:
    why = pg_cluster.why_not()
    if why is None:
        where = (
            "the server in " + pg_cluster.PG_ENV
            if os.environ.get(pg_cluster.PG_ENV)
            else ("a throwaway cluster on loopback")
        )
        return f"PostgreSQL cases: run, on {where}"
    return f"PostgreSQL cases: SKIPPED ({why})"


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """An admin URL of a PostgreSQL server for this test session (skips, saying why, when
    there is none)."""
    why = pg_cluster.why_not()
    if why is not None:
        pytest.skip(why)
    with pg_cluster.cluster() as url:
        yield url


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    with pg_cluster.fresh_database(pg_admin_url) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty state database on each engine the product supports."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'zone.db'}"
        return
    admin = request.getfixturevalue("pg_admin_url")
    with pg_cluster.fresh_database(admin) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], Engine]]:
    """Makes a fresh, empty ledger database per call, on the parametrised backend."""
    from foundation.sql import make_engine

    made: list[Engine] = []
    counter = itertools.count()
    with ExitStack() as stack:
        if request.param == "sqlite":

            def make() -> Engine:
                engine = make_engine(f"sqlite:///{tmp_path / f'ledger-{next(counter)}.db'}")
                made.append(engine)
                return engine

        else:
            admin = request.getfixturevalue("pg_admin_url")

            def make() -> Engine:
                engine = make_engine(stack.enter_context(pg_cluster.fresh_database(admin)))
                made.append(engine)
                return engine

        yield make
        for engine in made:
            engine.dispose()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line that says whether the PostgreSQL cases ran (``-q`` hides the header)."""
    stats = terminalreporter.stats

    def count(kind: str) -> int:
        return sum(1 for r in stats.get(kind, []) if "postgresql" in getattr(r, "nodeid", ""))

    ran, skipped = count("passed") + count("failed"), count("skipped")
    if ran or skipped:
        why = pg_cluster.why_not()
        terminalreporter.write_line(
            f"PostgreSQL cases: {ran} ran, {skipped} skipped" + (f" ({why})" if why else "")
        )
