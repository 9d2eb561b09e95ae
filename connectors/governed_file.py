"""The governed Parquet file: its layout, how ingest writes it, how readers check it.

Layout of a governed dataset (``dest_dir``)::

    dest_dir/data.parquet     one file, rows sorted by (site, pseudonym), encrypted
    dest_dir/dataset.key      the dataset's data key, wrapped by the zone's key

Why one sorted file: every row group holds rows of a single site (groups are cut at site
boundaries), so each group's site statistics have min == max and a site filter skips whole
groups from the footer alone, without the file-per-site directory names that would put site
values into paths. Sorting by pseudonym inside a site puts a person's rows side by side and
drops the source's row order (which can carry admission order). The footer's key-value
metadata (key ``safe_zone``) holds the contract and the counts (rows, persons, rows per site)
so that summaries never read rows.

Writing is atomic: the file is written into a temporary directory beside ``dest_dir`` and
renamed into place; a failed ingest removes it and leaves nothing at ``dest_dir``.

Encryption at rest (``connectors.dataset_key``): when ingest is given the zone's key file, the
footer and every column are encrypted (Parquet modular encryption) under keys wrapped by a key
of this dataset's own, itself wrapped by the zone's key; a copy of the file, or of the whole
folder, taken out of the zone opens nowhere. A file whose footer is plain (written before
encryption, or by a test without a zone) is read as it is.

Reading starts from the footer: ``dataset_summary`` answers rows, persons and rows per site
from it alone, and the reader checks the footer's layout version and the file's schema
against the contract before it decodes a row.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from connectors.dataset_key import (
    Decryption,
    decryption,
    destroy_data_key,
    encryption_properties,
    is_encrypted,
    load_data_key,
    new_wrapped_key,
)
from connectors.schema import SchemaContract
from foundation.errors import BackendError, NotFoundError, SchemaError

#: file name of the governed Parquet inside a dataset directory
DATA_FILE = "data.parquet"
#: footer key-value metadata key holding the contract and counts (JSON)
METADATA_KEY = b"safe_zone"
#: version of the governed layout, so a future reader can refuse what it does not know
LAYOUT_VERSION = 1
# 128 Ki rows per row group: a float32 column chunk is ~0.5 MiB, so a site filter prunes at
# a fine grain and decoding spreads over threads, while per-group costs (footer entries,
# page headers, per-group read calls) stay well under 1% of a read.
ROW_GROUP_ROWS = 131_072


# --- writing ----------------------------------------------------------------------------------


def _write_atomically(
    governed: pa.Table,
    dest: Path,
    slices: list[int],
    metadata: dict[str, object],
    id_name: str | None,
    zone_key_file: Path | None = None,
) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.ingest-", dir=dest.parent))
    try:
        target = tmp / DATA_FILE
        encryption = None
        if zone_key_file is not None:
            # tmp and dest are siblings: the zone key's relative path is the same from both
            key = new_wrapped_key(tmp, zone_key_file, dest.name)
            encryption = encryption_properties(key)
        schema = governed.schema.with_metadata({METADATA_KEY: json.dumps(metadata).encode()})
        # pseudonyms are all distinct: a dictionary page for them would only be discarded
        dictionary_columns = [n for n in governed.column_names if n != id_name]
        with pq.ParquetWriter(
            target,
            schema,
            compression="snappy",
            use_dictionary=dictionary_columns,
            write_statistics=True,
            encryption_properties=encryption,
        ) as writer:
            start = 0
            # one write per site: a row group never spans two sites (see the module docstring)
            for count in slices:
                writer.write_table(governed.slice(start, count), row_group_size=ROW_GROUP_ROWS)
                start += count
        with target.open("rb") as handle:
            os.fsync(handle.fileno())
        if dest.exists():
            dest.rmdir()  # empty (checked before any work); rename replaces no directory
        os.rename(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BackendError(
            f"could not write the governed dataset at {dest}: {exc.strerror}", retryable=True
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(dest.parent)
    return dest / DATA_FILE


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems cannot open directories; the rename already happened
    try:
        os.fsync(fd)
    except OSError:
        pass  # best effort: durability of the directory entry, not correctness
    finally:
        os.close(fd)


def remove_governed(dest: Path) -> bool:
    """Delete a governed dataset's folder: its data key first, then its files.

    Returns whether a data key was destroyed (False for a plain dataset from before
    encryption at rest, whose copies stay readable). The key goes first: should removing the
    files fail half way, what is left (and any copy or backup of data.parquet) is already
    unreadable.
    """
    if not dest.exists():
        return False
    destroyed = destroy_data_key(dest)
    try:
        shutil.rmtree(dest)
    except OSError as exc:
        raise BackendError(
            f"could not remove the dataset's files at {dest}: {exc.strerror}", retryable=True
        ) from None
    _fsync_dir(dest.parent)
    return destroyed


# --- reading the footer -----------------------------------------------------------------------


def dataset_summary(path: str | Path, contract: SchemaContract) -> dict[str, Any]:
    """Rows, persons and rows per site of a governed dataset, from its footer alone."""
    file = _data_file(Path(path), "dataset")
    metadata = _read_metadata(file, open_decryption(file, "dataset"))
    schema = metadata.schema.to_arrow_schema()
    _check_schema(schema, contract)
    info = _footer_info(schema)
    if int(info["rows"]) != metadata.num_rows:
        raise SchemaError("the governed file's footer counts disagree with its row groups")
    return {
        "rows": int(info["rows"]),
        "persons": int(info["persons"]),
        "sites": {str(k): int(v) for k, v in dict(info["sites"]).items()},
        "row_groups": metadata.num_row_groups,
        "columns": list(schema.names),
    }


def _data_file(path: Path, name: str) -> Path:
    file = path / DATA_FILE if path.is_dir() else path
    if not file.is_file():
        raise NotFoundError(f"dataset {name!r} has no governed data at {path}")
    return file


def open_decryption(file: Path, name: str) -> Decryption | None:
    """What it takes to read ``file``: None for a plain file, else its unwrapped key's
    decryption (``SchemaError`` when the key is gone: a deleted dataset or a copied file)."""
    try:
        encrypted = is_encrypted(file)
    except OSError:
        raise SchemaError(f"{file.name} cannot be opened; re-ingest the dataset") from None
    if not encrypted:
        return None  # written before encryption at rest: plain Parquet
    return decryption(load_data_key(file.parent, name))


def _read_metadata(file: Path, crypt: Decryption | None = None) -> pq.FileMetaData:
    metadata: pq.FileMetaData | None
    try:
        metadata = pq.read_metadata(
            file, decryption_properties=None if crypt is None else crypt.properties
        )
    except (pa.ArrowException, OSError, ValueError):
        metadata = None
    if metadata is None:  # raised outside the except block: pyarrow's message stays behind
        raise SchemaError(f"{file.name} is not a readable Parquet file; re-ingest the dataset")
    return metadata


def _footer_info(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise SchemaError("the file is not a governed dataset (no ingest footer); ingest it first")
    info = json.loads(raw)
    if info.get("layout") != LAYOUT_VERSION:
        raise SchemaError("the governed file has an unknown layout version; re-ingest it")
    return info


def _check_schema(schema: pa.Schema, contract: SchemaContract) -> None:
    expected = contract.governed_arrow_schema()
    for want in expected:
        if want.name not in schema.names:
            raise SchemaError(
                f"column {want.name!r} of the contract is missing from the governed file",
                column=want.name,
            )
        if schema.field(want.name).type != want.type:
            raise SchemaError(
                f"column {want.name!r} has a different type in the governed file than in the "
                "contract; re-ingest with this contract",
                column=want.name,
            )
    for name in schema.names:
        if name not in expected.names:
            raise SchemaError(
                f"column {name!r} in the governed file is not in the contract", column=name
            )
