"""The eavesdropper's reader (cuju_libvirt.rig.tap.read_capture): a needle is found wherever a
reader of the wire would find it, also split across segments that came twice, out of order
or around a hole, and what a capture did not see is counted, never made up."""

from __future__ import annotations

import itertools
import random
import struct
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from cuju_libvirt.rig.tap import read_capture

SRC, DST = (198, 18, 0, 1), (198, 18, 0, 2)


def tcp_frame(seq: int, payload: bytes, *, syn: bool = False, sport: int = 40000, dport: int = 7791,
              total_length: int | None = None) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, 0, 5 << 4, 0x02 if syn else 0x18,
                      65535, 0, 0) + payload
    length = 20 + len(tcp) if total_length is None else total_length
    ip = struct.pack("!BBHHHBBH4B4B", 0x45, 0, length, 0, 0, 64, 6, 0, *SRC, *DST) + tcp
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip


def write_capture(path: Path, frames: list[bytes], iface: bytes = b"ft0") -> Path:
    path.write_bytes(b"".join(struct.pack("<IB", len(f), len(iface)) + iface + f for f in frames))
    return path


def test_a_needle_split_across_segments_is_found_in_the_stream(tmp_path: Path) -> None:
    data = b"." * 100 + b"SECRET-NEEDLE" + b"." * 100
    isn = 0xFFFFFFF0  # the sequence numbers wrap inside the stream
    frames = [tcp_frame(isn, b"", syn=True), tcp_frame(isn + 1 + 105, data[105:]),
              tcp_frame(isn + 1, data[:105])]
    cap = read_capture(write_capture(tmp_path / "c", frames), {"n": b"SECRET-NEEDLE", "absent": b"NOPE"})
    assert cap.hits == {"n": ["198.18.0.1:40000 -> 198.18.0.2:7791"]}  # in no single frame
    assert cap.tcp_bytes(7791) == len(data) and cap.tcp_bytes(7790) == 0 and cap.missing == 0
    assert cap.frames == 3


def test_a_needle_in_a_frame_that_is_not_tcp_is_found_in_the_frame(tmp_path: Path) -> None:
    frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x06" + b"ARP?SECRET-NEEDLE"
    cap = read_capture(write_capture(tmp_path / "c", [frame]), {"n": b"SECRET-NEEDLE"})
    assert cap.hits == {"n": ["frame"]} and cap.streams == {}


def test_a_hole_is_counted_and_joins_nothing_across_it(tmp_path: Path) -> None:
    frames = [tcp_frame(1000, b"SECRET-"), tcp_frame(1000 + 7 + 5, b"NEEDLE")]  # 5 bytes never seen
    cap = read_capture(write_capture(tmp_path / "c", frames), {"n": b"SECRET-NEEDLE"})
    assert cap.hits == {} and cap.missing == 5 and cap.tcp_bytes(7791) == 13


def test_a_gso_frame_with_no_ip_length_is_read_to_its_end(tmp_path: Path) -> None:
    cap = read_capture(write_capture(tmp_path / "c", [tcp_frame(1, b"x" * 70000, total_length=0)]), {})
    assert cap.tcp_bytes(7791) == 70000


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=12),
       isn=st.integers(0, 0xFFFFFFFF), rnd=st.randoms(use_true_random=False))
def test_segments_in_any_order_and_seen_twice_give_the_stream_back(
    data: bytes, cuts: list[int], isn: int, rnd: random.Random
) -> None:
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    segments = [tcp_frame(isn + 1 + a, data[a:b]) for a, b in itertools.pairwise(bounds)]
    frames = [tcp_frame(isn, b"", syn=True), *segments, *rnd.sample(segments, len(segments) // 2)]
    rnd.shuffle(frames)
    needle = data[len(data) // 3:len(data) // 3 + 16]
    with tempfile.TemporaryDirectory() as tmp:
        cap = read_capture(write_capture(Path(tmp) / "c", frames), {"n": needle} if needle else {})
    assert cap.tcp_bytes(7791) == len(data) and cap.missing == 0
    if needle:
        assert "198.18.0.1:40000 -> 198.18.0.2:7791" in cap.hits["n"]
