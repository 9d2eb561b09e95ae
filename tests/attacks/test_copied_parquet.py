"""Attack: copy a governed dataset's Parquet out of the zone and read it elsewhere.

Before encryption at rest the governed file was plain Parquet: anyone who could copy it (a
backup, a stray ``cp``, a disk image) could read every pseudonymised row with pyarrow, and the
kept values (diagnosis codes, ethnicity, including the planted canaries) sat in its bytes.
Now the footer and every column are encrypted under a key of the dataset's own, wrapped by
the zone's ``data.key``, which never sits in a dataset folder: the copied file, or the whole
copied folder, opens nowhere, and no value is in its bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from factories import LABEL, make_world

from connectors.cohort import Canaries, cohort_contract, generate_cohort
from connectors.dataset_handle import DatasetHandle
from connectors.dataset_key import WRAPPED_KEY_FILE
from connectors.governed_file import DATA_FILE, dataset_summary
from connectors.ingest import ingest_table
from foundation.errors import ZoneError

CANARIES = Canaries.make(seed=31)


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("copied-parquet") / "zone"
    world = make_world(root, patients=400, canaries=CANARIES, grant_epsilon=None)
    world.svc.close()
    return root


def _unreadable_by_pyarrow(file: Path) -> None:
    for read in (pq.read_table, pq.read_metadata, pq.read_schema, pq.ParquetFile):
        with pytest.raises((OSError, pa.ArrowException)):
            read(file)


def test_the_governed_file_is_encrypted_at_rest(zone: Path) -> None:
    data = (zone / "data" / "cohort" / DATA_FILE).read_bytes()
    assert data[:4] == b"PARE" and data[-4:] == b"PARE"  # encrypted footer, not "PAR1"
    key = (zone / "data" / "cohort" / WRAPPED_KEY_FILE).stat()
    assert key.st_mode & 0o777 == 0o600


def test_a_copied_file_cannot_be_read_by_pyarrow(zone: Path, tmp_path: Path) -> None:
    stolen = tmp_path / "stolen.parquet"
    shutil.copy(zone / "data" / "cohort" / DATA_FILE, stolen)
    _unreadable_by_pyarrow(stolen)


def test_a_copied_folder_with_its_wrapped_key_opens_nowhere(zone: Path, tmp_path: Path) -> None:
    stolen = tmp_path / "outside" / "data" / "cohort"
    shutil.copytree(zone / "data" / "cohort", stolen)
    _unreadable_by_pyarrow(stolen / DATA_FILE)
    with pytest.raises(ZoneError) as err:
        dataset_summary(stolen, cohort_contract())
    assert "CANARY" not in str(err.value)
    # not even through connectors with a handle: the zone's key is not in the folder
    from connectors.preprocess import FeaturePlan
    from connectors.reader import load_tensors

    handle = DatasetHandle("cohort", stolen, cohort_contract(), authorization="thief")
    with pytest.raises(ZoneError):
        load_tensors(handle, FeaturePlan.from_contract(cohort_contract(), ["age"]), LABEL)
    assert not handle.opened


def test_no_canary_or_raw_value_is_in_the_files_bytes(zone: Path, tmp_path: Path) -> None:
    data = (zone / "data" / "cohort" / DATA_FILE).read_bytes()
    # the control: a plain governed file of the same cohort carries the kept canaries, the
    # site names, the column names and the footer's counts in its bytes
    plain = ingest_table(
        generate_cohort(400, seed=1, canaries=CANARIES),
        cohort_contract(),
        tmp_path / "plain",
        b"s" * 32,
    ).path.read_bytes()
    # (the primary_dx canary sits in a snappy-compressed dictionary page, so it may not)
    kept = [CANARIES.ethnicity.encode()]
    telling = [b"hospital-a", b"readmitted_30d", b"safe_zone", b"primary_dx"]
    assert all(v in plain for v in kept + telling)
    for value in [c.encode() for c in CANARIES.values()] + telling:
        assert value not in data, value


def test_the_zone_still_reads_its_own_file(zone: Path) -> None:
    summary = dataset_summary(zone / "data" / "cohort", cohort_contract())
    assert summary["rows"] == 400 and LABEL in summary["columns"]


def test_a_plain_file_from_before_encryption_still_reads(tmp_path: Path) -> None:
    report = ingest_table(
        generate_cohort(300, seed=2), cohort_contract(), tmp_path / "old", b"k" * 32
    )
    assert report.path.read_bytes()[-4:] == b"PAR1"
    assert dataset_summary(tmp_path / "old", cohort_contract())["rows"] == 300
