"""An eavesdropper on the rig's wires: every frame of a node's interfaces, read with a raw
packet socket inside the node's network namespace, then the TCP streams put back together
and searched for what must not be readable (guest memory, tokens, keys).

    with Tap(rig.lan, tmp_path / "lan.cap") as lan, Tap(rig.b, tmp_path / "ft.cap", [FT_IFACE]):
        ...                                              # pairing, initial sync, epochs
    seen = read_capture(tmp_path / "lan.cap", {"marker": marker})
    assert not seen.hits and seen.tcp_bytes(7790) > 0

The capture runs as a small Python program inside the node (:data:`CAPTURE`, an
``AF_PACKET`` socket of all protocols, with a large receive buffer) and writes each frame
to a file opened outside, until it is stopped; it reports the kernel's count of frames it
had to drop. :func:`read_capture` searches each frame as it is and each TCP stream as its
reader would see it: segments ordered by sequence number, seen twice (several interfaces
of one path) or retransmitted only once, so a needle split across segments is found too.
"""

from __future__ import annotations

import contextlib
import json
import select
import signal
import struct
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from cuju_libvirt.errors import RigError
from cuju_libvirt.rig.nodes import NamespaceNode

__all__ = ["CAPTURE", "Capture", "Tap", "read_capture"]

#: Runs inside the node: ``CAPTURE IFACE...`` (no interface: all of them). Writes each frame
#: as ``u32 length, u8 interface-name length, name, frame`` (little-endian) to stdout, says
#: ``ready`` on stderr once the socket is bound, and on SIGTERM stops and prints one JSON line
#: on stderr: frames, bytes, the kernel's drops and truncated frames.
CAPTURE = """
import json, select, signal, socket, struct, sys
wanted = set(sys.argv[1:])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
try:
    s.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE (root): room for bursts
except OSError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 20)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
out = sys.stdout.buffer
frames = nbytes = truncated = drops = 0
buf = bytearray(1 << 18)
sys.stderr.write("ready\\n"); sys.stderr.flush()
def stats():
    return struct.unpack("II", s.getsockopt(263, 6, 8))  # SOL_PACKET, PACKET_STATISTICS
while not stop:
    try:
        ready, _, _ = select.select([s], [], [], 0.2)
    except InterruptedError:
        continue
    while ready:
        try:
            n, addr = s.recvfrom_into(buf, 0, socket.MSG_DONTWAIT | socket.MSG_TRUNC)
        except BlockingIOError:
            break
        if wanted and addr[0] not in wanted:
            continue
        if n > len(buf):
            truncated += 1
            n = len(buf)
        name = addr[0].encode()
        out.write(struct.pack("<IB", n, len(name)) + name)
        out.write(buf[:n])
        frames += 1
        nbytes += n
drops = stats()[1]
out.flush()
sys.stderr.write(json.dumps({"frames": frames, "bytes": nbytes, "drops": drops,
                             "truncated": truncated}) + "\\n")
"""


class Tap:
    """:data:`CAPTURE` inside ``node`` on ``ifaces`` (default: every interface), into ``out``."""

    def __init__(self, node: NamespaceNode, out: Path, ifaces: Sequence[str] = ()) -> None:
        self.node, self.out, self.ifaces = node, out, tuple(ifaces)
        self.proc: subprocess.Popen[bytes] | None = None
        #: What the capture said when it stopped (frames, bytes, drops, truncated).
        self.stats: dict[str, int] = {}

    def start(self, timeout: float = 30.0) -> Tap:
        with open(self.out, "wb") as sink:
            self.proc = self.node.popen([sys.executable, "-c", CAPTURE, *self.ifaces],
                                        stdout=sink, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        ready, _, _ = select.select([self.proc.stderr], [], [], timeout)
        said = self.proc.stderr.readline().decode(errors="replace").strip() if ready else ""
        if said != "ready":
            self.stop()
            raise RigError(f"the capture on {self.ifaces or 'all interfaces'} did not start: {said!r}")
        return self

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        """Stop the capture (everything read so far is in ``out``); its statistics."""
        proc, self.proc = self.proc, None
        if proc is None:
            return self.stats
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        lines = err.decode(errors="replace").strip().splitlines()
        with contextlib.suppress(ValueError, IndexError):
            self.stats = {k: int(v) for k, v in json.loads(lines[-1]).items()}
        if not self.stats:
            raise RigError(f"the capture ended without its statistics: {lines[-3:]}")
        return self.stats

    def __enter__(self) -> Tap:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None:
            with contextlib.suppress(RigError):
                self.stop()


Flow = tuple[str, int, str, int]


@dataclass
class Capture:
    """What a capture holds: frame and byte counts, each TCP stream's payload, and where
    each needle was found (``"frame"`` or a stream such as ``"198.18.0.1:40000 -> 198.18.0.2:7791"``)."""

    frames: int = 0
    bytes: int = 0
    streams: dict[Flow, int] = field(default_factory=dict)
    #: Stream bytes the capture did not see (holes between the segments it read).
    missing: int = 0
    hits: dict[str, list[str]] = field(default_factory=dict)

    def tcp_bytes(self, port: int) -> int:
        """TCP payload bytes of every stream from or to ``port`` (each byte counted once)."""
        return sum(n for (_, sport, _, dport), n in self.streams.items() if port in (sport, dport))


def _frames(path: Path) -> Iterator[memoryview]:
    data = memoryview(path.read_bytes())
    pos = 0
    while pos + 5 <= len(data):
        length, name_len = struct.unpack_from("<IB", data, pos)
        pos += 5 + name_len
        yield data[pos:pos + length]
        pos += length


def _tcp_segment(frame: memoryview) -> tuple[Flow, int, int, memoryview] | None:
    """(flow, sequence number, TCP flags, payload) of an Ethernet/IPv4/TCP frame, else None."""
    if len(frame) < 14 + 20 or bytes(frame[12:14]) != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack_from("!H", ip, 2)[0] or len(ip)  # 0: a GSO frame before segmentation
    if ip[0] >> 4 != 4 or ip[9] != 6 or len(ip) < ihl + 20:
        return None
    tcp = ip[ihl:min(total, len(ip))]
    sport, dport, seq = struct.unpack_from("!HHI", tcp, 0)
    offset = (tcp[12] >> 4) * 4
    flow = (".".join(map(str, ip[12:16])), sport, ".".join(map(str, ip[16:20])), dport)
    return flow, seq, tcp[13], tcp[offset:]


def _reassemble(segments: list[tuple[int, int, memoryview]]) -> tuple[bytes, int]:
    """One direction's payload in sequence order, each byte once; and the bytes missing
    (segments the capture did not see)."""
    syn = next((seq for seq, flags, _ in segments if flags & 0x02), None)
    base = (syn + 1) & 0xFFFFFFFF if syn is not None else min(seq for seq, _, data in segments if len(data))
    pieces = sorted((((seq - base) & 0xFFFFFFFF, data) for seq, _, data in segments if len(data)),
                    key=lambda piece: piece[0])
    out, missing = bytearray(), 0
    for rel, data in pieces:
        if rel >= 1 << 31:  # before the first byte this capture saw
            continue
        if rel > len(out):
            missing += rel - len(out)
            out += bytes(rel - len(out))  # a hole: no needle is made up across it
        if rel + len(data) > len(out):
            out += data[len(out) - rel:]
    return bytes(out), missing


def read_capture(path: Path, needles: Mapping[str, bytes]) -> Capture:
    """Search the capture in ``path`` for each of ``needles`` (name -> bytes)."""
    found: dict[str, list[str]] = {}
    flows: dict[Flow, list[tuple[int, int, memoryview]]] = defaultdict(list)
    cap = Capture()
    for frame in _frames(path):
        cap.frames += 1
        cap.bytes += len(frame)
        raw = bytes(frame)
        for name, needle in needles.items():
            if needle in raw and "frame" not in found.get(name, ()):
                found.setdefault(name, []).append("frame")
        seg = _tcp_segment(frame)
        if seg is not None:
            flow, seq, flags, payload = seg
            flows[flow].append((seq, flags, payload))
    for flow, segments in flows.items():
        if not any(len(data) for _, _, data in segments):
            cap.streams[flow] = 0
            continue
        stream, missing = _reassemble(segments)
        cap.streams[flow] = len(stream) - missing
        cap.missing += missing
        where = "{}:{} -> {}:{}".format(*flow)
        for name, needle in needles.items():
            if needle in stream:
                found.setdefault(name, []).append(where)
    cap.hits = found
    return cap
