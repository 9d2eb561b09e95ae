"""Bearer tokens: shown once, stored only as a hash.

A token is ``sz_`` + 32 random bytes (URL-safe base64). The database keeps its SHA-256 hex
digest; a plain hash (no salt, no slow KDF) is enough because the token is 256 bits of
randomness, not a password someone chose. Lookups go by the digest; ``token_matches``
compares digests in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

#: every token starts with this, so a leaked one is easy to recognise and scan for
TOKEN_PREFIX = "sz_"
#: random bytes per token (256 bits)
TOKEN_BYTES = 32


def hash_token(token: str) -> str:
    """The SHA-256 hex digest stored in place of ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh ``(token, token_hash)``: show the token once, store only the hash."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    return token, hash_token(token)


def looks_like_token(token: object) -> bool:
    """A cheap shape check before any lookup (never says which part is wrong)."""
    return isinstance(token, str) and token.startswith(TOKEN_PREFIX) and 16 < len(token) < 256


def token_matches(token: str, token_hash: str) -> bool:
    """Does ``token`` hash to ``token_hash``? Constant time in the digests' contents."""
    return hmac.compare_digest(hash_token(token).encode("ascii"), token_hash.encode("ascii"))
