"""The wire checksum is CRC-32C: checked against a table-driven Python CRC-32C written from the definition."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from cuju_libvirt import _cuju

POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected


def _table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        table.append(c)
    return table


TABLE = _table()


def crc32c(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = (crc >> 8) ^ TABLE[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFFFFFF


def reference(data: bytes, seed: int) -> int:
    """checksum.h: CRC-32C continued from the CRC value (seed ^ seed >> 32) & 0xffffffff."""
    return crc32c(data, (seed ^ (seed >> 32)) & 0xFFFFFFFF)


def test_known_answer() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the published check value of CRC-32C
    assert _cuju.checksum(b"123456789") == 0xE3069283
    assert _cuju.checksum(b"") == 0


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), seed=st.integers(0, 2**64 - 1))
def test_matches_reference(data: bytes, seed: int) -> None:
    assert _cuju.checksum(data, seed) == reference(data, seed)


def test_matches_reference_across_the_interleaved_paths() -> None:
    # The fast path interleaves three streams over 3 x 8 KiB and 3 x 256 B blocks and
    # stitches them together; lengths around those boundaries, unaligned starts too.
    rng = random.Random(5)
    blob = rng.randbytes(3 * 8192 * 2 + 3 * 256 + 64)
    for start in (0, 1, 7):
        for length in (3 * 256 - 1, 3 * 256, 3 * 8192, 3 * 8192 + 3 * 256 + 13, len(blob) - start):
            data = blob[start : start + length]
            assert _cuju.checksum(memoryview(blob)[start : start + length], 99) == reference(data, 99)
