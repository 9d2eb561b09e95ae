"""The person-level split every reader applies, torch-free.

A row is in the test part when a hash of (its person, ``seed``) falls below the test fraction:
a person is never in both parts, and the split does not change when other people or sites are
added. The person is the first 16 hex digits of ingest's pseudonym, or, in a dataset without
an identifier, the row's position in the governed file. ``connectors.reader`` (tensors for
training) and ``connectors.tables`` (Arrow tables for DP queries and synthesis) both call
``in_part`` here, so the two cannot drift apart, and a reader of tables never imports torch.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import pyarrow as pa

from foundation.errors import SchemaError

_SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)


class Split(StrEnum):
    """Which part of the person-level split to load."""

    TRAIN = "train"
    TEST = "test"


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash (SplitMix64 finaliser), vectorised; wraps modulo 2**64."""
    z = x + _SPLITMIX_GAMMA
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def person_keys(pseudonyms: pa.Array) -> np.ndarray:
    """The first 16 hex digits of each pseudonym as uint64, read straight from Arrow's buffer."""
    n = len(pseudonyms)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(
        pseudonyms.buffers()[1], dtype=np.int32, count=n + 1, offset=pseudonyms.offset * 4
    )
    lengths = np.diff(offsets)
    if pseudonyms.null_count or not np.all(lengths == lengths[0]) or lengths[0] < 16:
        raise SchemaError("the identifier column does not hold ingest's pseudonyms; re-ingest")
    width = int(lengths[0])
    data = np.frombuffer(pseudonyms.buffers()[2], dtype=np.uint8)
    chars = data[offsets[0] : offsets[0] + width * n].reshape(n, width)[:, :16]
    # ASCII hex digit -> value: '0'-'9' are 48-57, 'a'-'f' are 97-102
    digits = np.where(chars >= 97, chars - 87, chars - 48).astype(np.uint64)
    shifts = np.arange(60, -4, -4, dtype=np.uint64)
    return np.bitwise_or.reduce(digits << shifts, axis=1)


def in_part(persons: np.ndarray, part: Split | str, test_fraction: float, seed: int) -> np.ndarray:
    """Which of ``persons`` (uint64 keys) fall in ``part`` of the split for ``seed``."""
    salt = splitmix64(np.array([seed], dtype=np.uint64))[0]
    u = (splitmix64(persons ^ salt) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    in_test = u < float(test_fraction)
    return in_test if Split(part) is Split.TEST else ~in_test
