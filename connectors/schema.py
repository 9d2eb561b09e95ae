"""The schema contract: what a data steward declares about a dataset, as TOML.

The contract is the single source of every fact the zone may use about a dataset without
spending privacy budget: column names, Arrow types, roles, declared domains (``min``/``max``)
and their ``scale``, declared vocabularies (``categories``) and declared fills. Preprocessing
takes its parameters from here and never from rows, because a range or vocabulary computed on
real rows would be an uncharged release (see ``docs/privacy-model.md``).

This module holds the contract as a whole (``SchemaContract``: TOML in, Arrow schemas out, the
dataset-level rules); one column's declaration and its rules (``ColumnSpec``, ``Role``,
``TYPE_NAMES``) are in ``connectors.schema_columns``.

A contract looks like::

    [dataset]                       # optional
    description = "..."
    rows_per_person = "one"         # "one" | "many"; without an identifier it must be "one"
    counts = "private"              # "private" | "public": may researchers see exact row,
                                    # person and per-site counts? (default private)
    query_rows_per_person = 1       # DP queries count at most this many rows per person
                                    # (default 1; above 1 only with rows_per_person = "many")

    [columns.subject_id]
    type = "string"                 # an Arrow type name, see schema_columns.TYPE_NAMES
    role = "identifier"             # see Role

    [columns.age]
    type = "float64"
    role = "feature"
    min = 0                         # declared domain (numeric features: required)
    max = 110
    fill = 50                       # optional fill for missing values (inside the domain)
    missing_rate = 0.0              # optional, declared, 0..1 (for dummy data)

    [columns.crp]
    type = "float64"
    role = "feature"
    min = 0                         # scale = "log" needs min >= 0
    max = 500
    scale = "log"                   # optional, "linear" (default) or "log": a heavy-tailed
                                    # column is spread by log(1 + x), in preprocessing, the
                                    # synthesizers' bins, DP query histograms and dummy data

    [columns.sex]
    type = "string"
    role = "feature"
    categories = ["F", "M", "X"]    # declared vocabulary; anything else maps to "other"

    [columns.readmitted_30d]
    type = "int8"
    role = "label"                  # labels are integer or bool and never null
    positive_rate = 0.15            # optional, declared (for dummy data)
    # min/max are optional on a label: an integer label without them is a binary 0/1
    # outcome (what training and synthesis assume); declare min and max for any other range

Other optional column keys: ``nullable`` (bool; identifier, site and label columns are
always non-null) and ``description``. ``scale = "log"`` is allowed on numeric feature and
sensitive columns only, with a declared domain whose ``min`` is 0 or more.

Every check runs on construction (``ColumnSpec`` and ``SchemaContract`` validate themselves
in ``__post_init__``), so a contract object that exists is a valid one. Errors are
``SchemaError`` naming the TOML key (``columns.age.min``) and the fix. They never echo a
value: a contract is written by a steward, but the same messages must stay safe when a
contract is built from something a data file said.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from connectors.cleaning_rules import parse_na_values
from connectors.schema_columns import ColumnSpec, Role, _check_name, _fail
from foundation.errors import NotFoundError

if TYPE_CHECKING:
    import pyarrow as pa


class RowsPerPerson(StrEnum):
    """How many rows one person may have; the reader bounds contribution to one row."""

    ONE = "one"
    MANY = "many"


class Keep(StrEnum):
    """Which of a person's rows is the one that counts (``[dataset] keep``): the first or
    the last, in source order or by the declared ``order_by`` column."""

    FIRST = "first"
    LAST = "last"


_DATASET_KEYS = (
    "description",
    "rows_per_person",
    "counts",
    "query_rows_per_person",
    "na_values",
    "keep",
    "order_by",
)
_TOP_KEYS = ("dataset", "columns")
_TOML_LOCATION = re.compile(r"\(at line (\d+), column (\d+)\)")


@dataclass(frozen=True)
class SchemaContract:
    """A validated contract: ordered columns plus dataset-level facts."""

    columns: tuple[ColumnSpec, ...]
    rows_per_person: RowsPerPerson = RowsPerPerson.ONE
    description: str = ""
    #: the steward declares the dataset's exact sizes (rows, persons, rows per site) public,
    #: as a registry publishes its cohort's size. Otherwise no exact count reaches a
    #: researcher: not in the dataset card, not through a plan's sample rate, not through a
    #: site left out for being small.
    counts_public: bool = False
    #: the contribution bound of DP queries (``privacy.dpquery``): they read at most this many
    #: rows per person (the first in storage order), and their sensitivity grows with it.
    #: Above 1 only for ``rows_per_person = "many"``: with one row each there is nothing more.
    query_rows_per_person: int = 1
    #: text that means missing in every column (``connectors.cleaning_rules``)
    na_values: tuple[str, ...] = ()
    #: with several rows per person, which one counts: ingest stores a person's rows with
    #: that one first, and every reader keeps the first (``docs/schema-contract.md``)
    keep: Keep = Keep.FIRST
    #: the column that orders a person's rows for ``keep`` (None: the source's order)
    order_by: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.columns, tuple) or not self.columns:
            raise _fail("columns", "no columns are declared", "add at least one [columns.NAME]")
        if not all(isinstance(c, ColumnSpec) for c in self.columns):
            raise _fail("columns", "must hold ColumnSpec values", "build columns with ColumnSpec")
        names = [c.name for c in self.columns]
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise _fail(f"columns.{name}", "is declared twice", "keep one", name)
            seen.add(name)
        if not isinstance(self.rows_per_person, RowsPerPerson):
            try:
                object.__setattr__(self, "rows_per_person", RowsPerPerson(self.rows_per_person))
            except (ValueError, TypeError):
                raise _fail(
                    "dataset.rows_per_person", "must be one or many", 'write "one" or "many"'
                ) from None
        if not isinstance(self.description, str):
            raise _fail("dataset.description", "must be a string", 'write "..."')
        if not isinstance(self.counts_public, bool):
            raise _fail(
                "dataset.counts", "must be private or public", 'write "private" or "public"'
            )
        k = self.query_rows_per_person
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise _fail(
                "dataset.query_rows_per_person",
                "must be a whole number of at least 1",
                "write e.g. query_rows_per_person = 1",
            )
        if k > 1 and self.rows_per_person is RowsPerPerson.ONE:
            raise _fail(
                "dataset.query_rows_per_person",
                'is above 1 but rows_per_person is "one"',
                'remove it, or declare rows_per_person = "many"',
            )
        self._check_keep()
        for role in (Role.IDENTIFIER, Role.SITE):
            holders = [c.name for c in self.columns if c.role is role]
            if len(holders) > 1:
                raise _fail(
                    f"columns.{holders[1]}.role",
                    f"a contract has at most one {role.value} column",
                    f"keep {role.value} on one column",
                    holders[1],
                )
        if self.rows_per_person is RowsPerPerson.MANY and self.identifier is None:
            raise _fail(
                "dataset.rows_per_person",
                'is "many" but no column has role "identifier", so rows cannot be tied to people',
                'declare the person column with role = "identifier", or use "one"',
            )

    def _check_keep(self) -> None:
        object.__setattr__(self, "na_values", parse_na_values(self.na_values, "dataset.na_values"))
        try:
            object.__setattr__(self, "keep", Keep(self.keep))
        except (ValueError, TypeError):
            raise _fail(
                "dataset.keep", "must be first or last", 'write keep = "first" or "last"'
            ) from None
        if self.order_by is None:
            return
        if not isinstance(self.order_by, str) or self.order_by not in self.names:
            raise _fail(
                "dataset.order_by",
                "is not a declared column",
                "name the date or number column that orders a person's rows",
            )
        spec = self.column(self.order_by)
        if not (spec.is_numeric or spec.is_temporal) or spec.role is not Role.FEATURE:
            raise _fail(
                "dataset.order_by",
                "must be a date, timestamp or number feature column",
                "name e.g. the admission date",
            )

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_toml_text(cls, text: str) -> SchemaContract:
        if not isinstance(text, str):
            raise _fail("contract", "must be TOML text", "pass a str")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            found = _TOML_LOCATION.search(str(exc))
            where = f"line {found.group(1)}, column {found.group(2)}" if found else "unknown place"
            raise _fail(
                "contract",
                f"is not valid TOML (at {where})",
                "correct the TOML syntax there",
            ) from None
        return cls.from_dict(data)

    @classmethod
    def from_toml_file(cls, path: str | Path) -> SchemaContract:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise NotFoundError(f"schema contract file not found: {path}") from None
        except UnicodeDecodeError:
            raise _fail("contract", "is not UTF-8 text", "save the TOML file as UTF-8") from None
        return cls.from_toml_text(text)

    @classmethod
    def from_dict(cls, data: object) -> SchemaContract:
        """Build from the TOML structure (``to_dict``'s output); validates everything."""
        if not isinstance(data, Mapping):
            raise _fail("contract", "must be a table", "start with [columns.NAME] tables")
        unknown = [k for k in data if k not in _TOP_KEYS]
        if unknown:
            raise _fail(
                str(unknown[0]) if isinstance(unknown[0], str) else "contract",
                "is not a known top-level key",
                "use only [dataset] and [columns.NAME]",
            )
        dataset = data.get("dataset", {})
        if not isinstance(dataset, Mapping):
            raise _fail("dataset", "must be a table", "write [dataset]")
        unknown = [k for k in dataset if k not in _DATASET_KEYS]
        if unknown:
            raise _fail(
                f"dataset.{unknown[0]}" if isinstance(unknown[0], str) else "dataset",
                "is not a known dataset key",
                "use only " + ", ".join(_DATASET_KEYS),
            )
        rows_per_person = dataset.get("rows_per_person", "one")
        if not isinstance(rows_per_person, str) or rows_per_person not in {
            r.value for r in RowsPerPerson
        }:
            raise _fail("dataset.rows_per_person", "must be one or many", 'write "one" or "many"')
        counts = dataset.get("counts", "private")
        if counts not in ("private", "public"):
            raise _fail(
                "dataset.counts", "must be private or public", 'write "private" or "public"'
            )
        columns = data.get("columns")
        if not isinstance(columns, Mapping) or not columns:
            raise _fail("columns", "no columns are declared", "add at least one [columns.NAME]")
        specs = []
        for name, table in columns.items():
            _check_name(name)
            specs.append(ColumnSpec.from_dict(name, table))
        return cls(
            columns=tuple(specs),
            rows_per_person=RowsPerPerson(rows_per_person),
            description=dataset.get("description", ""),
            counts_public=counts == "public",
            query_rows_per_person=dataset.get("query_rows_per_person", 1),
            na_values=parse_na_values(dataset.get("na_values", ()), "dataset.na_values"),
            keep=dataset.get("keep", Keep.FIRST.value),
            order_by=dataset.get("order_by"),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, and ``from_dict(to_dict())`` gives an equal contract."""
        dataset: dict[str, Any] = {"rows_per_person": self.rows_per_person.value}
        if self.description:
            dataset["description"] = self.description
        if self.counts_public:
            dataset["counts"] = "public"
        # left out at its default so contracts written before it keep their dicts and hashes
        if self.query_rows_per_person != 1:
            dataset["query_rows_per_person"] = self.query_rows_per_person
        if self.na_values:
            dataset["na_values"] = list(self.na_values)
        if self.keep is not Keep.FIRST:
            dataset["keep"] = self.keep.value
        if self.order_by is not None:
            dataset["order_by"] = self.order_by
        return {
            "dataset": dataset,
            "columns": {c.name: c.to_dict() for c in self.columns},
        }

    # -- questions ---------------------------------------------------------------------------
    @property
    def identifier(self) -> str | None:
        """The person column's name (the privacy unit), or None: then each row is a person."""
        return next((c.name for c in self.columns if c.role is Role.IDENTIFIER), None)

    @property
    def site(self) -> str | None:
        return next((c.name for c in self.columns if c.role is Role.SITE), None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> ColumnSpec:
        for spec in self.columns:
            if spec.name == name:
                return spec
        raise NotFoundError(
            f"column {name!r} is not in the schema contract; known columns: "
            + ", ".join(self.names)
        )

    def feature_names(self) -> tuple[str, ...]:
        """Columns with role feature that a FeaturePlan accepts (dates are not features)."""
        return tuple(c.name for c in self.columns if c.role is Role.FEATURE and not c.is_temporal)

    def label_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.role is Role.LABEL)

    def columns_with_role(self, role: Role) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.role is role)

    def source_arrow_schema(self) -> pa.Schema:
        """The schema a source file must have: every declared column with its declared type."""
        import pyarrow as pa  # Arrow only where data is handled (schema_columns.TYPE_NAMES)

        return pa.schema(
            [pa.field(c.name, c.arrow_type, nullable=c.is_nullable) for c in self.columns]
        )

    def governed_arrow_schema(self) -> pa.Schema:
        """The schema of governed Parquet.

        Direct identifiers are dropped; the identifier becomes a non-null string holding the
        keyed HMAC-SHA256 pseudonym (64 hex characters); everything else keeps its declared
        type and nullability.
        """
        import pyarrow as pa  # Arrow only where data is handled (schema_columns.TYPE_NAMES)

        fields = []
        for c in self.columns:
            if c.role is Role.DIRECT_IDENTIFIER:
                continue
            if c.role is Role.IDENTIFIER:
                fields.append(pa.field(c.name, pa.string(), nullable=False))
            else:
                fields.append(pa.field(c.name, c.arrow_type, nullable=c.is_nullable))
        return pa.schema(fields)
