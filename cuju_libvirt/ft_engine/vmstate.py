"""Read just enough of a QEMU migration stream to vet a device-state blob before it is used.

A device-state blob is what ``migrate fd:`` writes for a stopped VM with the
``x-ignore-shared`` capability on: the whole migration stream, minus the pages of shared
RAM blocks. Loading a bad blob into a standby QEMU 7.2 is fatal to that QEMU (a failed
incoming migration exits the process), so the backup checks a blob *before* feeding it:
framing, machine type, the capability that proves RAM was skipped, and the RAM-block list
(compared with the standby by :func:`cuju_libvirt.ft_engine.devstate.check_standby`).

The parts of the stream read here (QEMU ``migration/savevm.c``, ``migration/ram.c``; all
integers big-endian)::

    u32 magic "QEVM"   u32 version (3)
    u8  QEMU_VM_CONFIGURATION (0x07)
        u32 len, machine type (e.g. "pc-i440fx-7.2")
        { u8 QEMU_VM_SUBSECTION (0x05), u8 len, name, u32 version, fields }*
            "configuration/capabilities":    u32 count, { u8 len, capability name }*
            "configuration/target-page-bits": u32
            "configuration/uuid":             16 bytes
    u8  QEMU_VM_SECTION_START (0x01), u32 section id, u8 len, "ram", u32 instance, u32 version
        u64 (total RAM bytes | RAM_SAVE_FLAG_MEM_SIZE 0x04)
        { u8 len, block name, u64 used length, [u64 guest-physical address if x-ignore-shared] }*
    ... device sections (no length prefix: not walked) ...
    u8  QEMU_VM_EOF (0x00)
    u8  QEMU_VM_VMDESCRIPTION (0x06), u32 len, JSON {"page_size": ..., "devices": [...]}

The JSON device description at the very end is what makes truncation detectable: its
declared length must reach exactly the end of the blob. A machine with
``suppress-vmdesc=on`` omits it (~100 KB less to write per save; ``python -m benchmarks
devstate`` measures what that saves); its blobs end with a section footer (``0x7e``, u32 section id) and
``QEMU_VM_EOF``, which is all that can be checked: a cut exactly at a section end goes
unnoticed, so such blobs must travel with their own length and checksum (the data
plane's epoch framing). Pass ``vmdesc=False`` for those.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from cuju_libvirt.errors import ReplicationError

QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 3
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_FOOTER = 0x7E
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
RAM_SAVE_FLAG_MEM_SIZE = 0x04
#: The capability that makes QEMU skip shared RAM blocks; it must be in every blob.
IGNORE_SHARED = "x-ignore-shared"

_VMDESC_START = b'{"page_size":'
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class DeviceStateError(ReplicationError):
    """Saving or loading device state failed, or a blob is unusable.

    ``qemu_message`` carries QEMU's own words when QEMU reported the failure (``None``
    otherwise).
    """

    def __init__(self, message: str, qemu_message: str | None = None) -> None:
        super().__init__(message if qemu_message is None else f"{message}: {qemu_message}")
        self.qemu_message = qemu_message


class BlobFormatError(DeviceStateError):
    """A device-state blob is malformed, truncated, or was saved without ``x-ignore-shared``."""


@dataclass(frozen=True)
class RamBlock:
    """One RAM block as the source listed it: QEMU's block name, used length, address."""

    name: str
    length: int
    #: Guest-physical address (only sent with x-ignore-shared; None otherwise).
    gpa: int | None


@dataclass(frozen=True)
class BlobInfo:
    """What a blob says about the machine that produced it."""

    size: int
    machine_type: str
    capabilities: frozenset[str]
    ram_blocks: tuple[RamBlock, ...]
    #: (device section name, instance id) in stream order, from the trailing description;
    #: empty unless parsed with ``devices=True``.
    devices: tuple[tuple[str, int], ...]
    #: Length of the trailing JSON device description.
    vmdesc_size: int


class _Reader:
    """Bounds-checked big-endian reads over a blob; every overrun is a BlobFormatError."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int, what: str) -> memoryview:
        end = self.pos + count
        if end > len(self.data):
            raise BlobFormatError(
                f"device-state blob truncated: {what} at offset {self.pos} needs {count} bytes, "
                f"the blob has {len(self.data)}"
            )
        piece = self.data[self.pos : end]
        self.pos = end
        return piece

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u32(self, what: str) -> int:
        value: int = _U32.unpack(self.take(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = _U64.unpack(self.take(8, what))[0]
        return value

    def text(self, count: int, what: str) -> str:
        raw = bytes(self.take(count, what))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as err:
            raise BlobFormatError(f"device-state blob: {what} is not ASCII: {raw[:64]!r}") from err


def vmdesc_offset(data: bytes) -> int:
    """Offset of the trailing JSON device description; raises BlobFormatError if it is not whole.

    Cheap (one backward search, no JSON parsing): the primary runs it after every save.
    """
    start = data.rfind(_VMDESC_START)
    if start < 6:
        raise BlobFormatError(
            f"device-state blob of {len(data)} bytes has no device description at its end: it is "
            "truncated (or the machine sets suppress-vmdesc=on: then parse it with vmdesc=False)"
        )
    declared = _U32.unpack_from(data, start - 4)[0]
    present = len(data) - start
    if data[start - 5] != QEMU_VM_VMDESCRIPTION or data[start - 6] != QEMU_VM_EOF or declared != present:
        raise BlobFormatError(
            f"device-state blob of {len(data)} bytes is truncated or corrupt: its device description "
            f"declares {declared} bytes, {present} are present"
        )
    return start


def check_end(data: bytes, *, vmdesc: bool = True) -> int:
    """Check how the blob ends; return where the device sections end (the vmdesc offset, or the size).

    ``vmdesc`` says whether the source machine writes the trailing device description
    (``suppress-vmdesc=off``, the default of every current machine type).
    """
    if vmdesc:
        return vmdesc_offset(data)
    if len(data) < 6 or data[-1] != QEMU_VM_EOF or data[-6] != QEMU_VM_SECTION_FOOTER:
        raise BlobFormatError(
            f"device-state blob of {len(data)} bytes does not end with a section footer and "
            "QEMU_VM_EOF: it is truncated"
        )
    return len(data)


def parse_blob(blob: bytes, *, devices: bool = False, vmdesc: bool = True) -> BlobInfo:
    """Check a device-state blob and return what it says; raise :class:`BlobFormatError` if unusable.

    ``devices`` also parses the trailing JSON device description (a millisecond or so for a
    typical ~100 KB description); framing is always checked. ``vmdesc=False`` for blobs of
    machines with ``suppress-vmdesc=on`` (then ``devices`` stays empty).
    """
    view = memoryview(blob)
    reader = _Reader(view)
    magic = reader.u32("file magic")
    version = reader.u32("file version")
    if magic != QEMU_VM_FILE_MAGIC:
        raise BlobFormatError(f"not a QEMU migration stream: magic {magic:#010x}, expected 'QEVM'")
    if version != QEMU_VM_FILE_VERSION:
        raise BlobFormatError(f"unsupported QEMU migration stream version {version} (expected 3)")
    machine, capabilities = _configuration(reader)
    if IGNORE_SHARED not in capabilities:
        raise BlobFormatError(
            f"device-state blob was saved without {IGNORE_SHARED}: it would carry (or expect) all of "
            "guest RAM; save it with DeviceStateSaver"
        )
    ram_blocks = _ram_section(reader, with_gpa=True)
    desc_at = check_end(blob, vmdesc=vmdesc)
    device_list: tuple[tuple[str, int], ...] = ()
    if devices and vmdesc:
        device_list = _device_list(view[desc_at:])
    return BlobInfo(
        size=len(view),
        machine_type=machine,
        capabilities=capabilities,
        ram_blocks=ram_blocks,
        devices=device_list,
        vmdesc_size=len(view) - desc_at,
    )


def _configuration(reader: _Reader) -> tuple[str, frozenset[str]]:
    marker = reader.u8("configuration marker")
    if marker != QEMU_VM_CONFIGURATION:
        raise BlobFormatError(
            f"device-state blob has no configuration section (byte {marker:#04x}): the machine type "
            "must send it (every pc/q35 type since QEMU 2.9 does)"
        )
    machine = reader.text(reader.u32("machine type length"), "machine type")
    capabilities: set[str] = set()
    while reader.pos < len(reader.data) and reader.data[reader.pos] == QEMU_VM_SUBSECTION:
        reader.pos += 1
        name = reader.text(reader.u8("subsection name length"), "subsection name")
        reader.u32(f"{name} version")
        if name == "configuration/capabilities":
            for index in range(reader.u32("capability count")):
                capabilities.add(reader.text(reader.u8("capability name length"), f"capability {index}"))
        elif name == "configuration/target-page-bits":
            reader.u32("target page bits")
        elif name == "configuration/uuid":
            reader.take(16, "uuid")
        else:
            raise BlobFormatError(f"unknown configuration subsection {name!r}: newer QEMU than this parser")
    return machine, frozenset(capabilities)


def _ram_section(reader: _Reader, *, with_gpa: bool) -> tuple[RamBlock, ...]:
    marker = reader.u8("first section marker")
    reader.u32("section id")
    name = reader.text(reader.u8("section name length"), "section name")
    reader.u32("section instance")
    reader.u32("section version")
    if marker != QEMU_VM_SECTION_START or name != "ram":
        raise BlobFormatError(f"expected the 'ram' section start after the configuration, found {name!r}")
    header = reader.u64("RAM size header")
    if not header & RAM_SAVE_FLAG_MEM_SIZE:
        raise BlobFormatError(f"RAM section does not start with its block list (header {header:#x})")
    total = header & ~0xFFF
    blocks: list[RamBlock] = []
    listed = 0
    while listed < total:
        block = reader.text(reader.u8("RAM block name length"), "RAM block name")
        length = reader.u64(f"RAM block {block} length")
        gpa = reader.u64(f"RAM block {block} address") if with_gpa else None
        blocks.append(RamBlock(block, length, gpa))
        listed += length
    if listed != total:
        raise BlobFormatError(
            f"RAM block list sums to {listed} bytes, the header says {total}: unsupported stream layout "
            "(postcopy or huge pages?)"
        )
    return tuple(blocks)


def _device_list(vmdesc: memoryview) -> tuple[tuple[str, int], ...]:
    try:
        desc = json.loads(bytes(vmdesc))
        entries = [(str(dev["name"]), int(dev["instance_id"])) for dev in desc["devices"]]
    except (ValueError, KeyError, TypeError) as err:
        raise BlobFormatError(f"device description at the end of the blob is not valid: {err}") from err
    return tuple(entries)
