"""A hostile or broken peer on the FT link: the C decoder against the Python model of wire.h.

Hypothesis generates streams of epochs -- valid ones and ones with a field, an index,
an encoding, a length or a byte gone wrong (with the checksum recomputed, so deeper
checks are reached too) -- and the C receiver must do exactly what the model says:
apply the valid prefix, end the session with the model's error code, answer with an
ERROR frame where the format says so, and never write outside its region (guard
pages on both sides: a stray write kills the test run).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import random
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cuju_libvirt import _cuju
from cuju_libvirt.errors import LinkError, PeerAbortError, ProtocolError, ReplicationError
from cuju_libvirt.ft_engine.replicator import EpochReceiver, EpochSender

from . import wire_model as wm

PAGE = 4096
PAGES = 8
SESSION = 0x1234_5678_9ABC_DEF0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class GuardedRegion:
    """PAGES pages between two PROT_NONE guard pages."""

    def __init__(self, pages: int) -> None:
        self.map = mmap.mmap(-1, (pages + 2) * PAGE)
        anchor = ctypes.c_char.from_buffer(self.map)
        base = ctypes.addressof(anchor)
        del anchor
        for addr in (base, base + (pages + 1) * PAGE):
            if _libc.mprotect(addr, PAGE, 0) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")
        self.view = memoryview(self.map)[PAGE : (pages + 1) * PAGE]

    def close(self) -> None:
        # While an exception is in flight its traceback may still hold the receiver
        # (and so an export of the view): then the mapping goes with the last reference.
        with contextlib.suppress(BufferError):
            self.view.release()
            self.map.close()


@pytest.fixture(scope="module")
def shm_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dataplane-fuzz-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _serve(shm_dir: Path, stream: bytes, initial: bytes) -> tuple[bytes, int, bytes, bytes | None, int]:
    """Run a fresh receiver on ``stream``; return (region, error code, bytes it sent back, state, applied)."""
    for f in shm_dir.iterdir():
        f.unlink()
    region = GuardedRegion(PAGES)
    region.view[:] = initial
    state = shm_dir / "state"
    a, b = socket.socketpair()
    rx = EpochReceiver(region.view, str(state))
    try:
        rx.start(b, io_timeout=5, handshake_timeout=5)
        b.close()
        a.settimeout(5)
        a.sendall(wm.hello(PAGE, PAGES * PAGE, SESSION))
        reply = b""
        while len(reply) < 56:
            chunk = a.recv(56 - len(reply))
            assert chunk, "no HELLO reply"
            reply += chunk
        assert struct.unpack_from("<I", reply)[0] == wm.HELLO_REPLY
        with contextlib.suppress(OSError):  # the receiver may refuse before reading it all
            a.sendall(stream)
        a.shutdown(socket.SHUT_WR)
        back = b""
        with contextlib.suppress(OSError):
            while chunk := a.recv(1 << 16):
                back += chunk
        code = 0
        try:
            assert rx.wait(10) is True
        except ReplicationError as err:
            code = err.code
        rx.close()
        applied = rx.last_applied
        return bytes(region.view), code, back, state.read_bytes() if state.exists() else None, applied
    finally:
        rx.close()
        a.close()
        del rx
        region.close()


def _acks_and_error(back: bytes) -> tuple[list[int], int | None]:
    acks, err, pos = [], None, 0
    while pos + 16 <= len(back):
        ftype, _, length = struct.unpack_from("<IIQ", back, pos)
        payload = back[pos + 16 : pos + 16 + length]
        if ftype == wm.ACK:
            acks.append(struct.unpack("<Q", payload)[0])
        elif ftype == wm.ERROR:
            err = struct.unpack_from("<I", payload)[0]
        pos += 16 + length
    return acks, err


def _random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


page_content = st.one_of(
    st.none(), st.integers(0, 2**32).map(lambda s: _random_bytes(s, PAGE)), st.just(b"\x07" * PAGE)
)
initial_region = st.integers(0, 2**32).map(lambda s: _random_bytes(s, PAGES * PAGE))


@st.composite
def epochs(draw: st.DrawFn) -> bytes:
    """One or more frames: valid epochs, then maybe one damaged in a chosen way."""
    out = b""
    first = draw(st.integers(1, 3))
    count = draw(st.integers(1, 3))
    for n in range(count):
        epoch = first + n
        pages = draw(st.lists(st.tuples(st.integers(0, PAGES - 1), page_content), max_size=6))
        dev = draw(st.binary(max_size=64))
        frame = bytearray(wm.encode_epoch(epoch, pages, dev, SESSION))
        mutation = draw(st.sampled_from(["none", "none", "flip", "truncate", "field", "index", "encoding"]))
        if mutation == "flip":
            pos = draw(st.integers(0, len(frame) - 1))
            frame[pos] ^= draw(st.integers(1, 255))
        elif mutation == "truncate":
            frame = frame[: draw(st.integers(0, len(frame) - 1))]
        elif mutation in ("field", "index", "encoding"):
            if mutation == "field":
                # type, flags, length, epoch, npages, ndata, devlen, disk_len
                off = draw(st.sampled_from([0, 4, 8, 16, 24, 32, 40, 48]))
                width = 4 if off < 8 else 8
                ones = (1 << (8 * width)) - 1
                value = draw(st.one_of(st.integers(0, 2**16), st.just(ones), st.integers(0, 2**63)))
                value &= (1 << (8 * width)) - 1
                frame[off : off + width] = value.to_bytes(width, "little")
            elif pages:
                rec = draw(st.integers(0, len(pages) - 1))
                off = 56 + 8 * rec
                old = struct.unpack_from("<Q", frame, off)[0]
                if mutation == "index":
                    new = (old & ~((1 << 48) - 1)) | draw(st.integers(PAGES, (1 << 48) - 1))
                else:
                    new = (old & ((1 << 48) - 1)) | (draw(st.integers(2, 255)) << 56)
                struct.pack_into("<Q", frame, off, new)
            if draw(st.booleans()) and len(frame) >= 8:  # re-seal so the deeper checks decide
                frame[-8:] = _cuju.checksum(bytes(frame[:-8]), SESSION).to_bytes(8, "little")
        out += bytes(frame)
        if mutation != "none":
            break
    if draw(st.booleans()):
        out += wm.frame_header(wm.CLOSE, 0)
    return out


@pytest.mark.timeout(120)
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=epochs(), initial=initial_region)
def test_receiver_matches_the_wire_model(shm_dir: Path, stream: bytes, initial: bytes) -> None:
    want = wm.receive(stream, initial, PAGE, SESSION)
    event(f"code {want.code}, {len(want.applied)} applied")
    region, code, back, state, applied = _serve(shm_dir, stream, initial)
    acks, err = _acks_and_error(back)
    assert code == want.code
    assert acks == want.applied
    assert applied == (want.applied[-1] if want.applied else 0)
    assert region == bytes(want.region), "region differs from the model"
    if want.applied:
        assert state == want.device_state
    assert err == (want.code if want.refused else None)


@pytest.mark.timeout(60)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(min_size=0, max_size=300))
def test_receiver_survives_arbitrary_bytes_after_hello(shm_dir: Path, junk: bytes) -> None:
    initial = bytes(PAGES * PAGE)
    want = wm.receive(junk, initial, PAGE, SESSION)
    region, code, _, _, _ = _serve(shm_dir, junk, initial)
    assert code == want.code
    assert region == initial  # random bytes never pass the checksum


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("hello", "code"),
    [
        (wm.hello(PAGE, PAGES * PAGE, SESSION, magic=0xDEADBEEF), wm.E_MAGIC),
        (wm.hello(PAGE, PAGES * PAGE, SESSION, version=wm.WIRE_VERSION + 1), wm.E_VERSION),
        (wm.hello(PAGE, PAGES * PAGE, SESSION, version=0), wm.E_VERSION),
        (wm.hello(8192, PAGES * PAGE, SESSION), wm.E_GEOMETRY),
        (wm.hello(PAGE, 2 * PAGES * PAGE, SESSION), wm.E_GEOMETRY),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(40), wm.E_MAGIC),
        (wm.frame_header(wm.HELLO, 1 << 40) + bytes(40), wm.E_FRAME),
    ],
)
def test_handshake_refuses_wrong_peers(shm_dir: Path, hello: bytes, code: int) -> None:
    region = GuardedRegion(PAGES)
    a, b = socket.socketpair()
    rx = EpochReceiver(region.view, str(shm_dir / "hs-state"), str(shm_dir / "hs-journal"))
    try:
        rx.start(b, handshake_timeout=5)
        b.close()
        a.sendall(hello)
        a.settimeout(5)
        back = b""
        while chunk := a.recv(4096):
            back += chunk
        _, err = _acks_and_error(back)
        assert err == code
        with pytest.raises(ProtocolError) as info:
            rx.wait(5)
        assert info.value.code == code
        assert rx.last_applied == 0
    finally:
        rx.close()
        a.close()
        del rx
        region.close()
        for f in shm_dir.iterdir():
            f.unlink()


def _fake_backup(reply: bytes) -> tuple[EpochSender, socket.socket, mmap.mmap]:
    region = mmap.mmap(-1, PAGES * PAGE)
    a, b = socket.socketpair()
    tx = EpochSender(a, region, session_id=SESSION)
    a.close()
    b.settimeout(5)
    b.sendall(reply)
    return tx, b, region


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("reply", "exc", "code"),
    [
        (wm.frame_header(wm.HELLO_REPLY, 40) + struct.pack("<QIIQQQ", 1, 1, PAGE, PAGES * PAGE, SESSION, 0),
         ProtocolError, wm.E_MAGIC),
        (wm.frame_header(wm.HELLO_REPLY, 40)
         + struct.pack("<QIIQQQ", wm.MAGIC, 9, PAGE, PAGES * PAGE, SESSION, 0),
         ProtocolError, wm.E_VERSION),
        (wm.frame_header(wm.HELLO_REPLY, 40)
         + struct.pack("<QIIQQQ", wm.MAGIC, wm.WIRE_VERSION, PAGE, PAGE, SESSION, 0),
         ProtocolError, wm.E_GEOMETRY),
        (wm.frame_header(wm.ACK, 8) + bytes(8), ProtocolError, wm.E_FRAME),
        (wm.frame_header(wm.ERROR, 8 + 5) + struct.pack("<II", 6, 5) + b"nope!", PeerAbortError, wm.E_PEER),
        (b"", LinkError, wm.E_EOF),
    ],
)
def test_sender_refuses_wrong_backups(reply: bytes, exc: type[ReplicationError], code: int) -> None:
    tx, b, region = _fake_backup(reply)
    try:
        b.shutdown(socket.SHUT_WR)
        with pytest.raises(exc) as info:
            tx.handshake(5)
        assert info.value.code == code
    finally:
        tx.close(orderly=False)
        b.close()
        del tx
        with contextlib.suppress(BufferError):  # see GuardedRegion.close
            region.close()


@pytest.mark.timeout(30)
def test_sender_refuses_an_ack_for_an_epoch_never_sent() -> None:
    reply = wm.frame_header(wm.HELLO_REPLY, 40) + struct.pack(
        "<QIIQQQ", wm.MAGIC, wm.WIRE_VERSION, PAGE, PAGES * PAGE, SESSION, 0
    )
    tx, b, region = _fake_backup(reply)
    try:
        assert tx.handshake(5) == 0
        b.sendall(wm.frame_header(wm.ACK, 8) + struct.pack("<Q", 7))
        with pytest.raises(ProtocolError) as info:
            tx.wait_ack(7, 5)
        assert info.value.code == wm.E_SEQUENCE
    finally:
        tx.close(orderly=False)
        b.close()
        del tx
        with contextlib.suppress(BufferError):  # see GuardedRegion.close
            region.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("numbers", "applied"), [((1, 3), [1]), ((2, 2), [2]), ((5, 4), [5])])
def test_receiver_refuses_epochs_out_of_sequence(
    shm_dir: Path, numbers: tuple[int, int], applied: list[int]
) -> None:
    initial = bytes(PAGES * PAGE)
    stream = b"".join(wm.encode_epoch(n, [(n % PAGES, b"\x01" * PAGE)], b"s", SESSION) for n in numbers)
    want = wm.receive(stream, initial, PAGE, SESSION)
    assert want.code == wm.E_SEQUENCE and want.applied == applied
    region, code, back, _, last = _serve(shm_dir, stream, initial)
    assert code == wm.E_SEQUENCE
    assert _acks_and_error(back) == (applied, wm.E_SEQUENCE)
    assert last == applied[-1]
    assert region == bytes(want.region)
