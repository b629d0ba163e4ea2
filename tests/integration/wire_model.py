"""An independent Python model of the wire format of c_ext/wire.h (encoder and receiver).

Written from the header's text, not from the C code: the hostile-peer tests compare
the C receiver's behaviour on arbitrary byte streams with what this model says the
format demands (which epochs are applied, which error ends the session).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cuju_libvirt import _cuju

MAGIC = int.from_bytes(b"CUJU-FT\0", "little")
END_MAGIC = int.from_bytes(b"CUJU-END", "little")
HELLO, HELLO_REPLY, EPOCH, ACK, ERROR, CLOSE = (
    int.from_bytes(t, "little") for t in (b"HELL", b"RPLY", b"POCH", b" ACK", b"ERRR", b"COSE")
)
FULL, ZERO = 0, 1
MAX_DEVSTATE = 256 << 20

# Error codes (wire.h, enum cuju_err)
E_EOF, E_MAGIC, E_VERSION, E_GEOMETRY, E_FRAME, E_INDEX, E_CHECKSUM, E_SEQUENCE, E_PEER = (
    2, 4, 5, 6, 7, 8, 9, 10, 11,
)


def frame_header(ftype: int, length: int, flags: int = 0) -> bytes:
    return struct.pack("<IIQ", ftype, flags, length)


WIRE_VERSION = 2


def hello(
    page_size: int, region_size: int, session: int, version: int = WIRE_VERSION, *, magic: int = MAGIC,
    disks: int = 0,
) -> bytes:
    payload = struct.pack("<QIIQQQ", magic, version, page_size, region_size, session, disks)
    return frame_header(HELLO, 40) + payload


def encode_epoch(
    epoch: int,
    pages: list[tuple[int, bytes | None]],
    device_state: bytes,
    session: int,
    page_size: int = 4096,
) -> bytes:
    """An EPOCH frame: pages as (index, content) with None for a ZERO record."""
    table = b"".join(struct.pack("<Q", i | ((ZERO if d is None else FULL) << 56)) for i, d in pages)
    data = b"".join(d for _, d in pages if d is not None)
    ndata = sum(1 for _, d in pages if d is not None)
    body = struct.pack("<QQQQQ", epoch, len(pages), ndata, len(device_state), 0) + table + data + device_state
    length = len(body) + 24
    head = frame_header(EPOCH, length) + body + struct.pack("<QQ", END_MAGIC, epoch)
    return head + struct.pack("<Q", _cuju.checksum(head, session))


@dataclass
class Outcome:
    applied: list[int] = field(default_factory=list)  # epochs, in order
    region: bytearray = field(default_factory=bytearray)
    device_state: bytes | None = None
    code: int = 0  # 0: ended with CLOSE
    refused: bool = False  # the receiver must answer with an ERROR frame


def receive(stream: bytes, region: bytes, page_size: int, session: int) -> Outcome:
    """What a backup holding epoch 0 must do with ``stream`` (everything after the handshake)."""
    out = Outcome(region=bytearray(region))
    pages = len(region) // page_size
    pos = 0
    last = 0

    def take(n: int) -> bytes | None:
        nonlocal pos
        if len(stream) - pos < n:
            return None
        chunk = stream[pos : pos + n]
        pos += n
        return chunk

    def fail(code: int, refused: bool = True) -> Outcome:
        out.code, out.refused = code, refused
        return out

    while True:
        hdr = take(16)
        if hdr is None:
            return fail(E_EOF, refused=False)
        ftype, flags, length = struct.unpack("<IIQ", hdr)
        if ftype != EPOCH:
            if flags:
                return fail(E_FRAME)
            if ftype == CLOSE and length == 0:
                return out
            if ftype == ERROR and 8 <= length <= 8 + 256:
                return fail(E_PEER, refused=False)  # payload read or not, the peer gave up
            return fail(E_FRAME)
        eh = take(40)
        if eh is None:
            return fail(E_EOF, refused=False)
        epoch, npages, ndata, devlen, disk_len = struct.unpack("<QQQQQ", eh)
        # A backup without replicated disks takes no disk section.
        if flags or disk_len:
            return fail(E_FRAME)
        if npages > pages or ndata > npages or devlen > MAX_DEVSTATE:
            return fail(E_FRAME)
        if length != 40 + 8 * npages + ndata * page_size + devlen + 24:
            return fail(E_FRAME)
        if epoch == 0:
            return fail(E_SEQUENCE)
        if (out.applied and epoch != last + 1) or (not out.applied and epoch < last + 1):
            return fail(E_SEQUENCE)
        table = take(8 * npages)
        if table is None:
            return fail(E_EOF, refused=False)
        records = [struct.unpack_from("<Q", table, 8 * i)[0] for i in range(npages)]
        full = 0
        for rec in records:
            if rec & (0xFF << 48):
                return fail(E_FRAME)
            if rec & ((1 << 48) - 1) >= pages:
                return fail(E_INDEX)
            if rec >> 56 == FULL:
                full += 1
            elif rec >> 56 != ZERO:
                return fail(E_FRAME)
        if full != ndata:
            return fail(E_FRAME)
        rest = take(ndata * page_size + devlen + 24)
        if rest is None:
            return fail(E_EOF, refused=False)
        end_magic, end_epoch, checksum = struct.unpack_from("<QQQ", rest, len(rest) - 24)
        if end_magic != END_MAGIC or end_epoch != epoch:
            return fail(E_FRAME)
        frame = hdr + eh + table + rest
        if _cuju.checksum(frame[:-8], session) != checksum:
            return fail(E_CHECKSUM)
        d = 0
        for rec in records:
            i = rec & ((1 << 48) - 1)
            if rec >> 56 == ZERO:
                out.region[i * page_size : (i + 1) * page_size] = bytes(page_size)
            else:
                out.region[i * page_size : (i + 1) * page_size] = rest[d * page_size : (d + 1) * page_size]
                d += 1
        out.device_state = rest[ndata * page_size : ndata * page_size + devlen]
        out.applied.append(epoch)
        last = epoch
