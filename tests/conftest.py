from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from foundation.engine_env import configure_engine_env


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole test session (each start costs seconds)."""
    import ray

    scratch = Path(tempfile.mkdtemp(prefix="sz-test-"))
    configure_engine_env(scratch)
    tmp = Path(tempfile.mkdtemp(prefix="szr-"))
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(tmp),
        log_to_driver=False,
        logging_level="ERROR",
    )
    yield ray
    ray.shutdown()


#: set to a PostgreSQL URL to run the ledger's contract and race tests against PostgreSQL too
PG_ENV = "SANDBOX_TEST_PG_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], Engine]]:
    """Makes a fresh, empty ledger database per call, on the parametrised backend."""
    from foundation.sql import make_engine
    from privacy.ledger_schema import metadata

    made: list[Engine] = []
    counter = itertools.count()
    if request.param == "sqlite":

        def make() -> Engine:
            engine = make_engine(f"sqlite:///{tmp_path / f'ledger-{next(counter)}.db'}")
            made.append(engine)
            return engine

    else:
        url = os.environ.get(PG_ENV)
        if not url:
            pytest.skip(f"set {PG_ENV} to run the ledger tests against PostgreSQL")

        def make() -> Engine:
            engine = make_engine(url)
            metadata.drop_all(engine)  # test setup only: the ledger itself never drops
            made.append(engine)
            return engine

    yield make
    for engine in made:
        engine.dispose()
