"""Read just enough of a QEMU device-state blob to vet it before it is used.

A device-state blob is what ``xen-save-devices-state`` writes for a stopped VM: every
savevm section that is not RAM, nothing of QEMU's migration machinery (no configuration
section, no RAM section, no trailing JSON description). Loading a bad blob into a standby
QEMU 7.2 is fatal to that QEMU (a failed incoming migration exits the process), so the
backup checks a blob *before* feeding it: the framing, and the list of device sections,
which must be exactly the standby's (an unknown or missing section is what makes QEMU's
load fail; see :func:`cuju_libvirt.ft_engine.devstate.check_standby`).

The layout (QEMU ``migration/savevm.c`` ``qemu_save_device_state``; integers big-endian)::

    u32 magic "QEVM"   u32 version (3)
    { u8  QEMU_VM_SECTION_FULL (0x04), u32 section id, u8 len, idstr, u32 instance id,
          u32 version id,
          fields ... (no length prefix),
      u8  QEMU_VM_SECTION_FOOTER (0x7e), u32 section id }*
    u8  QEMU_VM_EOF (0x00)

Sections carry no length, so they are walked by their footers: a section ends at the first
``0x7e <its id>`` that is followed by either a valid section header or the final
``QEMU_VM_EOF``. Every machine type since QEMU 2.4 sends footers
(``migration.send-section-footer``); without them a blob is refused. A blob cut anywhere
fails the walk: its last byte must be ``QEMU_VM_EOF`` right after a footer. The data
plane's epoch framing (length and checksum) is the first line of defence; this is the second.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from cuju_libvirt.errors import ReplicationError

QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 3
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_SECTION_FOOTER = 0x7E
#: What the standby appends after the blob: an empty JSON device description, so that a
#: QEMU that expects one after QEMU_VM_EOF (``suppress-vmdesc=off``) finds it and stays quiet.
EMPTY_VMDESC = bytes([QEMU_VM_VMDESCRIPTION]) + struct.pack(">I", 2) + b"{}"

_U32 = struct.Struct(">I")
_HEADER = struct.Struct(">BIB")  # section type, section id, idstr length
_IDS = struct.Struct(">II")  # instance id, version id
#: Sanity bounds for a section header found after a footer (QEMU's real values are tiny).
_MAX_INSTANCE = 1 << 20
_MAX_VERSION = 1 << 16
#: Footer searches one walk may take before the blob counts as corrupt.
_MAX_STEPS = 100_000


class DeviceStateError(ReplicationError):
    """Saving or loading device state failed, or a blob is unusable.

    ``qemu_message`` carries QEMU's own words when QEMU reported the failure (``None``
    otherwise).
    """

    def __init__(self, message: str, qemu_message: str | None = None) -> None:
        super().__init__(message if qemu_message is None else f"{message}: {qemu_message}")
        self.qemu_message = qemu_message


class BlobFormatError(DeviceStateError):
    """A device-state blob is malformed or truncated."""


@dataclass(frozen=True)
class Section:
    """One device section: QEMU's idstr (e.g. ``0000:00:03.0/virtio-net``), instance, version."""

    name: str
    instance: int
    version: int

    def __str__(self) -> str:
        return f"{self.name}[{self.instance}] v{self.version}"


@dataclass(frozen=True)
class BlobInfo:
    """What a blob says about the machine that produced it."""

    size: int
    #: The device sections in stream order.
    sections: tuple[Section, ...]


def _header(data: bytes, at: int) -> tuple[int, Section, int] | None:
    """The section header at ``at`` as (section id, section, end offset), or None if not one."""
    if at + _HEADER.size > len(data):
        return None
    kind, section_id, length = _HEADER.unpack_from(data, at)
    name_at = at + _HEADER.size
    end = name_at + length + _IDS.size
    if kind != QEMU_VM_SECTION_FULL or length == 0 or end > len(data):
        return None
    raw = data[name_at : name_at + length]
    if not all(0x20 < byte < 0x7F for byte in raw):
        return None
    instance, version = _IDS.unpack_from(data, name_at + length)
    if instance >= _MAX_INSTANCE or version >= _MAX_VERSION:
        return None
    return section_id, Section(raw.decode("ascii"), instance, version), end


def parse_blob(blob: bytes) -> BlobInfo:
    """Walk a device-state blob; return its sections or raise :class:`BlobFormatError`."""
    data = bytes(blob)
    if len(data) < 9:
        raise BlobFormatError(f"device-state blob of {len(data)} bytes is truncated (no header)")
    magic, version = struct.unpack_from(">II", data)
    if magic != QEMU_VM_FILE_MAGIC:
        raise BlobFormatError(f"not a QEMU device-state stream: magic {magic:#010x}, expected 'QEVM'")
    if version != QEMU_VM_FILE_VERSION:
        raise BlobFormatError(f"unsupported QEMU device-state stream version {version} (expected 3)")
    last = len(data) - 1
    if data[last] != QEMU_VM_EOF:
        raise BlobFormatError(
            f"device-state blob of {len(data)} bytes does not end with QEMU_VM_EOF: it is truncated"
        )
    if last == 8:
        return BlobInfo(len(data), ())
    first = _header(data, 8)
    if first is None:
        raise BlobFormatError(
            "device-state blob: no section header at offset 8 (a migration stream? save it with "
            "DeviceStateSaver)"
        )
    return BlobInfo(len(data), _walk(data, first))


def _walk(data: bytes, first: tuple[int, Section, int]) -> tuple[Section, ...]:
    """The sections from ``first`` on, split at footers that lead on to the final EOF.

    Depth-first: a footer-like byte sequence inside a section's data is taken for its end
    only if everything after it also walks to the end; otherwise the next one is tried.
    """
    last = len(data) - 1
    # One frame per section being walked: [section id, section, where to look for its footer].
    frames: list[list[Any]] = [[first[0], first[1], first[2]]]
    budget = _MAX_STEPS
    while frames:
        budget -= 1
        if budget < 0:
            break
        frame = frames[-1]
        section_id, _section, search = frame
        hit = data.find(bytes([QEMU_VM_SECTION_FOOTER]) + _U32.pack(section_id), search)
        if hit < 0:
            frames.pop()  # this split led nowhere: the section before it ends later
            continue
        frame[2] = hit + 1
        after = hit + 5
        if after == last:
            return tuple(f[1] for f in frames)
        following = _header(data, after)
        if following is not None:
            frames.append([following[0], following[1], following[2]])
    raise BlobFormatError(
        f"device-state blob of {len(data)} bytes does not split into sections ending at QEMU_VM_EOF: "
        f"truncated or corrupt after section {first[1]}, or the machine sends no section footers"
    )


def check_end(blob: bytes) -> None:
    """The cheap check the primary runs after every save: magic and the final footer + EOF."""
    if (
        len(blob) < 14
        or _U32.unpack_from(blob)[0] != QEMU_VM_FILE_MAGIC
        or blob[-1] != QEMU_VM_EOF
        or blob[-6] != QEMU_VM_SECTION_FOOTER
    ):
        raise BlobFormatError(
            f"device-state blob of {len(blob)} bytes does not start with 'QEVM' or does not end with a "
            "section footer and QEMU_VM_EOF: it is truncated"
        )
