"""The outside world of a test guest: receive its numbered UDP and TCP streams, and judge them.

The Linux test guest's ``udp`` workload (``guest_src/agent.c``) sends datagrams of
:data:`DATAGRAM` (``"CUJU"``, version 1, sequence number, guest time, TCP counters sent)
and holds one TCP connection carrying consecutive 64-bit big-endian counters 0, 1, 2, ...
:class:`Observer` receives both on a background thread and records every sequence number
and every TCP chunk with its arrival time (``time.monotonic()``); :meth:`Observer.recording`
hands out an immutable copy. The sockets can be made inside a network namespace
(``netns=``), so the observer sits on the guest's network while this process stays where
it is.

The judges are pure functions over a :class:`Recording`, by the rules of the end-to-end
failover test: UDP numbers never repeat or go backwards (output of lost state never
escaped); at most one gap, no larger than ``max_gap`` numbers, and only at the failover;
the guest still sends after the failover; exactly one TCP connection, never closed, whose
bytes are exactly the counters 0, 1, 2, ... and which carried data after the failover.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from types import TracebackType

from cuju_libvirt.errors import RigError
from cuju_libvirt.rig.guest_net import socket_in

#: magic "CUJU", version, 3 pad bytes, sequence number, guest ns, TCP counters sent (big-endian).
DATAGRAM = struct.Struct(">4sB3xQQQ")
MAGIC = b"CUJU"
VERSION = 1
COUNTER = struct.Struct(">Q")


# -- wire -----------------------------------------------------------------------------------


def decode_datagram(data: bytes) -> tuple[int, int, int] | None:
    """(sequence number, guest ns, TCP counters sent) of a guest datagram, None if it is not one."""
    if len(data) != DATAGRAM.size:
        return None
    magic, version, seq, guest_ns, tcp_counters = DATAGRAM.unpack(data)
    if magic != MAGIC or version != VERSION:
        return None
    return seq, guest_ns, tcp_counters


def encode_datagram(seq: int, guest_ns: int = 0, tcp_counters: int = 0) -> bytes:
    """The datagram the guest would send (for tests of the observer itself)."""
    return DATAGRAM.pack(MAGIC, VERSION, seq, guest_ns, tcp_counters)


#: A pcap record's header (seconds, microseconds, captured length, length), little-endian.
_PCAP_RECORD = struct.Struct("<IIII")
_PCAP_FILE_HEADER = 24


def datagrams_in_dump(data: bytes) -> list[tuple[int, int]]:
    """(sequence number, end offset of its record) of every guest datagram in the pcap file
    ``data`` a QEMU ``filter-dump`` wrote (``maxlen`` large enough for the datagram). The
    offsets order the datagrams as the filter saw them, so a file size noted at a moment
    tells which datagrams had passed by then."""
    found: list[tuple[int, int]] = []
    pos = _PCAP_FILE_HEADER
    while pos + _PCAP_RECORD.size <= len(data):
        _, _, caplen, _ = _PCAP_RECORD.unpack_from(data, pos)
        packet = data[pos + _PCAP_RECORD.size : pos + _PCAP_RECORD.size + caplen]
        pos += _PCAP_RECORD.size + caplen
        at = packet.find(MAGIC)  # the guest's datagram is the UDP payload
        decoded = decode_datagram(packet[at : at + DATAGRAM.size]) if at >= 0 else None
        if decoded is not None:
            found.append((decoded[0], pos))
    return found


def counter_stream(first: int, count: int) -> bytes:
    """``count`` consecutive counters from ``first`` as the guest sends them on TCP."""
    return b"".join(COUNTER.pack(n) for n in range(first, first + count))


# -- recording ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recording:
    """What the observer saw, with arrival times on ``time.monotonic()``.

    ``udp``: (sequence number, arrival) per guest datagram, in arrival order.
    ``tcp_chunks``: (bytes received so far, arrival) per read on the TCP connection.
    ``tcp_closed``: when the (first) connection reached EOF or an error, else None.
    """

    udp: tuple[tuple[int, float], ...] = ()
    udp_foreign: int = 0
    tcp_connections: int = 0
    tcp_data: bytes = b""
    tcp_chunks: tuple[tuple[int, float], ...] = ()
    tcp_closed: float | None = None
    tcp_error: str | None = None


class Observer:
    """Receives a guest's UDP datagrams and its one TCP stream on a background thread.

    ``udp`` and ``tcp`` are (address, port) to bind; port 0 picks a free one (see
    :attr:`udp_address`, :attr:`tcp_address`). ``netns`` names a network namespace
    (``ip netns``) to bind in. Use as a context manager; :meth:`close` stops the thread and
    closes every socket.
    """

    def __init__(
        self, udp: tuple[str, int] | None, tcp: tuple[str, int] | None = None, *, netns: str | None = None
    ) -> None:
        if udp is None and tcp is None:
            raise ValueError("an observer needs a UDP or a TCP address")
        self._lock = threading.Lock()
        self._udp: list[tuple[int, float]] = []
        self._udp_foreign = 0
        self._tcp_connections = 0
        self._tcp_data = bytearray()
        self._tcp_chunks: list[tuple[int, float]] = []
        self._tcp_closed: float | None = None
        self._tcp_error: str | None = None
        self._sockets: list[socket.socket] = []
        self._stream: socket.socket | None = None
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        try:
            self._udp_sock = self._bind(netns, socket.SOCK_DGRAM, udp) if udp else None
            self._tcp_sock = self._bind(netns, socket.SOCK_STREAM, tcp) if tcp else None
        except BaseException:
            self.close()
            raise

    def _bind(self, netns: str | None, kind: socket.SocketKind, address: tuple[str, int]) -> socket.socket:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, kind)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if kind == socket.SOCK_DGRAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                sock.bind(address)
                if kind == socket.SOCK_STREAM:
                    sock.listen(4)
            except BaseException:
                sock.close()
                raise
            return sock

        sock = make() if netns is None else socket_in(netns, make)
        sock.setblocking(False)
        self._sockets.append(sock)
        return sock

    @property
    def udp_address(self) -> tuple[str, int]:
        if self._udp_sock is None:
            raise ValueError("this observer has no UDP socket")
        address: tuple[str, int] = self._udp_sock.getsockname()
        return address

    @property
    def tcp_address(self) -> tuple[str, int]:
        if self._tcp_sock is None:
            raise ValueError("this observer has no TCP socket")
        address: tuple[str, int] = self._tcp_sock.getsockname()
        return address

    def start(self) -> Observer:
        self._thread = threading.Thread(target=self._loop, name="cuju-observer", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> Observer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(timeout=5.0)
            self._thread = None
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1

    def _loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._stop_r, selectors.EVENT_READ, "stop")
            if self._udp_sock is not None:
                sel.register(self._udp_sock, selectors.EVENT_READ, "udp")
            if self._tcp_sock is not None:
                sel.register(self._tcp_sock, selectors.EVENT_READ, "accept")
            while True:
                for key, _ in sel.select():
                    if key.data == "stop":
                        return
                    if key.data == "udp":
                        self._read_udp()
                    elif key.data == "accept":
                        self._accept(sel)
                    elif key.data == "stream" and not self._read_stream():
                        sel.unregister(key.fileobj)

    def _read_udp(self) -> None:
        assert self._udp_sock is not None
        while True:
            try:
                data = self._udp_sock.recv(2048)
            except BlockingIOError:
                return
            arrival = time.monotonic()
            decoded = decode_datagram(data)
            with self._lock:
                if decoded is None:
                    self._udp_foreign += 1
                else:
                    self._udp.append((decoded[0], arrival))

    def _accept(self, sel: selectors.BaseSelector) -> None:
        assert self._tcp_sock is not None
        try:
            conn, _ = self._tcp_sock.accept()
        except BlockingIOError:
            return
        self._sockets.append(conn)
        with self._lock:
            self._tcp_connections += 1
            first = self._tcp_connections == 1
        if first:
            conn.setblocking(False)
            self._stream = conn
            sel.register(conn, selectors.EVENT_READ, "stream")
        # A second connection is recorded (the judge fails it) but not read.

    def _read_stream(self) -> bool:
        assert self._stream is not None
        while True:
            try:
                data = self._stream.recv(65536)
            except BlockingIOError:
                return True
            except OSError as err:
                with self._lock:
                    self._tcp_closed = time.monotonic()
                    self._tcp_error = f"{type(err).__name__}: {err}"
                return False
            now = time.monotonic()
            with self._lock:
                if not data:
                    self._tcp_closed = now
                    return False
                self._tcp_data += data
                self._tcp_chunks.append((len(self._tcp_data), now))

    def recording(self) -> Recording:
        """An immutable copy of everything received so far."""
        with self._lock:
            return Recording(
                udp=tuple(self._udp),
                udp_foreign=self._udp_foreign,
                tcp_connections=self._tcp_connections,
                tcp_data=bytes(self._tcp_data),
                tcp_chunks=tuple(self._tcp_chunks),
                tcp_closed=self._tcp_closed,
                tcp_error=self._tcp_error,
            )

    def wait_for(self, predicate: Callable[[Recording], bool], timeout: float) -> Recording:
        """Poll until ``predicate(recording)`` holds; the last recording either way."""
        deadline = time.monotonic() + timeout
        while True:
            rec = self.recording()
            if predicate(rec) or time.monotonic() >= deadline:
                return rec
            time.sleep(0.02)


# -- judges ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gap:
    """Numbers ``after+1 .. before-1`` never arrived; ``before`` arrived at ``arrival``."""

    after: int
    before: int
    arrival: float
    previous_arrival: float

    @property
    def missing(self) -> int:
        return self.before - self.after - 1


@dataclass(frozen=True)
class Rules:
    """How a run is judged.

    ``max_gap``: the most UDP numbers the one allowed gap may miss (one epoch's packets).
    ``failover_at``: when the primary was killed (``time.monotonic()``), None for a run
    without failover (then no gap is allowed at all). ``tolerance``: how long after
    ``failover_at`` packets of the dead primary may still arrive. ``tcp``: whether the TCP
    stream is part of the run.
    """

    max_gap: int = 0
    failover_at: float | None = None
    tolerance: float = 0.2
    tcp: bool = True


@dataclass(frozen=True)
class Verdict:
    """A judged run: ``ok`` when ``problems`` is empty; the figures the run produced."""

    problems: tuple[str, ...]
    udp_received: int
    udp_first: int | None
    udp_last: int | None
    gaps: tuple[Gap, ...]
    tcp_counters: int
    failover_ms: float | None
    udp_after_failover: int = 0
    tcp_bytes_after_failover: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["ok"] = self.ok
        out["gaps"] = [{"after": g.after, "before": g.before, "missing": g.missing} for g in self.gaps]
        return out


def one_epoch_packets(pps: float, epoch_ms: float) -> int:
    """The most datagrams a failover may lose by the claim: those of one epoch.

    A sender at ``pps`` datagrams per second puts at most ``floor(pps * epoch) + 1`` of them
    into one epoch of ``epoch_ms`` (one may fall on each edge). ``epoch_ms`` is the length
    the epochs really had (at least the configured one: an epoch also waits for its
    predecessor's acknowledgement), e.g. from cujud's ``epochs_per_s``.
    """
    if pps <= 0 or epoch_ms <= 0:
        raise ValueError(f"pps {pps} and epoch_ms {epoch_ms} must be positive")
    return math.floor(pps * epoch_ms / 1000.0) + 1


def epoch_ms_from_rate(configured_ms: float, epochs_per_s: float | None) -> float:
    """The epoch length epochs really had: the configured one, or longer as measured."""
    if epochs_per_s is None or epochs_per_s <= 0:
        return float(configured_ms)
    return max(float(configured_ms), 1000.0 / epochs_per_s)


def udp_gaps(udp: Sequence[tuple[int, float]]) -> tuple[list[Gap], list[str]]:
    """The gaps in the UDP numbers, and one problem line per repeat or step backwards."""
    gaps: list[Gap] = []
    problems: list[str] = []
    for (prev, prev_t), (seq, t) in itertools.pairwise(udp):
        if seq == prev:
            problems.append(f"UDP number {seq} arrived twice (again at t={t:.3f})")
        elif seq < prev:
            problems.append(f"UDP numbers went backwards: {seq} arrived after {prev} (t={t:.3f})")
        elif seq > prev + 1:
            gaps.append(Gap(prev, seq, t, prev_t))
    return gaps, problems


def resume_arrival(udp: Sequence[tuple[int, float]], after: float) -> float | None:
    """Arrival of the first datagram of the resumed guest: the one that ends the longest
    silence after ``after`` (the primary's last released packets may still trickle in just
    after the kill; the backup's first packet follows the failover's silence)."""
    best: tuple[float, float] | None = None
    previous = after
    for _, t in udp:
        if t < after:
            continue
        silence = t - previous
        if best is None or silence > best[0]:
            best = (silence, t)
        previous = t
    return None if best is None else best[1]


def judge_udp(udp: Sequence[tuple[int, float]], rules: Rules) -> tuple[list[str], list[Gap]]:
    """Problems with the UDP numbers (repeats, steps back, gaps out of rule) and the gaps."""
    if not udp:
        return ["no UDP datagram from the guest arrived"], []
    gaps, problems = udp_gaps(udp)
    if rules.failover_at is None:
        problems += [f"UDP numbers {g.after + 1}..{g.before - 1} never arrived (no failover)" for g in gaps]
        return problems, gaps
    if len(gaps) > 1:
        listed = ", ".join(f"{g.after + 1}..{g.before - 1}" for g in gaps)
        problems.append(f"{len(gaps)} gaps in the UDP numbers ({listed}); at most one, at the failover")
    for gap in gaps:
        if gap.missing > rules.max_gap:
            problems.append(
                f"UDP numbers {gap.after + 1}..{gap.before - 1} never arrived: {gap.missing} missing, "
                f"more than one epoch's {rules.max_gap}"
            )
        if gap.arrival < rules.failover_at or gap.previous_arrival > rules.failover_at + rules.tolerance:
            problems.append(
                f"the gap {gap.after + 1}..{gap.before - 1} is not at the failover "
                f"(around t={gap.arrival:.3f}, failover at t={rules.failover_at:.3f})"
            )
    if not any(t >= rules.failover_at for _, t in udp):
        problems.append("no UDP datagram arrived after the failover: the guest did not resume")
    return problems, gaps


def judge_tcp(rec: Recording, rules: Rules) -> tuple[list[str], int]:
    """Problems with the TCP stream and the number of whole counters received."""
    problems: list[str] = []
    if rec.tcp_connections == 0:
        return ["the guest never opened its TCP connection"], 0
    if rec.tcp_connections > 1:
        problems.append(f"{rec.tcp_connections} TCP connections: the stream was re-opened, not continued")
    if rec.tcp_closed is not None:
        how = rec.tcp_error or "end of stream"
        problems.append(f"the TCP connection ended at t={rec.tcp_closed:.3f} ({how})")
    count = len(rec.tcp_data) // COUNTER.size
    for index, (value,) in enumerate(COUNTER.iter_unpack(rec.tcp_data[: count * COUNTER.size])):
        if value != index:
            what = "repeated or went backwards" if value < index else "skipped ahead"
            problems.append(
                f"TCP stream broken at byte {index * COUNTER.size}: counter {value} where {index} was due "
                f"(the stream {what})"
            )
            break
    if count == 0:
        problems.append("the TCP connection carried no counter")
    return problems, count


def judge_run(rec: Recording, rules: Rules) -> Verdict:
    """The verdict on one run by the end-to-end rules (see the module docstring)."""
    problems, gaps = judge_udp(rec.udp, rules)
    notes: list[str] = []
    if rec.udp_foreign:
        notes.append(f"{rec.udp_foreign} datagrams that are not the guest's were ignored")
    tcp_counters = 0
    if rules.tcp:
        tcp_problems, tcp_counters = judge_tcp(rec, rules)
        problems += tcp_problems
    failover_ms = None
    udp_after = tcp_after = 0
    if rules.failover_at is not None:
        resumed = resume_arrival(rec.udp, rules.failover_at)
        if resumed is not None:
            failover_ms = (resumed - rules.failover_at) * 1000.0
        udp_after = sum(1 for _, t in rec.udp if t >= rules.failover_at)
        before = max((n for n, t in rec.tcp_chunks if t < rules.failover_at), default=0)
        tcp_after = len(rec.tcp_data) - before
        if rules.tcp and tcp_after <= 0:
            problems.append("the TCP stream carried nothing after the failover")
    return Verdict(
        problems=tuple(problems),
        udp_received=len(rec.udp),
        udp_first=rec.udp[0][0] if rec.udp else None,
        udp_last=rec.udp[-1][0] if rec.udp else None,
        gaps=tuple(gaps),
        tcp_counters=tcp_counters,
        failover_ms=failover_ms,
        udp_after_failover=udp_after,
        tcp_bytes_after_failover=tcp_after,
        notes=tuple(notes),
    )


# -- command line ---------------------------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not ADDR:PORT")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cuju_libvirt.rig.observer",
        description=(
            "Receive the Linux test guest's numbered UDP datagrams and its TCP counter stream for a "
            "while, then judge them (no repeats, no steps back, no gap, one intact TCP stream) and "
            "print the verdict as JSON. Exit status 0 when the run passes, 1 when it does not."
        ),
    )
    parser.add_argument("--udp", type=_address, metavar="ADDR:PORT", help="where the guest sends UDP")
    parser.add_argument("--tcp", type=_address, metavar="ADDR:PORT", help="where the guest connects")
    parser.add_argument("--netns", help="bind inside this network namespace (ip netns)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to listen (default 10)")
    args = parser.parse_args(argv)
    if args.udp is None:
        parser.error("--udp is required")
    try:
        with Observer(args.udp, args.tcp, netns=args.netns) as obs:
            time.sleep(args.seconds)
            rec = obs.recording()
    except (OSError, RigError) as err:
        print(f"observer: {err}", file=sys.stderr)
        return 2
    verdict = judge_run(rec, Rules(tcp=args.tcp is not None))
    print(json.dumps(verdict.as_dict(), indent=2))
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
