"""Governed rows as an Arrow table, for mechanisms that need columns rather than tensors.

DP synthesis fits on a table of governed columns; like ``reader.load_split`` this keeps one
row per person (the first in storage order) and splits by person with the same hash, so the
train part here is the train part everywhere. DP queries (``privacy.dpquery``) pass
``max_rows_per_person=k`` (the contract's ``query_rows_per_person``) to keep each person's
first k rows in storage order instead; k = 1 is the one-row rule above. The handle's ``on_open`` fires before the first
row is read. Direct identifiers never exist in governed storage; the pseudonym is read only
to split and deduplicate and is dropped unless asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from connectors.dataset_handle import DatasetHandle
from connectors.governed_file import _data_file, open_decryption
from connectors.person_split import Split, in_part, person_keys
from connectors.schema_columns import Role
from foundation.errors import SpecError


def load_table(
    handle: DatasetHandle,
    columns: Sequence[str],
    *,
    part: Split | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    keep_identifier: bool = False,
    max_rows_per_person: int = 1,
) -> pa.Table:
    contract = handle.contract
    k = max_rows_per_person
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SpecError("max_rows_per_person", "must be a whole number of at least 1", "pass 1")
    known = {c.name: c for c in contract.columns}
    for name in columns:
        spec = known.get(name)
        if spec is None:
            raise SpecError(
                "columns",
                f"{name!r} is not a column of {handle.name!r}",
                "see `sandbox dataset show`",
            )
        if spec.role is Role.DIRECT_IDENTIFIER:
            raise SpecError(
                "columns", f"{name!r} is a direct identifier, dropped at ingest", "leave it out"
            )
    if not 0.0 < float(test_fraction) < 1.0:
        raise SpecError("test_fraction", "must lie strictly between 0 and 1", "pass e.g. 0.2")
    id_name = contract.identifier
    wanted = [c for c in columns if c != id_name]
    read_cols = [*wanted, id_name] if id_name else wanted
    path = _data_file(handle.path, handle.name)
    crypt = open_decryption(path, handle.name)  # before on_open: a gone key reads nothing
    handle._latch.fire(handle.on_open)
    table = pq.read_table(
        path,
        columns=read_cols,
        decryption_properties=None if crypt is None else crypt.properties,
    )
    if id_name is None:
        persons = np.arange(table.num_rows, dtype=np.uint64)
        keep = np.ones(table.num_rows, dtype=bool)
    else:
        ids = table.column(id_name).combine_chunks()
        persons = person_keys(ids)
        # each person's first k rows in storage order: k rows per person bounds contributions
        # (k = 1: the first row). A stable sort groups a person's rows, keeping their order;
        # a row's rank is its place in its group.
        codes = np.asarray(pc.dictionary_encode(ids).indices)
        order = np.argsort(codes, kind="stable")
        new_group = np.ones(len(order), dtype=bool)
        new_group[1:] = codes[order][1:] != codes[order][:-1]
        starts = np.flatnonzero(new_group)
        group_start = starts[np.cumsum(new_group) - 1]
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order)) - group_start
        keep = rank < k
    if part is not None:
        keep &= in_part(persons, part, float(test_fraction), seed)
    table = table.filter(pa.array(keep))
    if id_name and not keep_identifier:
        table = table.drop_columns([id_name])
    return table
