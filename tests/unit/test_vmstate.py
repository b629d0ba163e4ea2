"""The device-state blob walker against streams built here from the layout in vmstate.py's docstring.

Real QEMU blobs are checked in tests/integration/test_devstate.py; here every field is chosen,
so each check of the walker can be made to fail on purpose, footer look-alikes included.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuju_libvirt.ft_engine.vmstate import BlobFormatError, Section, check_end, parse_blob

HEADER = struct.pack(">II", 0x5145564D, 3)


def section(section_id: int, name: str, payload: bytes, instance: int = 0, version: int = 1) -> bytes:
    raw = name.encode()
    head = b"\x04" + struct.pack(">IB", section_id, len(raw)) + raw + struct.pack(">II", instance, version)
    return head + payload + b"\x7e" + struct.pack(">I", section_id)


def build_blob(sections: list[tuple[str, bytes]]) -> bytes:
    body = b"".join(section(i, name, payload) for i, (name, payload) in enumerate(sections))
    return HEADER + body + b"\x00"


def test_sections_are_listed_in_stream_order() -> None:
    blob = build_blob([("timer", b"\x01\x02"), ("0000:00:03.0/virtio-net", b"x" * 50), ("globalstate", b"")])
    info = parse_blob(blob)
    assert info.sections == (
        Section("timer", 0, 1),
        Section("0000:00:03.0/virtio-net", 0, 1),
        Section("globalstate", 0, 1),
    )
    assert info.size == len(blob)
    check_end(blob)


def test_a_footer_look_alike_inside_a_section_is_walked_past() -> None:
    # Section 0's data holds its own footer followed by something that parses as a header.
    fake = b"\x7e\x00\x00\x00\x00" + section(7, "fake", b"")[:-5]
    blob = build_blob([("first", fake + b"tail"), ("second", b"zz")])
    assert [s.name for s in parse_blob(blob).sections] == ["first", "second"]


def test_every_cut_is_refused() -> None:
    blob = build_blob([("timer", b"\x00" * 20), ("cpu", b"\x7e" * 9), ("serial", b"abc")])
    for cut in range(len(blob)):
        with pytest.raises(BlobFormatError):
            parse_blob(blob[:cut])


def test_a_migration_stream_is_not_a_device_state_blob() -> None:
    stream = HEADER + b"\x07" + struct.pack(">I", 13) + b"pc-i440fx-7.2" + b"\x00"
    with pytest.raises(BlobFormatError, match="no section header"):
        parse_blob(stream)


def test_wrong_magic_or_version_is_refused() -> None:
    blob = build_blob([("timer", b"")])
    with pytest.raises(BlobFormatError, match="magic"):
        parse_blob(b"NOPE" + blob[4:])
    with pytest.raises(BlobFormatError, match="version"):
        parse_blob(blob[:4] + struct.pack(">I", 2) + blob[8:])


def test_check_end_catches_a_cut_at_a_section_boundary() -> None:
    blob = build_blob([("timer", b"abc"), ("cpu", b"def")])
    with pytest.raises(BlobFormatError, match="truncated"):
        check_end(blob[:-1])
    with pytest.raises(BlobFormatError):
        check_end(blob[:-3])


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789./@-_:", min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    sections=st.lists(st.tuples(_names, st.binary(max_size=200)), min_size=1, max_size=12),
    cut=st.integers(min_value=1),
)
def test_round_trip_and_truncation(sections: list[tuple[str, bytes]], cut: int) -> None:
    blob = build_blob(sections)
    assert [s.name for s in parse_blob(blob).sections] == [name for name, _ in sections]
    with pytest.raises(BlobFormatError):
        parse_blob(blob[: len(blob) - 1 - cut % len(blob)])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes) -> None:
    with contextlib.suppress(BlobFormatError):  # anything else escaping fails the test
        parse_blob(data)
    with contextlib.suppress(BlobFormatError):
        parse_blob(HEADER + data)
