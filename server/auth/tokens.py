"""Bearer tokens: made at random, stored only as salted SHA-256 hashes, compared in constant time.

Tokens are 256-bit random secrets, not passwords, so one salted hash is enough (a slow password hash would cost
tens of milliseconds per call and protect nothing more). ``facegate token new`` prints a token and its hash;
``facegate token hash`` reads a token on stdin and prints its hash, for the configuration.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

_SCHEME = "sha256"
MIN_TOKEN_CHARS = 24


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str, salt: bytes | None = None) -> str:
    """``sha256$<salt hex>$<digest hex>``, the form the configuration stores."""
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"a token must have at least {MIN_TOKEN_CHARS} characters (use `facegate token new`)")
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.sha256(salt + token.encode()).hexdigest()
    return f"{_SCHEME}${salt.hex()}${digest}"


def parse_hash(stored: str) -> tuple[bytes, bytes]:
    scheme, salt, digest = [*stored.split("$"), "", "", ""][:3]
    try:
        if scheme != _SCHEME or not salt or len(digest) != 64:
            raise ValueError(stored)
        return bytes.fromhex(salt), bytes.fromhex(digest)
    except ValueError:
        raise ValueError("a token hash must look like sha256$<salt hex>$<64 hex digits> (from "
                         "`facegate token hash`)") from None


def matches(token: str, stored: tuple[bytes, bytes]) -> bool:
    salt, digest = stored
    return hmac.compare_digest(hashlib.sha256(salt + token.encode()).digest(), digest)
