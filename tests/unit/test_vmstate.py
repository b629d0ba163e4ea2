"""The device-state blob parser against streams built here from the layout in vmstate.py's docstring.

Real QEMU blobs are checked in tests/integration/test_devstate.py; here every field is chosen,
so each check of the parser can be made to fail on purpose.
"""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuju_libvirt.ft_engine.vmstate import (
    IGNORE_SHARED,
    BlobFormatError,
    RamBlock,
    check_end,
    parse_blob,
)


def _str8(text: str) -> bytes:
    raw = text.encode()
    return bytes([len(raw)]) + raw


def build_blob(
    *,
    machine: str = "pc-i440fx-7.2",
    capabilities: tuple[str, ...] = (IGNORE_SHARED,),
    blocks: tuple[tuple[str, int, int], ...] = (("pc.ram", 1 << 24, 0), ("pc.bios", 1 << 18, 0xFFFC0000)),
    devices: tuple[tuple[str, int], ...] = (("timer", 0), ("serial", 0)),
    payload: bytes = b"\x04device-bytes\x7e\x00\x00\x00\x03",
    vmdesc: bool = True,
    extra_subsections: bytes = b"",
) -> bytes:
    out = struct.pack(">II", 0x5145564D, 3)
    out += b"\x07" + struct.pack(">I", len(machine)) + machine.encode()
    if capabilities:
        out += b"\x05" + _str8("configuration/capabilities") + struct.pack(">II", 1, len(capabilities))
        out += b"".join(_str8(cap) for cap in capabilities)
    out += extra_subsections
    total = sum(length for _, length, _ in blocks)
    out += b"\x01" + struct.pack(">I", 2) + _str8("ram") + struct.pack(">II", 0, 4)
    out += struct.pack(">Q", total | 0x04)
    for name, length, gpa in blocks:
        out += _str8(name) + struct.pack(">QQ", length, gpa)
    out += struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", 2)  # RAM_SAVE_FLAG_EOS, footer
    out += payload
    out += b"\x00"  # QEMU_VM_EOF
    if vmdesc:
        desc = json.dumps(
            {"page_size": 4096, "devices": [{"name": n, "instance_id": i} for n, i in devices]},
            separators=(",", ":"),
        ).encode()
        out += b"\x06" + struct.pack(">I", len(desc)) + desc
    return out


def test_a_well_formed_blob_is_read_back() -> None:
    blob = build_blob()
    info = parse_blob(blob, devices=True)
    assert info.machine_type == "pc-i440fx-7.2"
    assert info.capabilities == {IGNORE_SHARED}
    assert info.ram_blocks == (RamBlock("pc.ram", 1 << 24, 0), RamBlock("pc.bios", 1 << 18, 0xFFFC0000))
    assert info.devices == (("timer", 0), ("serial", 0))
    assert info.size == len(blob)
    assert parse_blob(blob).devices == ()  # only parsed on request


def test_every_strict_prefix_is_refused() -> None:
    blob = build_blob()
    for cut in range(len(blob)):
        with pytest.raises(BlobFormatError):
            parse_blob(blob[:cut])


def test_a_blob_saved_without_ignore_shared_is_refused() -> None:
    with pytest.raises(BlobFormatError, match=IGNORE_SHARED):
        parse_blob(build_blob(capabilities=()))


def test_a_stream_that_is_not_qemus_is_refused() -> None:
    with pytest.raises(BlobFormatError, match="magic"):
        parse_blob(b"NOPE" + build_blob()[4:])
    with pytest.raises(BlobFormatError, match="version"):
        parse_blob(build_blob()[:4] + struct.pack(">I", 2) + build_blob()[8:])


def test_an_unknown_configuration_subsection_is_refused_by_name() -> None:
    extra = b"\x05" + _str8("configuration/new-thing") + struct.pack(">I", 1) + b"\x00" * 4
    with pytest.raises(BlobFormatError, match="new-thing"):
        parse_blob(build_blob(extra_subsections=extra))


def test_known_configuration_subsections_are_skipped() -> None:
    extra = b"\x05" + _str8("configuration/target-page-bits") + struct.pack(">II", 1, 12)
    extra += b"\x05" + _str8("configuration/uuid") + struct.pack(">I", 1) + bytes(range(16))
    assert parse_blob(build_blob(extra_subsections=extra)).machine_type == "pc-i440fx-7.2"


def test_a_ram_block_list_that_does_not_add_up_is_refused() -> None:
    blob = bytearray(build_blob(blocks=(("pc.ram", 1 << 24, 0),)))
    at = blob.index(b"\x06pc.ram") + 7
    blob[at : at + 8] = struct.pack(">Q", (1 << 24) + 4096)
    with pytest.raises(BlobFormatError, match="sums to"):
        parse_blob(bytes(blob))


def test_a_damaged_device_description_is_refused() -> None:
    blob = bytearray(build_blob())
    blob[-3] = ord("#")
    with pytest.raises(BlobFormatError, match="not valid"):
        parse_blob(bytes(blob), devices=True)


def test_blobs_without_vmdesc_need_the_flag_and_their_end_is_checked() -> None:
    blob = build_blob(vmdesc=False)
    with pytest.raises(BlobFormatError, match="no device description"):
        parse_blob(blob)
    assert parse_blob(blob, vmdesc=False).vmdesc_size == 0
    with pytest.raises(BlobFormatError, match="truncated"):
        check_end(blob[:-3], vmdesc=False)
    with pytest.raises(BlobFormatError, match="truncated"):
        check_end(build_blob(), vmdesc=False)  # ends in the JSON description, not in QEMU_VM_EOF


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789./@-_", min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(
    machine=_names,
    blocks=st.lists(
        st.tuples(_names, st.integers(1, 1 << 20).map(lambda n: n * 4096), st.integers(0, (1 << 52) - 1)),
        min_size=1,
        max_size=8,
    ),
    devices=st.lists(st.tuples(_names, st.integers(0, 1 << 31)), max_size=20),
    payload=st.binary(max_size=300),
    cut=st.integers(min_value=1),
)
def test_round_trip_and_truncation(
    machine: str,
    blocks: list[tuple[str, int, int]],
    devices: list[tuple[str, int]],
    payload: bytes,
    cut: int,
) -> None:
    blob = build_blob(machine=machine, blocks=tuple(blocks), devices=tuple(devices), payload=payload)
    info = parse_blob(blob, devices=True)
    assert info.machine_type == machine
    assert [(b.name, b.length, b.gpa) for b in info.ram_blocks] == blocks
    assert list(info.devices) == devices
    with pytest.raises(BlobFormatError):
        parse_blob(blob[: len(blob) - 1 - cut % len(blob)])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes) -> None:
    with contextlib.suppress(BlobFormatError):  # anything else escaping fails the test
        parse_blob(data, devices=True)
