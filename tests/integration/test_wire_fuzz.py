"""Property tests for what faces the network or a local client: hostile bytes only ever
produce the package's own errors (or a clean refusal), never a crash or a hang."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cuju_libvirt.cujud import peer
from cuju_libvirt.cujud.control import ControlServer
from cuju_libvirt.errors import PeerAuthError, PeerError

pytestmark = pytest.mark.timeout(120)

KEY = b"k" * 40
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(st.binary(max_size=300))
@settings(max_examples=400, deadline=None)
def test_session_open_rejects_arbitrary_bytes(data: bytes) -> None:
    session = peer.Session(KEY, b"c" * 32, b"s" * 32, client="a", server="b", is_client=False)
    with pytest.raises(PeerAuthError):
        session.open(data)
    assert session.recv_seq == 0


@given(st.binary(max_size=40), st.integers(min_value=0, max_value=200))
@settings(max_examples=300, deadline=None)
def test_any_single_bit_flip_in_a_sealed_frame_is_caught(body: bytes, position: int) -> None:
    sender = peer.Session(KEY, b"c" * 32, b"s" * 32, client="a", server="b", is_client=True)
    receiver = peer.Session(KEY, b"c" * 32, b"s" * 32, client="a", server="b", is_client=False)
    frame = bytearray(sender.seal(body))
    bit = position % (len(frame) * 8)
    frame[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(PeerAuthError):
        receiver.open(bytes(frame))


@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
@settings(max_examples=300, deadline=None)
def test_decode_returns_an_object_or_raises_peer_error(data: bytes) -> None:
    try:
        expected = json.loads(data)
    except ValueError:  # not UTF-8 or not JSON
        expected = None
    if isinstance(expected, dict):
        assert peer._decode(data) == expected
    else:
        with pytest.raises(PeerError):
            peer._decode(data)


hello_like = st.fixed_dictionaries(
    {"msg": st.sampled_from(["hello", "auth", "x"]), "proto": st.sampled_from([peer.PROTOCOL, "v0"]),
     "node": st.text(max_size=70), "nonce": st.text("0123456789abcdef", max_size=70)},
    optional={"proof": st.text("0123456789abcdef", max_size=70)},
)


@given(st.lists(st.binary(max_size=100) | hello_like.map(lambda d: json.dumps(d).encode()), max_size=3))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_server_handshake_on_hostile_frames(frames: list[bytes]) -> None:
    server_side, client_side = socket.socketpair()
    try:
        for f in frames:
            client_side.sendall(struct.pack(">I", len(f)) + f)
        client_side.shutdown(socket.SHUT_WR)
        with pytest.raises(PeerError):  # never authenticated without the key, never another error
            peer.server_handshake(server_side, "b", KEY, allowed=lambda n: True,
                                  deadline=time.monotonic() + 2, frame_timeout=1)
    finally:
        server_side.close()
        client_side.close()


@pytest.fixture(scope="module")
def control_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlServer]:
    srv = ControlServer(tmp_path_factory.mktemp("daemon-fuzz") / "c.sock", {"ping": lambda p: {"p": p}})
    yield srv
    srv.close()


@given(st.binary(max_size=300).filter(lambda b: b"\n" not in b) |
       json_values.map(lambda v: json.dumps(v).encode()))
@settings(max_examples=300, deadline=None)
def test_control_answers_every_line(control_server: ControlServer, line: bytes) -> None:
    reply = control_server._answer(line + b"\n")
    assert reply["v"] == 1 and isinstance(reply["ok"], bool)
    if not reply["ok"]:
        assert reply["error"]["code"] in {"bad-request", "unsupported-version", "unknown-method"}


def test_control_fixture_path_is_a_socket(control_server: ControlServer) -> None:
    assert Path(control_server.path).is_socket()
