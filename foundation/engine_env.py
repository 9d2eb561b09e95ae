"""Keep the engines (Ray, Flower, SDV) off the network and inside the zone.

It lives in ``connectors`` (the bottom of the import graph) because every package starts an
engine: privacy (SDV), training (Flower, Ray) and sandbox (Ray).

Called by every code path that starts an engine (the service, the Ray worker, the demo,
the tests), not only by the Makefile, so no entry point can forget it. Values already set by
the operator win (``setdefault``), except the ones that would open the zone to the network.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

# forced: a user's environment must not switch these back on
_FORCED = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # without it Ray listens on every address and on a non-loopback node IP
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "TOKENIZERS_PARALLELISM": "false",
    # keep accelerator visibility as the operator set it (and silence Ray's FutureWarning)
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def ray_temp_dir(zone_dir: Path) -> Path:
    """A short per-zone Ray temp dir.

    Ray puts unix sockets under it and socket paths are capped at 107 bytes, so a deep zone
    folder (pytest's tmp_path) cannot hold it; a short folder in the system temp dir named
    after the zone keeps zones apart.
    """
    digest = hashlib.sha256(str(zone_dir.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"sz-ray-{digest}"


def configure_engine_env(zone_dir: Path) -> None:
    """Set the engine environment for a process working on ``zone_dir``."""
    for key, value in _FORCED.items():
        os.environ[key] = value
    engines = zone_dir / "engines"
    os.environ.setdefault("FLWR_HOME", str(engines / "flwr"))
    # SDV writes a usage log under XDG_DATA_HOME/sdv
    os.environ.setdefault("XDG_DATA_HOME", str(engines / "xdg"))
    os.environ.setdefault("RAY_TMPDIR", str(ray_temp_dir(zone_dir)))
