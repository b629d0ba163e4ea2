"""Helpers that more than one test module needs: polling, and a TCP relay with faults."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cuju_libvirt.rig.guests import read_counter
from cuju_libvirt.rig.qemu_direct import DirectGuest


def wait_for(cond: Callable[[], object], timeout: float) -> bool:
    """Poll ``cond`` every 10 ms: True as soon as it is truthy, False once ``timeout`` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def wait_counter_above(guest: DirectGuest, value: int, timeout: float = 10.0) -> int:
    """The boot-sector guest's counter (read from its RAM file) once it exceeds ``value``."""
    deadline = time.monotonic() + timeout
    while (current := read_counter(guest.ram_path)) <= value:
        assert time.monotonic() < deadline, f"counter stuck at {current}"
        time.sleep(0.01)
    return current


def proc_status_field(pid: int, key: str, index: int = 0) -> int:
    """The ``index``-th number on the ``key:`` line of /proc/PID/status (e.g. TracerPid, Uid)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1 + index])
    raise AssertionError(f"no {key} line")


class Fault:
    """What a :class:`Relay` does to the client->server stream: ``apply(offset, chunk)``
    returns the bytes to forward in its place and whether to keep relaying (False: cut)."""

    def apply(self, offset: int, chunk: bytes) -> tuple[bytes, bool]:
        return chunk, True


@dataclass
class CutAt(Fault):
    """Forward the first ``at`` bytes, then cut the connection (a truncated stream)."""

    at: int

    def apply(self, offset: int, chunk: bytes) -> tuple[bytes, bool]:
        if offset + len(chunk) >= self.at:
            return chunk[: self.at - offset], False
        return chunk, True


@dataclass
class FlipAt(Fault):
    """XOR ``mask`` into the byte at offset ``at`` (once)."""

    at: int
    mask: int = 0x5A

    def apply(self, offset: int, chunk: bytes) -> tuple[bytes, bool]:
        if offset <= self.at < offset + len(chunk):
            buf = bytearray(chunk)
            buf[self.at - offset] ^= self.mask
            return bytes(buf), True
        return chunk, True


@dataclass
class ReplayAfter(Fault):
    """Once ``at`` bytes went by, send the chunk before again (whole records replayed)."""

    at: int
    _last: bytes = b""
    _done: bool = False

    def apply(self, offset: int, chunk: bytes) -> tuple[bytes, bool]:
        out = chunk
        if not self._done and offset + len(chunk) >= self.at and self._last:
            out, self._done = chunk + self._last, True
        self._last = chunk
        return out, True


@dataclass
class InjectAfter(Fault):
    """Once ``at`` bytes went by, insert ``data``."""

    at: int
    data: bytes = bytes(range(256)) + b"\x07" * 44
    _done: bool = False

    def apply(self, offset: int, chunk: bytes) -> tuple[bytes, bool]:
        if not self._done and offset + len(chunk) >= self.at:
            self._done = True
            return chunk + self.data, True
        return chunk, True


@dataclass
class SwapAfter(Fault):
    """Once ``at`` bytes went by, hold a chunk back and send it after the next (reordered)."""

    at: int
    _held: bytes | None = None
    _done: bool = False

    def apply(self, offset: int, chunk: bytes) -> tuple[bytes, bool]:
        if self._held is not None:
            out, self._held, self._done = chunk + self._held, None, True
            return out, True
        if not self._done and offset + len(chunk) >= self.at:
            self._held = chunk
            return b"", True
        return chunk, True


class Relay:
    """A man in the middle on loopback for one TCP connection: forwards both directions,
    records every byte (``captured``) and applies ``fault`` to the client->server stream.
    ``fault`` may be set while the relay runs; ``upstream`` counts the client's bytes so far."""

    def __init__(self, target: tuple[str, int], fault: Fault | None = None) -> None:
        self.target = target
        self.fault = fault
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.listener.getsockname()
        self.port = self.address[1]
        self.captured = bytearray()
        self.upstream = 0
        self.lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, name="test-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.target)
        except OSError:
            return
        self._socks += [client, server]
        back = threading.Thread(target=self._pump, args=(server, client, False), daemon=True)
        back.start()
        self._pump(client, server, True)
        back.join()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                go_on = True
                with self.lock:
                    self.captured += data
                    if upstream:
                        if self.fault is not None:
                            data, go_on = self.fault.apply(self.upstream, data)
                        self.upstream += len(data)
                dst.sendall(data)
                if not go_on:
                    break
        except OSError:
            pass
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        for s in self._socks:
            s.close()
        self._thread.join(5)
