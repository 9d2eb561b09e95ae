"""A governed dataset's own data key: drawn at ingest, kept wrapped by the zone's key.

Three layers, each wrapping the next with AES-256-GCM::

    ZONE/data.key                32 random bytes (0600), the zone's key; never in a dataset folder
      wraps  dataset.key         this dataset's key, beside data.parquet (0600)
        wraps  Parquet's keys    the per-file keys pyarrow draws, kept in the file's key metadata
          encrypt  data.parquet  its footer and every column (Parquet modular encryption)

Why a key per dataset: deleting a dataset destroys its ``dataset.key``, and then its file and
every copy or backup of that file are unreadable, without touching the zone key or any other
dataset. Why the zone key stays outside: a dataset folder (or its file) copied out of the
zone carries no key that opens it.

``dataset.key`` names the zone key by a path relative to its own folder, so a zone moved with
``mv`` keeps working and a copied folder finds nothing. Keys are unwrapped only in the process
that reads (the service's workers, through ``connectors.reader`` and ``connectors.tables``);
pyarrow asks our in-memory ``KmsClient`` for them, and nothing is cached beyond one read.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet.encryption as pe
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from foundation.errors import IntegrityError, SchemaError

#: the wrapped data key, beside the governed file
WRAPPED_KEY_FILE = "dataset.key"
KEY_BYTES = 32
_NONCE_BYTES = 12
_FORMAT = 1
# associated data binds each ciphertext to its purpose and key id: a wrapped dataset key
# cannot be passed off as a Parquet file key, nor one dataset's key as another's
_DATASET_KEY_AAD = b"safe-zone/dataset-key/v1\x00"
_FILE_KEY_AAD = b"safe-zone/parquet-file-key/v1\x00"
# the last four bytes of a Parquet file whose footer is encrypted ("PAR1" when it is plain)
_ENCRYPTED_MAGIC = b"PARE"


@dataclass(frozen=True)
class DataKey:
    """One dataset's key, unwrapped (in the reading process only)."""

    #: random, public: names the key in the Parquet file's key metadata
    key_id: str
    secret: bytes = field(repr=False)


# --- the zone key -----------------------------------------------------------------------------


def read_zone_key(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(
            f"{path}: the zone's data key is missing, so no encrypted dataset can be read; "
            "restore the file from this zone's backup"
        ) from None
    if len(key) != KEY_BYTES:
        raise IntegrityError(
            f"{path}: the zone's data key is {len(key)} bytes, not {KEY_BYTES}; restore it"
        )
    return key


# --- making, loading and destroying a dataset key ---------------------------------------------


def new_wrapped_key(folder: Path, zone_key_file: Path, name_in_errors: str) -> DataKey:
    """Draw a dataset key, write it wrapped under the zone key into ``folder``; return it.

    ``folder`` is where data.parquet will sit; the zone key is named relative to it.
    """
    zone_key = read_zone_key(zone_key_file)
    key = DataKey(key_id=f"dk-{secrets.token_hex(16)}", secret=secrets.token_bytes(KEY_BYTES))
    nonce = secrets.token_bytes(_NONCE_BYTES)
    wrapped = AESGCM(zone_key).encrypt(nonce, key.secret, _DATASET_KEY_AAD + key.key_id.encode())
    record = {
        "format": _FORMAT,
        "key_id": key.key_id,
        # relative: a zone moved with mv still finds its key, a copied folder does not
        "zone_key": os.path.relpath(zone_key_file.resolve(), folder.resolve()),
        "nonce": base64.b64encode(nonce).decode(),
        "wrapped": base64.b64encode(wrapped).decode(),
    }
    path = folder / WRAPPED_KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return key


def load_data_key(folder: Path, name: str) -> DataKey:
    """The dataset key in ``folder``, unwrapped under the zone key its record names."""
    path = folder / WRAPPED_KEY_FILE
    record: Any
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise SchemaError(
            f"dataset {name!r} is encrypted and its data key is gone (the dataset was deleted, "
            "or its file was copied out of its zone); nothing can read it"
        ) from None
    except (OSError, ValueError):
        record = None
    try:
        key_id = str(record["key_id"])
        zone_key_file = folder / str(record["zone_key"])
        nonce = base64.b64decode(record["nonce"], validate=True)
        wrapped = base64.b64decode(record["wrapped"], validate=True)
        if record["format"] != _FORMAT:
            raise ValueError
    except (TypeError, KeyError, ValueError, binascii.Error):
        raise IntegrityError(
            f"dataset {name!r}: its {WRAPPED_KEY_FILE} is damaged; restore it from a backup"
        ) from None
    zone_key = read_zone_key(zone_key_file)
    try:
        secret = AESGCM(zone_key).decrypt(nonce, wrapped, _DATASET_KEY_AAD + key_id.encode())
    except InvalidTag:
        raise IntegrityError(
            f"dataset {name!r}: its data key does not open under this zone's key (another "
            "zone's dataset, or a damaged key file); restore both from the same backup"
        ) from None
    return DataKey(key_id=key_id, secret=secret)


def destroy_data_key(folder: Path) -> bool:
    """Overwrite and remove ``folder``'s wrapped key; whether there was one.

    The overwrite is best effort (a copy-on-write or flash disk may keep old blocks); what
    makes the data unreadable is that no copy of the unwrapped key exists and the zone key
    alone opens nothing without this file.
    """
    path = folder / WRAPPED_KEY_FILE
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    with path.open("r+b") as fh:
        fh.write(secrets.token_bytes(size))
        fh.flush()
        os.fsync(fh.fileno())
    path.unlink()
    return True


def is_encrypted(file: Path) -> bool:
    """Whether a Parquet file's footer is encrypted (files from before encryption are not)."""
    with file.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() < len(_ENCRYPTED_MAGIC):
            return False
        fh.seek(-len(_ENCRYPTED_MAGIC), os.SEEK_END)
        return fh.read() == _ENCRYPTED_MAGIC


# --- what pyarrow needs -----------------------------------------------------------------------


class _DatasetKms(pe.KmsClient):
    """An in-memory KMS holding one dataset key: wraps and unwraps Parquet's file keys."""

    def __init__(self, key: DataKey) -> None:
        super().__init__()
        self._key = key

    def _aad(self, master_key_identifier: str) -> bytes:
        if master_key_identifier != self._key.key_id:
            # a file written under another dataset's key
            raise ValueError("the file's key belongs to another dataset")
        return _FILE_KEY_AAD + master_key_identifier.encode()

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = AESGCM(self._key.secret).encrypt(
            nonce, bytes(key_bytes), self._aad(master_key_identifier)
        )
        return base64.b64encode(nonce + sealed).decode()

    def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
        raw = base64.b64decode(wrapped_key)
        return AESGCM(self._key.secret).decrypt(
            raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], self._aad(master_key_identifier)
        )


@dataclass(frozen=True)
class Decryption:
    """pyarrow's decryption properties for one dataset, with the factory they call back into
    (kept alive here for as long as the properties are used)."""

    properties: pe.FileDecryptionProperties
    _factory: pe.CryptoFactory = field(repr=False)


def _factory(key: DataKey) -> pe.CryptoFactory:
    # a factory per use: pyarrow caches KMS clients and keys per factory, so nothing
    # outlives the read, and a destroyed key is not remembered anywhere
    return pe.CryptoFactory(lambda _config: _DatasetKms(key))


def encryption_properties(key: DataKey) -> pe.FileEncryptionProperties:
    """Encrypt the footer and every column under file keys wrapped by ``key``."""
    config = pe.EncryptionConfiguration(
        footer_key=key.key_id,
        uniform_encryption=True,
        # single wrapping: each file key is wrapped by the dataset key itself, so no
        # intermediate key is cached in the process
        double_wrapping=False,
        internal_key_material=True,
        data_key_length_bits=256,
    )
    return _factory(key).file_encryption_properties(pe.KmsConnectionConfig(), config)


def decryption(key: DataKey) -> Decryption:
    factory = _factory(key)
    properties = factory.file_decryption_properties(
        pe.KmsConnectionConfig(), pe.DecryptionConfiguration()
    )
    return Decryption(properties, factory)
