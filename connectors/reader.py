"""The only row reader in the zone: governed Parquet -> torch tensors.

Every read goes through a ``DatasetHandle``, which cannot exist without an ``authorization``
(the job or grant id that allowed the read) and calls its ``on_open`` callback exactly once,
before the first row is read, so the job runner can record that data was touched.

What a read does, and why:

* **Projection and site pushdown.** Only the plan's feature columns and the label are decoded
  (plus the pseudonym when the split or the one-row-per-person rule needs it). Ingest cuts row
  groups at site boundaries, so a site filter picks row groups from the footer's statistics
  without decoding anything; a row group whose statistics do not name a single site (a file
  not written by ``ingest``) is filtered row by row instead.
* **One row per person.** With ``rows_per_person = "many"`` the reader keeps, for each
  person, their first row in governed storage order among the selected sites. Storage order
  is (site, pseudonym, source order), fixed at ingest, so the choice is deterministic and does
  not depend on threads. This bounds each person's contribution to one row, which is what the
  DP mechanisms downstream assume. With ``"one"`` ingest already refused repeats.
* **Person-level split.** A row is in the test part when a hash of (its person's pseudonym,
  ``seed``) falls below ``test_fraction``; a person is therefore never in both parts, and the
  split does not change when other people or sites are added. Without an identifier column
  every row is a person and the row's position in the governed file stands in for it.
* **Speed.** Arrow decodes the selected row groups on its own threads, without the GIL.
  The transform then runs in a few large contiguous row ranges, one per thread, each straight
  into its slice of one preallocated output in Arrow's memory pool. Categorical columns are
  read as dictionaries, so their strings are never materialised.
  ``benchmarks/bench_parquet.py`` measures this against ``pyarrow.parquet.read_table``.

The handle is ``connectors.dataset_handle.DatasetHandle``; ``connectors.governed_file``
checks the file against the contract from its footer (and ``dataset_summary`` answers rows,
persons and rows per site from the footer alone).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from connectors.dataset_handle import DatasetHandle
from connectors.dataset_key import Decryption
from connectors.governed_file import (
    _check_schema,
    _data_file,
    _footer_info,
    _read_metadata,
    open_decryption,
)
from connectors.person_split import Split, in_part, person_keys
from connectors.preprocess import FeaturePlan
from connectors.preprocess_steps import StepKind
from connectors.schema import RowsPerPerson, SchemaContract
from foundation.errors import SchemaError, SpecError

# Rows per streamed batch: 64 Ki rows x ~30 outputs of float32 is ~8 MiB per tensor, large
# enough that per-batch Python costs vanish and small enough to keep memory flat.
DEFAULT_BATCH_ROWS = 65_536
# Below this many rows per thread the transform stays in one thread: thread start-up and GIL
# hand-offs would cost more than they save.
_MIN_PARALLEL_ROWS = 131_072
# More transform threads than this only queue for the GIL (measured on 16 cores: 2 and 4
# threads 36-38 ms, 8 threads 49 ms for 1M rows x 25 outputs).
_MAX_TRANSFORM_THREADS = 4


# --- public reads -----------------------------------------------------------------------------


def load_split(
    handle: DatasetHandle,
    plan: FeaturePlan,
    label: str,
    part: Split,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    sites: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One part of the person-level split: X float32 [n, plan.n_outputs], y float32 [n]."""
    try:
        part = Split(part)
    except ValueError:
        raise SpecError("part", "must be train or test", "pass Split.TRAIN or Split.TEST") from None
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, int | float):
        raise SpecError("test_fraction", "must be a number", "pass e.g. 0.2")
    if not 0.0 < float(test_fraction) < 1.0:
        raise SpecError("test_fraction", "must lie strictly between 0 and 1", "pass e.g. 0.2")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpecError("seed", "must be a non-negative integer", "pass e.g. 0")
    read = _Read.prepare(handle, plan, label, sites)
    return read.tensors(split=(part, float(test_fraction), seed))


def load_tensors(
    handle: DatasetHandle,
    plan: FeaturePlan,
    label: str,
    sites: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every person (one row each): X float32 [n, plan.n_outputs], y float32 [n]."""
    return _Read.prepare(handle, plan, label, sites).tensors(split=None)


def iter_batches(
    handle: DatasetHandle,
    plan: FeaturePlan,
    label: str,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    sites: Sequence[str] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stream (X, y) tensors of at most ``batch_rows`` rows each, one row per person."""
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise SpecError("batch_rows", "must be a positive integer", f"e.g. {DEFAULT_BATCH_ROWS}")
    read = _Read.prepare(handle, plan, label, sites)  # checks run now, not at first next()
    return read.batches(batch_rows)


# --- the read itself --------------------------------------------------------------------------


def _site_list(sites: Sequence[str] | None, contract: SchemaContract) -> tuple[str, ...] | None:
    if sites is None:
        return None
    if isinstance(sites, str) or not isinstance(sites, Sequence):
        raise SpecError("sites", "must be a list of site names", 'pass ["hospital-a"]')
    if not sites:
        raise SpecError("sites", "is empty", "pass None for every site")
    if not all(isinstance(s, str) for s in sites):
        raise SpecError("sites", "must hold site names (strings)", 'pass ["hospital-a"]')
    if contract.site is None:
        raise SpecError("sites", "the dataset has no site column", "leave sites out")
    declared = contract.column(contract.site).categories
    if declared is not None:
        unknown = [s for s in sites if s not in declared]
        if unknown:
            raise SpecError(
                "sites", f"{unknown[0]!r} is not a declared site", "use: " + ", ".join(declared)
            )
    return tuple(dict.fromkeys(sites))


@dataclass(frozen=True)
class _Group:
    """One selected row group and which of its rows to keep (None: all)."""

    index: int
    first_row: int
    num_rows: int
    keep: np.ndarray | None = None

    @property
    def count(self) -> int:
        return self.num_rows if self.keep is None else int(np.count_nonzero(self.keep))


@dataclass(frozen=True)
class _Read:
    handle: DatasetHandle
    file: Path
    metadata: pq.FileMetaData
    plan: FeaturePlan
    label: str
    sites: tuple[str, ...] | None
    #: the file's unwrapped key, in this process only (None: a plain file)
    crypt: Decryption | None = None

    @classmethod
    def prepare(
        cls,
        handle: DatasetHandle,
        plan: FeaturePlan,
        label: str,
        sites: Sequence[str] | None,
    ) -> _Read:
        """Every check that needs no rows: arguments, plan vs contract, file vs contract."""
        if not isinstance(handle, DatasetHandle):
            raise SpecError("handle", "must be a DatasetHandle", "build one with an authorization")
        contract = handle.contract
        if not isinstance(plan, FeaturePlan):
            raise SpecError("plan", "must be a FeaturePlan", "use FeaturePlan.from_contract")
        labels = contract.label_names()
        if not isinstance(label, str) or label not in labels:
            raise SpecError(
                "label",
                "is not a label column of the dataset",
                "use one of: " + (", ".join(labels) or "(the contract declares no label)"),
            )
        try:
            expected = FeaturePlan.from_contract(contract, plan.features)
        except SpecError:
            expected = None
        if expected != plan:
            raise SpecError(
                "plan",
                "was not built from this dataset's contract",
                "build it with FeaturePlan.from_contract(handle.contract, features)",
            )
        chosen = _site_list(sites, contract)
        file = _data_file(handle.path, handle.name)
        crypt = open_decryption(file, handle.name)
        metadata = _read_metadata(file, crypt)
        schema = metadata.schema.to_arrow_schema()
        _check_schema(schema, contract)
        _footer_info(schema)
        return cls(handle, file, metadata, plan, label, chosen, crypt)

    # -- planning: which row groups and rows -------------------------------------------------
    def _groups(self) -> list[_Group]:
        contract = self.handle.contract
        groups = []
        first = 0
        site_index = (
            self.metadata.schema.to_arrow_schema().get_field_index(contract.site)
            if contract.site is not None
            else -1
        )
        for i in range(self.metadata.num_row_groups):
            rg = self.metadata.row_group(i)
            start, first = first, first + rg.num_rows
            if rg.num_rows == 0:
                continue
            if self.sites is not None:
                stats = rg.column(site_index).statistics
                if stats is not None and stats.has_min_max and stats.min == stats.max:
                    if stats.min not in self.sites:
                        continue  # pruned from the footer: not one byte of it is read
                else:
                    groups.append(_Group(i, start, rg.num_rows, keep=_MIXED))
                    continue
            groups.append(_Group(i, start, rg.num_rows))
        return groups

    def _file(self, columns: Sequence[str] = ()) -> pq.ParquetFile:
        dictionary = [
            s.name for s in self.plan.steps if s.kind is StepKind.CATEGORY and s.name in columns
        ]
        return pq.ParquetFile(
            self.file,
            metadata=self.metadata,
            memory_map=True,
            read_dictionary=dictionary,
            decryption_properties=None if self.crypt is None else self.crypt.properties,
        )

    def _select(self, groups: list[_Group], split: tuple[Split, float, int] | None) -> list[_Group]:
        """Row masks for mixed-site groups, one row per person, and the split."""
        contract = self.handle.contract
        mixed = any(g.keep is _MIXED for g in groups)
        dedup = contract.rows_per_person is RowsPerPerson.MANY
        if not (mixed or dedup or split is not None) or not groups:
            return groups
        id_name, site_name = contract.identifier, contract.site
        columns = [c for c in (id_name, site_name if mixed else None) if c is not None]
        keep = np.ones(sum(g.num_rows for g in groups), dtype=bool)
        if columns:
            table = self._file().read_row_groups([g.index for g in groups], columns=columns)
        if mixed:
            # rows of pure groups were chosen by statistics; mixed groups are filtered here
            wanted = pc.is_in(table.column(site_name), value_set=pa.array(self.sites, pa.string()))
            in_mixed = np.concatenate([np.full(g.num_rows, g.keep is _MIXED) for g in groups])
            keep &= ~in_mixed | np.asarray(pc.fill_null(wanted, False))
        if id_name is not None:
            ids = table.column(id_name).combine_chunks()
        if dedup and id_name is not None:
            # first row of each person in storage order, among the rows still kept
            kept_ids = ids.filter(pa.array(keep))
            codes = np.asarray(pc.dictionary_encode(kept_ids).indices)
            first = np.ones(codes.size, dtype=bool)
            if codes.size > 1:
                running = np.maximum.accumulate(codes)
                first[1:] = running[1:] > running[:-1]
            keep[np.flatnonzero(keep)] = first
        if split is not None:
            part, fraction, seed = split
            if id_name is not None:
                person = person_keys(ids)
            else:
                person = np.concatenate(
                    [
                        np.arange(g.first_row, g.first_row + g.num_rows, dtype=np.uint64)
                        for g in groups
                    ]
                )
            keep &= in_part(person, part, fraction, seed)
        out, at = [], 0
        for g in groups:
            mask = keep[at : at + g.num_rows]
            at += g.num_rows
            out.append(_Group(g.index, g.first_row, g.num_rows, None if mask.all() else mask))
        return out

    # -- reading ---------------------------------------------------------------------------
    def _columns(self) -> list[str]:
        return [*self.plan.features, self.label]

    def tensors(self, split: tuple[Split, float, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        self.handle._latch.fire(self.handle.on_open)
        groups = [g for g in self._select(self._groups(), split) if g.count]
        columns = self._columns()
        if groups:
            # Arrow decodes the selected row groups on its own threads (no GIL)
            table = self._file(columns).read_row_groups(
                [g.index for g in groups], columns=columns, use_threads=True
            )
            if any(g.keep is not None for g in groups):
                table = table.filter(pa.array(_concat_keep(groups)))
        else:
            table = self._file(columns).schema_arrow.empty_table().select(columns)
        n = table.num_rows
        X = _allocate((n, self.plan.n_outputs))
        y = _allocate((n,))
        # Then the transform runs in contiguous row ranges, one per core, each straight into
        # its slice of the one output. Ranges are large on purpose: each thread's numpy calls
        # then run long stretches without the GIL (measured on 1M rows x 25 outputs, 2 cores:
        # 27 ms in one thread, 20 ms in two halves, slower again with many small ranges).
        parts = max(1, min(pa.cpu_count(), _MAX_TRANSFORM_THREADS, n // _MIN_PARALLEL_ROWS))
        bounds = np.linspace(0, n, parts + 1).astype(int).tolist()
        ranges = list(zip(bounds[:-1], bounds[1:], strict=True))

        def fill(bound: tuple[int, int]) -> None:
            lo, hi = bound
            self._fill(table.slice(lo, hi - lo), X[lo:hi], y[lo:hi])

        if parts == 1:
            fill(ranges[0])
        else:
            # the calling thread takes the first range itself: one thread fewer to start
            with ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="zone-read") as pool:
                others = [pool.submit(fill, r) for r in ranges[1:]]
                fill(ranges[0])
                for future in others:
                    future.result()  # re-raises a failure in another range
        return torch.from_numpy(X), torch.from_numpy(y)

    def batches(self, batch_rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.handle._latch.fire(self.handle.on_open)
        groups = [g for g in self._select(self._groups(), None) if g.count]
        if not groups:
            return
        columns = self._columns()
        keep = None if all(g.keep is None for g in groups) else _concat_keep(groups)
        at = 0
        reader = self._file(columns).iter_batches(
            batch_size=batch_rows, row_groups=[g.index for g in groups], columns=columns
        )
        for batch in reader:
            m = batch.num_rows
            if keep is not None:
                batch = batch.filter(pa.array(keep[at : at + m]))
            at += m
            if batch.num_rows == 0:
                continue
            X = np.empty((batch.num_rows, self.plan.n_outputs), dtype=np.float32)
            y = np.empty(batch.num_rows, dtype=np.float32)
            self._fill(batch, X, y)
            yield torch.from_numpy(X), torch.from_numpy(y)

    def _fill(self, table: pa.Table | pa.RecordBatch, X: np.ndarray, y: np.ndarray) -> None:
        self.plan.transform_into(table, X)
        labels = table.column(self.label)
        if labels.null_count:
            raise SchemaError(
                f"column {self.label!r}: the governed file holds a missing label; re-ingest",
                column=self.label,
            )
        chunks = labels.chunks if isinstance(labels, pa.ChunkedArray) else [labels]
        at = 0
        for chunk in chunks:
            m = len(chunk)
            if pa.types.is_boolean(chunk.type):
                values = np.unpackbits(
                    np.frombuffer(chunk.buffers()[1], dtype=np.uint8),
                    count=chunk.offset + m,
                    bitorder="little",
                )[chunk.offset :]
            else:
                values = chunk.to_numpy(zero_copy_only=False)
            y[at : at + m] = values
            at += m


def _concat_keep(groups: list[_Group]) -> np.ndarray:
    """One keep mask over the concatenation of the groups' rows."""
    return np.concatenate(
        [np.ones(g.num_rows, dtype=bool) if g.keep is None else g.keep for g in groups]
    )


def _allocate(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised float32 array in Arrow's memory pool.

    The pool keeps freed pages mapped, so a later load reuses them instead of taking a page
    fault per 4 KiB (about 8 ms per 100 MiB here) the way a fresh ``np.empty`` does.
    The returned array (and a tensor made from it) keeps the buffer alive.
    """
    size = int(np.prod(shape)) * 4
    if size == 0:
        return np.empty(shape, dtype=np.float32)
    return np.frombuffer(pa.allocate_buffer(size), dtype=np.float32).reshape(shape)


# Marks a row group whose site statistics do not name one site: its rows are filtered one by
# one. An immutable sentinel (a zero-length read-only array), not state.
_MIXED = np.zeros(0, dtype=bool)
_MIXED.flags.writeable = False
