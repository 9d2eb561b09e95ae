"""What a Parquet file's footer says about it, without reading a single value.

The release gate (``sandbox.release_check``) checks a synthetic table before it leaves: its
column names, its row count and whether it carries key-value metadata. Those live in the
footer; reading them here keeps every Parquet reader inside ``connectors`` (chokepoint: only
connectors reads rows) and never decodes a column chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from foundation.errors import SchemaError


@dataclass(frozen=True)
class ParquetFooter:
    #: column names in file order (duplicates kept, so a caller can refuse them)
    names: tuple[str, ...]
    num_rows: int
    #: keys of the file's key-value metadata (pyarrow writes ``ARROW:schema``)
    kv_keys: frozenset[bytes]
    #: whether the Arrow schema or any of its fields carries metadata of its own
    schema_metadata: bool


def read_footer(data: bytes) -> ParquetFooter:
    """The footer of the Parquet file held in ``data``; ``SchemaError`` if it is not one."""
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        schema = pf.schema_arrow
        meta = pf.metadata
    except (pa.ArrowException, OSError, ValueError):
        raise SchemaError("not a readable Parquet file") from None
    return ParquetFooter(
        names=tuple(schema.names),
        num_rows=int(meta.num_rows),
        kv_keys=frozenset((meta.metadata or {}).keys()),
        schema_metadata=bool(schema.metadata) or any(f.metadata for f in schema),
    )
