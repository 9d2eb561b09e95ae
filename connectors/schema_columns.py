"""The columns of a schema contract: roles, Arrow type names and ``ColumnSpec``.

A ``ColumnSpec`` is one ``[columns.NAME]`` table of the contract (``connectors.schema`` shows
the whole TOML layout): its Arrow type (one of ``TYPE_NAMES``), its ``Role``, and the facts a
steward declares about it (domain and its ``Scale``, from ``connectors.scales``; vocabulary,
fill, rates, nullability). Every rule that ties those keys to the column's type and role runs
in ``__post_init__``, so a spec that exists is a valid one. Errors are ``SchemaError`` naming
the TOML key (``columns.age.min``) and the fix, never a value; column names are checked here
too (``_check_name``), because preprocessing's output names reserve ``__`` and ``=``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from connectors.cleaning_rules import (
    Normalize,
    Outside,
    _fail,
    check_cleaning,
    cleaning_to_dict,
    parse_aliases,
    parse_na_values,
)
from connectors.scales import Scale, parse_typical

if TYPE_CHECKING:
    import pyarrow as pa


class Role(StrEnum):
    """What a column is for; decides how the zone may use it."""

    #: the privacy unit: one person (pseudonymised at ingest, then the unit of every bound)
    IDENTIFIER = "identifier"
    #: names, addresses, phone numbers: dropped at ingest, never stored in governed data
    DIRECT_IDENTIFIER = "direct-identifier"
    #: the hospital / data partner; the unit of federated and parallel composition
    SITE = "site"
    #: a prediction target; never usable as a feature
    LABEL = "label"
    #: usable as a model input
    FEATURE = "feature"
    #: special-category data (e.g. ethnicity): kept, but policies may restrict its use
    SENSITIVE = "sensitive"


#: Arrow type names a contract may use (pyarrow's own aliases: ``pa.type_for_alias``). Names,
#: not types: every command reads contracts, few touch Arrow data, and pyarrow's import is
#: ~0.15 s of a read command's ~0.6 s (``ColumnSpec.arrow_type`` imports it when asked).
TYPE_NAMES: tuple[str, ...] = (
    "string",
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "float32",
    "float64",
    "date32",
    "timestamp[s]",
    "timestamp[ms]",
    "timestamp[us]",
    "timestamp[ns]",
)

_INTEGER_TYPES = frozenset({"int8", "int16", "int32", "int64"})
_FLOAT_TYPES = frozenset({"float32", "float64"})
_NUMERIC_TYPES = _INTEGER_TYPES | _FLOAT_TYPES
_TEMPORAL_TYPES = frozenset(
    {"date32", "timestamp[s]", "timestamp[ms]", "timestamp[us]", "timestamp[ns]"}
)

_COLUMN_KEYS = (
    "type",
    "role",
    "min",
    "max",
    "categories",
    "fill",
    "missing_rate",
    "positive_rate",
    "nullable",
    "description",
    "scale",
    "typical",
    # cleaning at ingest (connectors.cleaning_rules)
    "na_values",
    "date_format",
    "normalize",
    "aliases",
    "outside",
)

# "__" and "=" are reserved by preprocessing's output names (``age__missing``, ``sex=F``),
# so forbidding them in column names keeps every output name unique.
_MAX_NAME_CHARS = 128
_BAD_NAME = re.compile(r"__|=|[\x00-\x1f\x7f]")


def _is_number(value: object) -> bool:
    # bool is a subclass of int in Python; `min = true` must not pass as a number
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite_float(value: object, key: str, column: str) -> float:
    if not _is_number(value):
        raise _fail(key, "must be a number", "write a plain integer or decimal", column)
    try:
        out = float(value)  # type: ignore[arg-type]
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise _fail(key, "must be a finite number", "write a finite integer or decimal", column)
    return out


def _rate(value: object, key: str, column: str) -> float:
    out = _finite_float(value, key, column)
    if not 0.0 <= out <= 1.0:
        raise _fail(key, "must lie between 0 and 1", "write a proportion such as 0.15", column)
    return out


@dataclass(frozen=True)
class ColumnSpec:
    """One declared column. ``type`` is one of ``TYPE_NAMES``."""

    name: str
    type: str
    role: Role
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] | None = None
    fill: float | None = None
    missing_rate: float | None = None
    positive_rate: float | None = None
    #: None means "the role's default": identifier, site and label are non-null, others nullable
    nullable: bool | None = None
    description: str = ""
    #: how the declared domain is spread (numeric feature and sensitive columns only)
    scale: Scale = Scale.LINEAR
    #: [low, high] where most values fall (a published reference range): preprocessing
    #: scales by it instead of the whole domain (``connectors.scales.parse_typical``)
    typical: tuple[float, float] | None = None
    # -- cleaning at ingest (connectors.cleaning_rules): what ingest does with messy values
    #: text that means missing in this column (beside the dataset's ``na_values``)
    na_values: tuple[str, ...] | None = None
    #: strptime format of a date or timestamp column's text (default ISO 8601)
    date_format: str | None = None
    #: match categories and aliases ignoring case and surrounding spaces
    normalize: Normalize | None = None
    #: other spellings of each declared category, as (category, spellings) pairs
    aliases: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    #: what to do with a value outside the domain or vocabulary (None: the role's default)
    outside: Outside | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)
        key = f"columns.{self.name}"
        if not isinstance(self.type, str) or self.type not in TYPE_NAMES:
            raise _fail(
                f"{key}.type",
                "is not a supported Arrow type name",
                "use one of " + ", ".join(TYPE_NAMES),
                self.name,
            )
        if not isinstance(self.role, Role):
            try:
                object.__setattr__(self, "role", Role(self.role))
            except (ValueError, TypeError):
                raise _fail(
                    f"{key}.role",
                    "is not a known role",
                    "use one of " + ", ".join(r.value for r in Role),
                    self.name,
                ) from None
        for field in ("min", "max", "fill", "missing_rate", "positive_rate"):
            value = getattr(self, field)
            if value is not None:
                check = _rate if field.endswith("_rate") else _finite_float
                object.__setattr__(self, field, check(value, f"{key}.{field}", self.name))
        if self.categories is not None:
            cats = self.categories
            if isinstance(cats, str) or not isinstance(cats, tuple | list):
                raise _fail(
                    f"{key}.categories", "must be a list of strings", 'write ["A", "B"]', self.name
                )
            if not cats or not all(isinstance(c, str) for c in cats):
                raise _fail(
                    f"{key}.categories",
                    "must be a non-empty list of strings",
                    'write ["A", "B"]',
                    self.name,
                )
            if len(set(cats)) != len(cats):
                raise _fail(
                    f"{key}.categories", "lists a category twice", "remove the repeat", self.name
                )
            object.__setattr__(self, "categories", tuple(cats))
        if self.nullable is not None and not isinstance(self.nullable, bool):
            raise _fail(
                f"{key}.nullable", "must be true or false", "write true or false", self.name
            )
        if not isinstance(self.description, str):
            raise _fail(f"{key}.description", "must be a string", 'write "..."', self.name)
        try:
            object.__setattr__(self, "scale", Scale(self.scale))
        except (ValueError, TypeError):
            raise _fail(
                f"{key}.scale",
                'must be "linear" or "log"',
                'write scale = "log" for a heavy-tailed column, or leave scale out (linear)',
                self.name,
            ) from None
        self._parse_cleaning(key)
        self._check_role_rules(key)
        self._check_scale(key)
        if self.typical is not None:
            typical = parse_typical(
                self.typical,
                numeric=self.type in _NUMERIC_TYPES,
                scalable=self.role in (Role.FEATURE, Role.SENSITIVE),
                lo=self.min,
                hi=self.max,
            )
            if isinstance(typical, str):
                fix = "write typical = [low, high] inside [min, max], or leave it out"
                raise _fail(f"{key}.typical", typical, fix, self.name)
            object.__setattr__(self, "typical", typical)
        check_cleaning(self, key)

    def _parse_cleaning(self, key: str) -> None:
        name = self.name
        if self.na_values is not None:
            object.__setattr__(
                self, "na_values", parse_na_values(self.na_values, f"{key}.na_values", name)
            )
        if self.aliases is not None:
            object.__setattr__(self, "aliases", parse_aliases(self.aliases, f"{key}.aliases", name))
        for field, kind, fix in (
            ("normalize", Normalize, 'write normalize = "strip-lower", or leave it out'),
            ("outside", Outside, 'write outside = "reject", "clip" or "null"'),
        ):
            value = getattr(self, field)
            if value is None:
                continue
            try:
                object.__setattr__(self, field, kind(value))
            except (ValueError, TypeError):
                raise _fail(f"{key}.{field}", "is not a known choice", fix, name) from None

    def _check_scale(self, key: str) -> None:
        if self.scale is Scale.LINEAR:
            return
        name, problem = self.name, None
        if self.role not in (Role.FEATURE, Role.SENSITIVE):
            problem = f"is not allowed on a {self.role.value} column"
            fix = "remove scale (only numeric feature and sensitive columns have one)"
        elif self.type not in _NUMERIC_TYPES:
            problem = "is only allowed on an integer or float column"
            fix = "remove scale"
        elif self.min is None or self.max is None:
            problem = '"log" needs a declared domain'
            fix = "declare min (0 or more) and max, or remove scale"
        elif self.min < 0:
            problem = '"log" spreads values by log(1 + x), which needs min >= 0'
            fix = "declare min >= 0, or remove scale (linear) for a column with negative values"
        if problem is not None:
            raise _fail(f"{key}.scale", problem, fix, name)

    # -- the rules that relate keys to type and role --------------------------------------
    def _check_role_rules(self, key: str) -> None:
        t, role, name = self.type, self.role, self.name
        structural = role in (Role.IDENTIFIER, Role.DIRECT_IDENTIFIER)
        if structural:
            for field in ("min", "max", "categories", "fill", "positive_rate"):
                if getattr(self, field) is not None:
                    raise _fail(
                        f"{key}.{field}",
                        f"is not allowed on a {role.value} column",
                        f"remove {field}",
                        name,
                    )
        if role is Role.IDENTIFIER and t not in _INTEGER_TYPES and t != "string":
            raise _fail(
                f"{key}.type",
                "an identifier must be a string or integer type",
                'declare type = "string"',
                name,
            )
        if role is Role.SITE and t != "string":
            raise _fail(
                f"{key}.type", "a site column must be a string", 'declare type = "string"', name
            )
        if role is Role.LABEL and t not in _INTEGER_TYPES and t != "bool":
            raise _fail(
                f"{key}.type",
                "a label must be an integer or bool type",
                'encode the outcome as 0/1 and declare type = "int8"',
                name,
            )
        if role in (Role.IDENTIFIER, Role.SITE, Role.LABEL):
            if self.nullable is True:
                raise _fail(
                    f"{key}.nullable",
                    f"a {role.value} column can never be null",
                    "remove nullable (or set it to false)",
                    name,
                )
            if self.missing_rate not in (None, 0.0):
                raise _fail(
                    f"{key}.missing_rate",
                    f"a {role.value} column can never be missing",
                    "remove missing_rate",
                    name,
                )
        elif self.nullable is False and self.missing_rate not in (None, 0.0):
            raise _fail(
                f"{key}.missing_rate",
                "is above 0 on a column declared nullable = false",
                "remove one of the two",
                name,
            )
        if self.positive_rate is not None and role is not Role.LABEL:
            raise _fail(f"{key}.positive_rate", "is only meaningful on a label", "remove it", name)
        if (self.min is not None or self.max is not None) and t not in _NUMERIC_TYPES:
            raise _fail(
                f"{key}.min",
                "a domain (min/max) needs an integer or float column",
                "remove min and max, or change the type",
                name,
            )
        if (self.min is None) != (self.max is None):
            missing = "max" if self.max is None else "min"
            raise _fail(
                f"{key}.{missing}",
                "is missing: min and max are declared together",
                f"add {missing}",
                name,
            )
        if self.min is not None and self.max is not None and self.min >= self.max:
            raise _fail(
                f"{key}.min",
                "must be below max",
                "declare min < max (the full plausible range)",
                name,
            )
        if self.categories is not None and t != "string":
            raise _fail(
                f"{key}.categories",
                "is only allowed on a string column",
                "remove categories, or declare min/max for a numeric column",
                name,
            )
        if self.categories is not None and role is Role.LABEL:
            raise _fail(f"{key}.categories", "is not allowed on a label", "remove it", name)
        if self.fill is not None:
            if t not in _NUMERIC_TYPES and t != "bool":
                raise _fail(
                    f"{key}.fill",
                    "is only allowed on numeric and bool columns",
                    "remove fill (missing categories get their own indicator)",
                    name,
                )
            if t == "bool" and self.fill not in (0.0, 1.0):
                raise _fail(f"{key}.fill", "a bool fill must be 0 or 1", "write 0 or 1", name)
            if (
                self.min is not None
                and self.max is not None
                and not (self.min <= self.fill <= self.max)
            ):
                raise _fail(
                    f"{key}.fill", "lies outside the declared [min, max]", "move it inside", name
                )
        if role is Role.FEATURE:
            if t in _NUMERIC_TYPES and self.min is None:
                raise _fail(
                    f"{key}.min",
                    "a numeric feature needs a declared domain",
                    "declare min and max (plausible bounds, not ones computed from the data)",
                    name,
                )
            if t == "string" and self.categories is None:
                raise _fail(
                    f"{key}.categories",
                    "a string feature needs a declared vocabulary",
                    'declare categories = ["..."] (values outside it map to "other")',
                    name,
                )

    # -- derived facts ---------------------------------------------------------------------
    @property
    def arrow_type(self) -> pa.DataType:
        import pyarrow as pa  # only where Arrow data is handled (see TYPE_NAMES)

        return pa.type_for_alias(self.type)

    @property
    def is_nullable(self) -> bool:
        if self.role in (Role.IDENTIFIER, Role.SITE, Role.LABEL):
            return False
        return True if self.nullable is None else self.nullable

    @property
    def is_numeric(self) -> bool:
        return self.type in _NUMERIC_TYPES

    @property
    def is_integer(self) -> bool:
        return self.type in _INTEGER_TYPES

    @property
    def is_float(self) -> bool:
        return self.type in _FLOAT_TYPES

    @property
    def is_temporal(self) -> bool:
        return self.type in _TEMPORAL_TYPES

    def to_dict(self) -> dict[str, Any]:
        """The column's TOML table as JSON-safe values, without the name."""
        out: dict[str, Any] = {"type": self.type, "role": self.role.value}
        for field in ("min", "max", "fill", "missing_rate", "positive_rate"):
            value = getattr(self, field)
            if value is not None:
                out[field] = value
        if self.categories is not None:
            out["categories"] = list(self.categories)
        if self.nullable is not None:
            out["nullable"] = self.nullable
        if self.description:
            out["description"] = self.description
        # left out when linear, so contracts written before it keep their dicts and hashes
        if self.scale is not Scale.LINEAR:
            out["scale"] = self.scale.value
        if self.typical is not None:
            out["typical"] = list(self.typical)
        out.update(cleaning_to_dict(self))
        return out

    @classmethod
    def from_dict(cls, name: str, table: object) -> ColumnSpec:
        key = f"columns.{name}"
        if not isinstance(table, Mapping):
            raise _fail(key, "must be a table", f"write [{key}] with type and role", name)
        unknown = [k for k in table if k not in _COLUMN_KEYS]
        if unknown:
            raise _fail(
                f"{key}.{unknown[0]}" if isinstance(unknown[0], str) else key,
                "is not a known column key",
                "use only " + ", ".join(_COLUMN_KEYS),
                name,
            )
        for required in ("type", "role"):
            if required not in table:
                raise _fail(f"{key}.{required}", "is missing", f"add {required} = ...", name)
        role = table["role"]
        if not isinstance(role, str) or role not in {r.value for r in Role}:
            raise _fail(
                f"{key}.role",
                "is not a known role",
                "use one of " + ", ".join(r.value for r in Role),
                name,
            )
        categories = table.get("categories")
        if isinstance(categories, list):
            categories = tuple(categories)
        return cls(
            name=name,
            type=table["type"],
            role=Role(role),
            min=table.get("min"),
            max=table.get("max"),
            categories=categories,
            fill=table.get("fill"),
            missing_rate=table.get("missing_rate"),
            positive_rate=table.get("positive_rate"),
            nullable=table.get("nullable"),
            description=table.get("description", ""),
            scale=table.get("scale", Scale.LINEAR.value),
            typical=table.get("typical"),
            na_values=table.get("na_values"),
            date_format=table.get("date_format"),
            normalize=table.get("normalize"),
            aliases=table.get("aliases"),
            outside=table.get("outside"),
        )


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name or name != name.strip():
        raise _fail(
            "columns",
            "a column name is empty, not a string, or has surrounding spaces",
            "name every column with visible characters",
        )
    if len(name) > _MAX_NAME_CHARS or _BAD_NAME.search(name):
        raise _fail(
            f"columns.{name}" if len(name) <= _MAX_NAME_CHARS else "columns",
            f'a column name may not contain "__", "=" or control characters, '
            f"nor exceed {_MAX_NAME_CHARS} characters",
            "rename the column (in the data file too)",
        )
