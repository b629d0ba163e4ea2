"""The peer control channel on real loopback sockets: handshake, requests, heartbeats, and attacks."""

from __future__ import annotations

import functools
import json
import logging
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from cuju_libvirt.cujud import peer
from cuju_libvirt.cujud.peer import Handlers, PeerConnection, PeerOptions, PeerServer
from cuju_libvirt.errors import PeerAuthError, PeerError
from tests import helpers

pytestmark = pytest.mark.timeout(30)

KEY = b"0123456789abcdef0123456789abcdef-daemon-test"
OPTS = PeerOptions(handshake_timeout=1.0, idle_timeout=2.0, frame_timeout=1.0, max_frame=64 * 1024,
                   heartbeat_interval=0.05)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(4, thread_name_prefix="daemon-test")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


class Server:
    def __init__(self, executor: ThreadPoolExecutor, key: bytes = KEY, peers: tuple[str, ...] = ("a",),
                 options: PeerOptions = OPTS) -> None:
        self.conns: list[PeerConnection] = []
        self.notes: list[dict[str, object]] = []
        handlers = Handlers(
            requests={"ping": lambda c, b: {"pong": b.get("x"), "from": c.local},
                      "boom": lambda c, b: 1 // 0},  # type: ignore[dict-item]
            notes={"tell": lambda c, b: self.notes.append(b)},
        )
        self.server = PeerServer("127.0.0.1", 0, node="b", psk=key, peers=dict.fromkeys(peers),
                                 handlers=handlers, options=options, executor=executor,
                                 on_connection=self.conns.append)

    def close(self) -> None:
        self.server.close()
        for c in self.conns:
            c.close()
            c.join()


@pytest.fixture
def server(executor: ThreadPoolExecutor) -> Iterator[Server]:
    s = Server(executor)
    yield s
    s.close()


def dial(server: Server, executor: ThreadPoolExecutor, key: bytes = KEY, node: str = "a",
         expect: str | None = "b") -> PeerConnection:
    return peer.connect("127.0.0.1", server.server.port, node=node, psk=key, expect_peer=expect,
                        handlers=Handlers(), options=OPTS, executor=executor)


wait_for = functools.partial(helpers.wait_for, timeout=3.0)


def test_handshake_request_note_and_heartbeat(server: Server, executor: ThreadPoolExecutor) -> None:
    conn = dial(server, executor)
    try:
        assert conn.remote == "b"
        assert conn.request("ping", {"x": 42}, timeout=2) == {"pong": 42, "from": "b"}
        with pytest.raises(PeerError, match="unknown request 'nope'"):
            conn.request("nope", timeout=2)
        with pytest.raises(PeerError, match="internal error in 'boom'"):
            conn.request("boom", timeout=2)
        conn.notify("tell", {"v": 1})
        assert wait_for(lambda: server.notes == [{"v": 1}])
        assert wait_for(lambda: conn.heartbeat.received >= 3)
        status = conn.status()
        assert status["connected"] is True
        assert 0 < status["rtt_min_ms"] < 1000  # a measured loopback round trip
        assert server.conns and server.conns[0].remote == "a"
        assert wait_for(lambda: server.conns[0].heartbeat.received >= 3)
    finally:
        conn.close("test done")
    assert wait_for(server.conns[0].closed.is_set)
    # an orderly close is announced, so the other side does not report a loss
    assert server.conns[0].close_reason == "the peer closed the connection: test done"


def test_request_timeout(executor: ThreadPoolExecutor) -> None:
    s = Server(executor)
    s.server.handlers.requests["slow"] = lambda c, b: (time.sleep(0.5), {})[1]
    try:
        conn = dial(s, executor)
        with pytest.raises(PeerError, match=r"did not answer 'slow' within 0\.1 s"):
            conn.request("slow", timeout=0.1)
        # the connection is still usable and the late answer is discarded
        assert conn.request("ping", {"x": 1}, timeout=2)["pong"] == 1
        conn.close()
    finally:
        s.close()


def test_wrong_key_is_rejected_both_ways(server: Server, executor: ThreadPoolExecutor,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cuju_libvirt.cujud.peer")
    with pytest.raises(PeerAuthError, match="proof does not match our pre-shared key"):
        dial(server, executor, key=b"x" * 40)
    assert wait_for(lambda: "node 'a' found our proof wrong: the pre-shared keys differ" in caplog.text)
    assert "peer 127.0.0.1:" in caplog.text and "authentication failed" in caplog.text
    assert server.conns == []


def test_wrong_client_key_server_logs_and_denies(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    """A client that skips checking the server's proof still cannot get in without the key."""
    caplog.set_level(logging.WARNING, logger="cuju_libvirt.cujud.peer")
    sock = socket.create_connection(("127.0.0.1", server.server.port))
    try:
        peer.write_frame(sock, json.dumps({"msg": "hello", "proto": peer.PROTOCOL, "node": "a",
                                           "nonce": "00" * 32}).encode())
        peer.read_frame(sock, 4096, time.monotonic() + 2, 1)
        peer.write_frame(sock, json.dumps({"msg": "auth", "proof": "11" * 32}).encode())
        reply = peer.read_frame(sock, 4096, time.monotonic() + 2, 1)
        assert json.loads(reply) == {"msg": "denied"}
        assert recv_eof(sock)
    finally:
        sock.close()
    assert wait_for(lambda: "authentication failed" in caplog.text)
    assert "127.0.0.1:" in caplog.text and "wrong pre-shared key" in caplog.text
    assert server.conns == []


def test_unknown_node_is_refused(server: Server, executor: ThreadPoolExecutor) -> None:
    with pytest.raises(PeerAuthError, match="node 'c' is not in my peers"):
        dial(server, executor, node="c")
    assert server.conns == []


def test_unexpected_server_name(server: Server, executor: ThreadPoolExecutor) -> None:
    with pytest.raises(PeerAuthError, match="connected to node 'b', expected 'z'"):
        dial(server, executor, expect="z")


def recv_eof(sock: socket.socket, timeout: float = 3.0) -> bool:
    """True when the peer closes the connection within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class RawClient:
    """An authenticated client that writes sealed frames by hand, to misbehave on purpose."""

    def __init__(self, server: Server) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.server.port))
        self.session, _ = peer.client_handshake(self.sock, "a", KEY, expect_peer="b",
                                                deadline=time.monotonic() + 2)

    def frame(self, body: dict[str, object]) -> bytes:
        return self.session.seal(json.dumps(body).encode())

    def send(self, payload: bytes) -> None:
        peer.write_frame(self.sock, payload)

    def close(self) -> None:
        self.sock.close()


def note(n: int) -> dict[str, object]:
    return {"k": "note", "t": "tell", "b": {"n": n}}


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        ("replay", "replayed message (sequence 0, expected 1)"),
        ("tamper", "bad MAC"),
        ("reorder", "message out of order (sequence 1, expected 0)"),
        ("truncated_mac", "sealed frame too short"),
        ("unsealed", "bad MAC"),
    ],
)
def test_forged_messages_close_the_connection_and_are_logged(
    server: Server, caplog: pytest.LogCaptureFixture, attack: str, reason: str
) -> None:
    caplog.set_level(logging.WARNING, logger="cuju_libvirt.cujud.peer")
    raw = RawClient(server)
    try:
        first, second = raw.frame(note(1)), raw.frame(note(2))
        if attack == "replay":
            raw.send(first)
            raw.send(first)
        elif attack == "tamper":
            bad = bytearray(first)
            bad[-3] ^= 0x01
            raw.send(bytes(bad))
        elif attack == "reorder":
            raw.send(second)
            raw.send(first)
        elif attack == "truncated_mac":
            raw.send(first[:20])
        elif attack == "unsealed":
            raw.send(b"\0" * 40 + json.dumps(note(1)).encode())
        assert recv_eof(raw.sock)
    finally:
        raw.close()
    assert wait_for(lambda: reason in caplog.text)
    line = next(r.getMessage() for r in caplog.records if reason in r.getMessage())
    assert "peer a at 127.0.0.1:" in line and "connection closed" in line
    # only the genuine first frame of a replay was acted upon
    assert server.notes == ([{"n": 1}] if attack == "replay" else [])


def test_cross_session_frame_is_rejected(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cuju_libvirt.cujud.peer")
    one = RawClient(server)
    recorded = one.frame(note(1))  # sequence 0 of session one, never sent there
    one.close()
    two = RawClient(server)
    try:
        two.send(recorded)  # sequence 0 is what session two expects next
        assert recv_eof(two.sock)
    finally:
        two.close()
    assert wait_for(lambda: "bad MAC: message tampered with or from another session" in caplog.text)
    assert server.notes == []


def test_oversized_frame_is_refused_before_reading_it(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cuju_libvirt.cujud.peer")
    raw = RawClient(server)
    try:
        raw.sock.sendall(struct.pack(">I", OPTS.max_frame + 1))
        assert recv_eof(raw.sock)
    finally:
        raw.close()
    assert wait_for(lambda: f"exceeds the limit of {OPTS.max_frame}" in caplog.text)


def test_oversized_handshake_frame(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cuju_libvirt.cujud.peer")
    sock = socket.create_connection(("127.0.0.1", server.server.port))
    try:
        sock.sendall(struct.pack(">I", 1 << 30))
        assert recv_eof(sock)
    finally:
        sock.close()
    assert wait_for(lambda: "handshake failed: frame of 1073741824 bytes exceeds the limit of 4096"
                    in caplog.text)


@pytest.mark.parametrize("stage", ["silent", "partial_header", "trickle"])
def test_slowloris_is_cut_at_the_handshake_deadline(server: Server, caplog: pytest.LogCaptureFixture,
                                                     stage: str) -> None:
    caplog.set_level(logging.WARNING, logger="cuju_libvirt.cujud.peer")
    sock = socket.create_connection(("127.0.0.1", server.server.port))
    start = time.monotonic()
    try:
        if stage == "partial_header":
            sock.sendall(b"\0\0")
        elif stage == "trickle":
            sock.sendall(struct.pack(">I", 200) + b'{"msg"')
        # a byte every 0.2 s (trickle): each arrives in time, the whole frame never does
        closed = False
        while time.monotonic() < start + 4 and not closed:
            if stage == "trickle":
                try:
                    sock.sendall(b" ")
                except OSError:
                    break
            closed = recv_eof(sock, timeout=0.2)
        elapsed = time.monotonic() - start
    finally:
        sock.close()
    assert closed
    assert OPTS.handshake_timeout * 0.9 <= elapsed < OPTS.handshake_timeout + 1.5
    assert wait_for(lambda: "handshake failed: timed out" in caplog.text)


def test_idle_authenticated_peer_is_dropped(executor: ThreadPoolExecutor,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cuju_libvirt.cujud.peer")
    opts = PeerOptions(handshake_timeout=1, idle_timeout=0.3, frame_timeout=1, heartbeat_interval=10)
    s = Server(executor, options=opts)
    try:
        raw = RawClient(s)
        start = time.monotonic()
        assert recv_eof(raw.sock)
        assert 0.25 <= time.monotonic() - start < 2
        raw.close()
        assert wait_for(lambda: "timed out reading a frame header" in caplog.text)
    finally:
        s.close()


def test_peer_death_fails_pending_requests(executor: ThreadPoolExecutor) -> None:
    s = Server(executor)
    s.server.handlers.requests["hang"] = lambda c, b: (time.sleep(0.4), {})[1]
    conn = dial(s, executor)
    try:
        closed_seen: list[str] = []
        conn.on_close(lambda c: closed_seen.append(c.close_reason))
        assert wait_for(lambda: bool(s.conns))
        start = time.monotonic()
        pool = ThreadPoolExecutor(1)
        fut = pool.submit(conn.request, "hang", None, 5.0)
        time.sleep(0.05)
        s.conns[0].close("test kills the server side")
        with pytest.raises(PeerError, match="closed"):
            fut.result(3)
        assert time.monotonic() - start < 2
        assert closed_seen and closed_seen[0]
        pool.shutdown()
        with pytest.raises(PeerError, match="is closed"):
            conn.notify("tell")
    finally:
        conn.close()
        s.close()


def test_session_unit_roundtrip_and_direction_keys() -> None:
    nc, ns = b"c" * 32, b"s" * 32
    client = peer.Session(KEY, nc, ns, client="a", server="b", is_client=True)
    server = peer.Session(KEY, nc, ns, client="a", server="b", is_client=False)
    frame = client.seal(b'{"x":1}')
    assert server.open(frame) == b'{"x":1}'
    # a frame reflected back at its sender fails: directions have their own keys
    echo = peer.Session(KEY, nc, ns, client="a", server="b", is_client=True)
    with pytest.raises(PeerAuthError, match="bad MAC"):
        client.open(echo.seal(b"{}"))
