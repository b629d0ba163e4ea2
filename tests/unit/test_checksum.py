"""The wire checksum is XXH64: checked against the system's libxxhash, an independent implementation."""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuju_libvirt import _cuju


def _libxxhash() -> ctypes.CDLL | None:
    for name in ("libxxhash.so.0", ctypes.util.find_library("xxhash")):
        if name:
            try:
                lib = ctypes.CDLL(name)
            except OSError:
                continue
            lib.XXH64.restype = ctypes.c_uint64
            lib.XXH64.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64)
            return lib
    return None


LIB = _libxxhash()


def test_known_answers() -> None:
    # Published XXH64 test vectors.
    assert _cuju.checksum(b"") == 0xEF46DB3751D8E999
    assert _cuju.checksum(b"abc") == 0x44BC2CF5AD770999


@pytest.mark.skipif(LIB is None, reason="libxxhash.so.0 (Debian libxxhash0) not installed")
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), seed=st.integers(0, 2**64 - 1))
def test_matches_libxxhash(data: bytes, seed: int) -> None:
    assert LIB is not None
    assert _cuju.checksum(data, seed) == LIB.XXH64(data, len(data), seed)


@pytest.mark.skipif(LIB is None, reason="libxxhash.so.0 (Debian libxxhash0) not installed")
def test_matches_libxxhash_on_a_large_buffer() -> None:
    assert LIB is not None
    data = bytes(range(256)) * 4099  # not a multiple of the 32-byte stripe
    assert _cuju.checksum(memoryview(data), 7) == LIB.XXH64(data, len(data), 7)
