"""The keys of one encrypted FT-link connection (the record layer of ``c_ext/aead.h``).

The backup draws a fresh 32-byte secret together with the one-time token of each FT-link
connection and hands both to the primary inside the peer channel, which is then mutual
TLS (``peer_tls: on``; in the pre-shared-key mode the FT link stays in the clear, since
the secret would cross the LAN readable). Both ends derive the same four values from it:

    K_pb = HMAC-SHA256(secret, "cuju-ft/1 primary->backup key")
    N_pb = HMAC-SHA256(secret, "cuju-ft/1 primary->backup iv")[:12]
    K_bp, N_bp likewise for "backup->primary"

A token admits exactly one connection and each connection numbers its records from 0,
so a (key, nonce) pair is never used twice, across reconnects included.

On an encrypted link the token itself never crosses the FT link: the primary opens the
connection with ``admission(secret, token)`` = HMAC-SHA256(secret, "cuju-ft/1 admit" +
token) instead, which proves it holds the secret and is worthless once used (the backup
admits each value once).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from cuju_libvirt import _cuju

SECRET_BYTES = 32
_KEY, _IV = 32, 12


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def _derive(secret: bytes, label: str, size: int) -> bytes:
    return hmac.new(secret, f"cuju-ft/1 {label}".encode(), hashlib.sha256).digest()[:size]


def admission(secret: bytes, token: bytes) -> bytes:
    """What the primary sends on an encrypted FT link in place of the token (same length)."""
    return hmac.new(secret, b"cuju-ft/1 admit" + token, hashlib.sha256).digest()[: len(token)]


@dataclass(frozen=True)
class LinkKeys:
    """What each end hands its C sender or receiver (``link_keys=``): its own tx first."""

    primary: bytes
    backup: bytes

    @classmethod
    def derive(cls, secret: bytes) -> LinkKeys:
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"an FT-link secret has {SECRET_BYTES} bytes, not {len(secret)}")
        pb = _derive(secret, "primary->backup key", _KEY) + _derive(secret, "primary->backup iv", _IV)
        bp = _derive(secret, "backup->primary key", _KEY) + _derive(secret, "backup->primary iv", _IV)
        keys = cls(primary=pb + bp, backup=bp + pb)
        assert len(keys.primary) == _cuju.LINK_KEYS_LEN
        return keys
