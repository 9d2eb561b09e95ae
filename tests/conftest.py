from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from connectors.engine_env import configure_engine_env


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
