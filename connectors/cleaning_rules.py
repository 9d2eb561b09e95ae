"""The cleaning a steward declares in a schema contract, and the rules that tie it to a column.

Real extracts break strict contracts in ordinary ways: ``NA`` for missing, dates written
``02/03/2024``, ``Male``/``male ``/``M`` for one category, a site typed three ways, an age of
130. Rather than refusing the file (or cleaning it with a pandas pass outside the zone), the
steward declares what to do, per column, and ingest applies it and counts what it did
(``connectors.cleaning``; counts per column, never values)::

    [dataset]
    na_values = ["NA", "n/a"]     # text that means "missing", in every column

    [columns.sex]
    type = "string"
    role = "feature"
    categories = ["F", "M"]
    normalize = "strip-lower"     # match categories and aliases ignoring case and spaces
    aliases = { F = ["female", "woman"], M = ["male", "man"] }
    outside = "null"              # anything else: "null" (missing), "reject", or left out:
                                  # kept, and preprocessing maps it to "other"

    [columns.age]
    type = "float64"
    role = "feature"
    min = 0
    max = 110
    outside = "clip"              # "reject" (the default) | "clip" | "null"
    na_values = ["unknown"]       # adds to the dataset's list for this column

    [columns.admission_date]
    type = "date32"
    role = "feature"
    date_format = "%d/%m/%Y"      # strptime codes; the default is ISO 8601 (2024-03-02)

The rules (``check_cleaning``, called by ``ColumnSpec.__post_init__``): ``date_format`` only
on date and timestamp columns; ``normalize`` and ``aliases`` only on string columns with
declared ``categories``, and every alias key must be one of them, no spelling listed twice;
``outside = "clip"`` only on a numeric column with a domain; ``outside = "null"`` only on a
nullable column; no ``outside`` on identifier, site or label columns (their values are
refused when wrong: a site outside its declared categories, a label outside 0/1).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from foundation.errors import SchemaError

#: roles whose wrong values are always refused (``Role`` values; schema_columns imports us)
_NO_OUTSIDE_ROLES = frozenset({"identifier", "direct-identifier", "site", "label"})
#: the number of NA spellings a contract may declare (each is matched on every row)
MAX_NA_VALUES = 64


class Outside(StrEnum):
    """What ingest does with a value outside the column's declared domain or vocabulary."""

    #: refuse the file, listing every such row (numeric columns' default)
    REJECT = "reject"
    #: move it to the nearest bound (numeric columns with a domain)
    CLIP = "clip"
    #: make it missing (nullable columns)
    NULL = "null"


class Normalize(StrEnum):
    """How category values are matched against the declared categories and aliases."""

    #: surrounding spaces removed and case folded before matching
    STRIP_LOWER = "strip-lower"


def _fail(key: str, problem: str, fix: str, column: str | None = None) -> SchemaError:
    # every contract error's wording (connectors.schema_columns and connectors.schema use it)
    return SchemaError(f"schema contract: {key}: {problem} (fix: {fix})", column=column)


def parse_na_values(value: object, key: str, column: str | None = None) -> tuple[str, ...]:
    """A list of strings that mean missing, validated."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise _fail(key, "must be a list of strings", 'write na_values = ["NA", "n/a"]', column)
    if len(value) > MAX_NA_VALUES or not all(isinstance(v, str) for v in value):
        raise _fail(
            key,
            f"must be a list of at most {MAX_NA_VALUES} strings",
            'write na_values = ["NA", "n/a"]',
            column,
        )
    return tuple(dict.fromkeys(value))


def parse_aliases(value: object, key: str, column: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``{ CATEGORY = ["spelling", ...] }`` as sorted pairs (a frozen, hashable form)."""
    if not isinstance(value, Mapping) and not isinstance(value, tuple):
        raise _fail(key, "must be a table", 'write aliases = { F = ["female", "f"] }', column)
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for category, spellings in items:
        if isinstance(spellings, str) or not isinstance(spellings, list | tuple):
            raise _fail(
                f"{key}.{category}",
                "must be a list of strings",
                'write aliases = { F = ["female", "f"] }',
                column,
            )
        if not spellings or not all(isinstance(s, str) and s for s in spellings):
            raise _fail(
                f"{key}.{category}",
                "must be a non-empty list of non-empty strings",
                'write aliases = { F = ["female", "f"] }',
                column,
            )
        out.append((str(category), tuple(spellings)))
    return tuple(sorted(out))


def aliases_dict(pairs: tuple[tuple[str, tuple[str, ...]], ...] | None) -> dict[str, list[str]]:
    return {category: list(spellings) for category, spellings in pairs or ()}


def match_key(value: str, normalize: Normalize | None) -> str:
    """The text a value is matched by: itself, or stripped and case-folded."""
    return value.strip().casefold() if normalize is Normalize.STRIP_LOWER else value


def check_cleaning(spec: Any, key: str) -> None:
    """The rules tying a column's cleaning keys (of a ``ColumnSpec``) to its type and role
    (module docstring)."""
    name = spec.name
    if spec.date_format is not None:
        if not isinstance(spec.date_format, str) or "%" not in spec.date_format:
            raise _fail(
                f"{key}.date_format",
                "must be a strptime format with % codes",
                'write e.g. date_format = "%d/%m/%Y"',
                name,
            )
        if not spec.is_temporal:
            raise _fail(
                f"{key}.date_format",
                "is only allowed on a date or timestamp column",
                "remove date_format",
                name,
            )
    if spec.normalize is not None or spec.aliases is not None:
        which = "normalize" if spec.normalize is not None else "aliases"
        if spec.type != "string" or spec.categories is None:
            raise _fail(
                f"{key}.{which}",
                "needs a string column with declared categories",
                "declare categories = [...], or remove " + which,
                name,
            )
    if spec.aliases is not None:
        # every declared category is its own spelling; an alias may not take another's
        seen = {match_key(c, spec.normalize): c for c in spec.categories or ()}
        for category, spellings in spec.aliases:
            if category not in spec.categories:
                raise _fail(
                    f"{key}.aliases.{category}",
                    "is not one of the declared categories",
                    "use a declared category as the key (spellings go in its list)",
                    name,
                )
            for spelling in spellings:
                k = match_key(spelling, spec.normalize)
                if seen.get(k, category) != category:
                    raise _fail(
                        f"{key}.aliases.{category}",
                        f"a spelling also belongs to {seen[k]}"
                        + (" once normalized" if spec.normalize else ""),
                        "list each spelling under one category",
                        name,
                    )
                seen[k] = category
    if spec.normalize is not None:
        keys = [match_key(c, spec.normalize) for c in spec.categories or ()]
        if len(set(keys)) != len(keys):
            raise _fail(
                f"{key}.normalize",
                "two declared categories differ only in case or spaces",
                "rename one, or remove normalize",
                name,
            )
    if spec.outside is None:
        return
    if spec.role.value in _NO_OUTSIDE_ROLES:
        raise _fail(
            f"{key}.outside",
            f"is not allowed on a {spec.role.value} column (wrong values there are refused)",
            "remove outside",
            name,
        )
    has_domain = spec.min is not None or spec.categories is not None
    if not has_domain:
        raise _fail(
            f"{key}.outside",
            "needs a declared domain (min/max) or categories",
            "declare one, or remove outside",
            name,
        )
    if spec.outside is Outside.CLIP and spec.min is None:
        raise _fail(
            f"{key}.outside",
            '"clip" needs a numeric domain (min/max)',
            'use "null" or "reject" for categories',
            name,
        )
    if spec.outside is Outside.NULL and not spec.is_nullable:
        raise _fail(
            f"{key}.outside",
            '"null" on a column declared nullable = false',
            'use "clip" or "reject", or allow nulls',
            name,
        )


def cleaning_to_dict(spec: Any) -> dict[str, Any]:
    """The column's cleaning keys as TOML values; only those declared (hashes stay stable)."""
    out: dict[str, Any] = {}
    if spec.na_values is not None:
        out["na_values"] = list(spec.na_values)
    if spec.date_format is not None:
        out["date_format"] = spec.date_format
    if spec.normalize is not None:
        out["normalize"] = spec.normalize.value
    if spec.aliases is not None:
        out["aliases"] = aliases_dict(spec.aliases)
    if spec.outside is not None:
        out["outside"] = spec.outside.value
    return out
