"""Ingest: turn a steward's source file into governed Parquet, checked against its contract.

What happens, in order (nothing is written until every check has passed):

1. The source's columns must be exactly the contract's: every declared column that is
   missing and every undeclared extra column are refused together, by name.
2. The contract's declared cleaning runs on each column's text (``connectors.cleaning``):
   ``na_values`` become missing, categories are matched through ``normalize`` and
   ``aliases``, dates are parsed with ``date_format``. Then every column is converted to its
   declared Arrow type. CSV is read as raw bytes and converted by us (pyarrow's own CSV
   errors quote the offending value, so they are never shown).
3. Contract checks over every row (``connectors.ingest_checks``): text that does not parse;
   a missing identifier, site or label (and any column declared ``nullable = false``); NaN
   in a float column; numbers outside the declared ``[min, max]`` (refused, or clipped or
   made missing as ``outside`` declares); a site outside its declared categories; a repeated
   identifier when the contract says ``rows_per_person = "one"``. Other categories outside
   a declared vocabulary are kept and counted: they map to "other" at preprocessing. Every
   problem is collected (count + first row numbers, never a value) and the ingest is refused
   with the whole list: ``check_file`` gives the same list without ingesting.
4. The identifier is replaced by ``pseudonym()``: a keyed HMAC-SHA256 (hex) under the zone's
   secret. Direct identifiers are dropped. The table is cast to the contract's
   ``governed_arrow_schema()`` exactly, and stored in (site, pseudonym) order with each
   person's row that counts first (``[dataset] keep`` and ``order_by``).

The sources are read by ``connectors.ingest_sources``; what a check found is a
``connectors.ingest_findings.CheckReport``; the governed file's layout (one file sorted by
site and pseudonym, counts in the footer) and its atomic write are in
``connectors.governed_file``.

Given ``zone_key_file`` (the service always gives ``Zone.data_key_file()``), the file is
encrypted at rest under a new key of the dataset's own (``connectors.dataset_key``); without
it (tests and benchmarks outside a zone) the file is plain Parquet.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from connectors.governed_file import LAYOUT_VERSION, _write_atomically
from connectors.ingest_checks import check_unique, prepare_column
from connectors.ingest_findings import CheckReport, Findings
from connectors.ingest_sources import _check_column_names, _read_csv, _read_parquet
from connectors.schema import Keep, RowsPerPerson, SchemaContract
from connectors.schema_columns import Role
from foundation.errors import NotFoundError, SpecError

#: the zone's secret must be long enough that pseudonyms cannot be brute-forced
MIN_SECRET_BYTES = 16
# HMAC input is prefixed so a pseudonym can never equal a MAC the zone computes elsewhere
# with the same secret (tokens, audit chain) over the same bytes.
_PSEUDONYM_DOMAIN = b"safe-zone/pseudonym/v1\x00"
# a sort key that cannot clash with a column name ("__" is reserved in contracts)
_POSITION = "__source_position"


@dataclass(frozen=True)
class IngestReport:
    """What an ingest wrote. Counts are inside-the-zone facts, not releases."""

    rows: int
    persons: int
    #: rows per site, keyed by site name (empty when the contract has no site column)
    sites: dict[str, int] = field(hash=False)
    #: the governed Parquet file
    path: Path
    #: the governed columns, in order
    columns: tuple[str, ...]
    #: persons with rows at more than one site (a count, never who): federated training's
    #: per-site budgets assume each person is at one site, so such a dataset is refused
    cross_site_persons: int = 0
    #: what the contract's declared cleaning changed: column -> what -> rows (never values)
    cleaned: dict[str, dict[str, int]] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "persons": self.persons,
            "sites": dict(self.sites),
            "cross_site_persons": self.cross_site_persons,
            "cleaned": {c: dict(a) for c, a in self.cleaned.items()},
            "path": str(self.path),
            "columns": list(self.columns),
        }


def pseudonym(identifier: str, secret: bytes) -> str:
    """The governed pseudonym of one identifier value: hex HMAC-SHA256 under ``secret``.

    Integer identifiers are pseudonymised as their decimal text.
    """
    _check_secret(secret)
    if not isinstance(identifier, str):
        raise SpecError("identifier", "must be text", "pass str(value) for integer identifiers")
    return hmac.digest(secret, _PSEUDONYM_DOMAIN + identifier.encode("utf-8"), "sha256").hex()


def ingest_file(
    source: str | Path,
    contract: SchemaContract,
    dest_dir: str | Path,
    secret: bytes,
    *,
    zone_key_file: str | Path | None = None,
) -> IngestReport:
    """Ingest a CSV (``.csv``) or Parquet (``.parquet``/``.pq``) source file."""
    _check_args(contract, secret)
    dest = _check_dest(Path(dest_dir))
    table = _read_source(Path(source), contract)
    return _ingest(table, contract, dest, secret, _key_file(zone_key_file))


def ingest_table(
    table: pa.Table,
    contract: SchemaContract,
    dest_dir: str | Path,
    secret: bytes,
    *,
    zone_key_file: str | Path | None = None,
) -> IngestReport:
    """Ingest an in-memory Arrow table (columns in any order, types convertible)."""
    if not isinstance(table, pa.Table):
        raise SpecError("table", "must be a pyarrow.Table", "pass pa.Table")
    _check_args(contract, secret)
    dest = _check_dest(Path(dest_dir))
    _check_column_names(list(table.column_names), contract)
    return _ingest(table, contract, dest, secret, _key_file(zone_key_file))


# --- argument checks --------------------------------------------------------------------------


def _check_secret(secret: object) -> None:
    if not isinstance(secret, bytes | bytearray) or len(secret) < MIN_SECRET_BYTES:
        raise SpecError(
            "secret",
            f"must be bytes, at least {MIN_SECRET_BYTES} long",
            "pass the zone's secret (32 random bytes)",
        )


def _check_args(contract: object, secret: object) -> None:
    if not isinstance(contract, SchemaContract):
        raise SpecError("contract", "must be a SchemaContract", "load it with SchemaContract")
    _check_secret(secret)


def _key_file(zone_key_file: str | Path | None) -> Path | None:
    if zone_key_file is None:
        return None
    path = Path(zone_key_file)
    if not path.is_file():
        raise NotFoundError(f"the zone's data key file {path} does not exist")
    return path


def _check_dest(dest: Path) -> Path:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise SpecError(
            "dest_dir",
            f"{dest} already exists and is not an empty directory",
            "ingest into a new directory (governed datasets are never overwritten)",
        )
    return dest


def _pseudonyms(distinct: pa.Array, secret: bytes) -> pa.Array:
    """Pseudonym of each distinct identifier (hashed once each, however many rows it has)."""
    key = bytes(secret)
    return pa.array(
        [
            hmac.digest(key, _PSEUDONYM_DOMAIN + value.encode("utf-8"), "sha256").hex()
            for value in distinct.to_pylist()
        ],
        pa.string(),
    )


def check_file(source: str | Path, contract: SchemaContract) -> CheckReport:
    """Check a source file against its contract, writing nothing: every violation and every
    cleaning count in one pass (``sandbox dataset check``). Ingest refuses with the same list.
    A source whose columns or CSV structure are wrong raises ``SchemaError`` at once."""
    if not isinstance(contract, SchemaContract):
        raise SpecError("contract", "must be a SchemaContract", "load it with SchemaContract")
    return _checked(_read_source(Path(source), contract), contract).report


def _read_source(source: Path, contract: SchemaContract) -> pa.Table:
    if not source.is_file():
        raise NotFoundError(f"source file not found: {source}")
    suffix = source.suffix.lower()
    if suffix == ".csv":
        return _read_csv(source, contract)
    if suffix in (".parquet", ".pq"):
        return _read_parquet(source, contract)
    raise SpecError("source", "has an unknown file type", "use a .csv or .parquet file")


@dataclass(frozen=True)
class _Checked:
    """A source after the checks: its kept columns (converted and cleaned), what was found,
    and the identifier's text dictionary-encoded (None without an identifier), encoded
    once for the uniqueness check and the pseudonyms alike."""

    columns: dict[str, pa.ChunkedArray]
    report: CheckReport
    ids: pa.DictionaryArray | None


def _checked(table: pa.Table, contract: SchemaContract) -> _Checked:
    """Every kept column cleaned, converted and checked, and what was found."""
    found = Findings()
    columns: dict[str, pa.ChunkedArray] = {}
    for spec in contract.columns:
        if spec.role is Role.DIRECT_IDENTIFIER:
            continue  # dropped unread: no conversion, no checks, no copy
        column = prepare_column(table.column(spec.name), spec, contract.na_values, found)
        columns[spec.name] = pa.chunked_array([column])
    id_name, encoded = contract.identifier, None
    if id_name is not None:
        encoded = pc.dictionary_encode(_id_text(columns[id_name], contract))
        if contract.rows_per_person is RowsPerPerson.ONE:
            check_unique(np.asarray(encoded.indices), len(encoded.dictionary), id_name, found)
    return _Checked(columns, found.report(table.num_rows), encoded)


def _id_text(ids: pa.ChunkedArray, contract: SchemaContract) -> pa.Array:
    ids_flat = ids.combine_chunks()
    if contract.column(contract.identifier or "").is_integer:
        ids_flat = pc.cast(ids_flat, pa.string())
    return ids_flat


def _storage_order(table: pa.Table, contract: SchemaContract) -> pa.Table:
    """Rows in (site, pseudonym, then the row that counts first) order.

    Readers keep each person's first row(s) in storage order, so the contract's ``keep`` and
    ``order_by`` are honoured here, once: a stable sort on (site, pseudonym) keeps the
    source's order within a person; ``order_by`` orders a person's rows by that column
    (missing values last), ``keep = "last"`` reverses it.
    """
    site_name, id_name = contract.site, contract.identifier
    keys = [(k, "ascending", "at_end") for k in (site_name, id_name) if k is not None]
    if not keys:
        return table
    last = contract.keep is Keep.LAST
    if contract.order_by is not None:
        keys.append((contract.order_by, "descending" if last else "ascending", "at_end"))
    elif last:
        table = table.append_column(_POSITION, pa.array(np.arange(table.num_rows)))
        keys.append((_POSITION, "descending", "at_end"))
    ordered = table.take(pc.sort_indices(table, sort_keys=keys))
    return ordered.drop_columns([_POSITION]) if _POSITION in ordered.column_names else ordered


def _ingest(
    table: pa.Table,
    contract: SchemaContract,
    dest: Path,
    secret: bytes,
    zone_key_file: Path | None = None,
) -> IngestReport:
    checked = _checked(table, contract)
    check, columns, encoded = checked.report, checked.columns, checked.ids
    if not check.ok:
        raise check.refusal()
    n = table.num_rows

    id_name, site_name = contract.identifier, contract.site
    persons = n
    if id_name is not None and encoded is not None:
        persons = len(encoded.dictionary)
        pseudonyms = pc.take(_pseudonyms(encoded.dictionary, secret), encoded.indices)
        columns[id_name] = pa.chunked_array([pseudonyms])

    governed_schema = contract.governed_arrow_schema()
    governed = pa.Table.from_arrays(
        [columns[f.name] for f in governed_schema], schema=governed_schema
    )
    governed = _storage_order(governed, contract)

    if site_name is not None:
        counts = pc.value_counts(governed.column(site_name))
        sites = dict(
            sorted(
                zip(
                    counts.field("values").to_pylist(),
                    counts.field("counts").to_pylist(),
                    strict=True,
                )
            )
        )
    else:
        sites = {}
    cross_site = _cross_site_persons(governed, id_name, site_name)
    metadata = {
        "layout": LAYOUT_VERSION,
        "contract": contract.to_dict(),
        "rows": n,
        "persons": persons,
        "sites": sites,
        "cross_site_persons": cross_site,
        "cleaned": check.cleaned,
    }
    # one slice per site, in storage order (the whole table when there is no site column)
    slices = list(sites.values()) if sites else [n]
    path = _write_atomically(governed, dest, slices, metadata, id_name, zone_key_file)
    return IngestReport(
        rows=n,
        persons=persons,
        sites=sites,
        path=path,
        columns=tuple(governed_schema.names),
        cross_site_persons=cross_site,
        cleaned=check.cleaned,
    )


def _cross_site_persons(table: pa.Table, id_name: str | None, site_name: str | None) -> int:
    """How many persons have rows at more than one site (0 without both columns)."""
    if id_name is None or site_name is None or table.num_rows == 0:
        return 0
    per_person = table.group_by(id_name).aggregate([(site_name, "count_distinct")])
    sites_each = per_person.column(f"{site_name}_count_distinct")
    return int(pc.sum(pc.greater(sites_each, 1)).as_py() or 0)
