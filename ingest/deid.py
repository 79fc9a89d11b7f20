"""Pseudonyms for identifiers kept in a collection (patients, studies, series).

A pseudonym is an HMAC-SHA256 of the identifier under the collection's secret key: consistent
within a collection (so "exclude the same patient" works), not reversible without the key, and
different between collections.
"""

from __future__ import annotations

import hashlib
import hmac


def pseudonym(value: str, secret: bytes, kind: str) -> str:
    """Pseudonym of ``value``; ``kind`` is "patient" (``pt-…``) or "uid" (a valid ``2.25.…`` UID)."""
    mac = hmac.new(secret, f"{kind}:{value.strip()}".encode(), hashlib.sha256).digest()
    if kind == "uid":
        return "2.25." + str(int.from_bytes(mac[:16], "big"))
    return f"pt-{mac[:8].hex()}"
