"""The FT-link listener under idle connections (issue 13 item 8), on real loopback sockets.

400 idle connections to cujud's ``ft_listen`` gave cujud 415 threads (one per connection
in its handshake, for 5 s each) and halved the epoch rate. The listener must bound what
connections in their handshake cost, as the peer channel does, and still let a primary
with a valid token in at once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from cuju_libvirt.cujud.standby import GENERATION_BYTES, TOKEN_BYTES, FTListener
from cuju_libvirt.ft_engine import linkkeys

IDLE = 400


def _connect(port: int) -> socket.socket | None:
    with contextlib.suppress(OSError):
        return socket.create_connection(("127.0.0.1", port), timeout=2)
    return None


@pytest.mark.timeout(60)
def test_hundreds_of_idle_connections_cost_no_thread_and_do_not_keep_a_primary_out() -> None:
    listener = FTListener("127.0.0.1", 0, handshake_timeout=1.0, max_pending=16)
    idle: list[socket.socket] = []
    linked = threading.Event()
    got: list[socket.socket] = []

    generations: list[int] = []

    def on_connect(sock: socket.socket, generation: int) -> None:
        got.append(sock)
        generations.append(generation)
        linked.set()

    try:
        before = threading.active_count()
        for _ in range(IDLE):
            sock = _connect(listener.port)
            if sock is not None:
                idle.append(sock)
        time.sleep(0.2)
        assert threading.active_count() <= before + 1, \
            f"{threading.active_count() - before} threads more for {IDLE} idle connections"

        # a primary with its token gets through while the idle ones wait (or were refused)
        token = listener.expect(on_connect)
        deadline = time.monotonic() + 10
        while not linked.is_set() and time.monotonic() < deadline:
            primary = _connect(listener.port)
            if primary is not None:
                with contextlib.suppress(OSError):
                    primary.sendall(bytes.fromhex(token) + (7).to_bytes(GENERATION_BYTES, "big"))
                linked.wait(0.5)
                if not linked.is_set():
                    primary.close()
        assert linked.is_set(), "a valid token was kept out by idle connections"
        assert len(bytes.fromhex(token)) == TOKEN_BYTES and generations == [7]
        assert listener.refused > 0 and listener.refused + listener.timed_out <= IDLE + 10

        # idle connections in their handshake are closed after the timeout
        time.sleep(1.5)
        open_idle = 0
        for sock in idle:
            sock.settimeout(0.01)
            try:
                if sock.recv(1) != b"":
                    open_idle += 1
            except TimeoutError:
                open_idle += 1
            except OSError:
                pass
        assert open_idle == 0, f"{open_idle} idle connections still open after the handshake timeout"
        assert listener.timed_out > 0
    finally:
        for sock in idle + got:
            sock.close()
        listener.close()


@pytest.mark.timeout(60)
def test_on_an_encrypted_link_the_token_never_crosses_and_alone_does_not_admit() -> None:
    """With the link's secret, a connection opens with admission(secret, token): the token (which
    a tap on the FT link would otherwise read) is refused, the admission value gets in once."""
    listener = FTListener("127.0.0.1", 0, handshake_timeout=1.0)
    got: list[int] = []
    linked = threading.Event()

    def on_connect(sock: socket.socket, generation: int) -> None:
        got.append(generation)
        linked.set()

    secret = linkkeys.new_secret()
    try:
        token = bytes.fromhex(listener.expect(on_connect, secret))
        admit = linkkeys.admission(secret, token)
        assert len(admit) == TOKEN_BYTES and admit != token
        assert admit != linkkeys.admission(linkkeys.new_secret(), token)
        # the token, the right value, the same again
        for opening, expected in ((token, False), (admit, True), (admit, False)):
            sock = socket.create_connection(("127.0.0.1", listener.port), timeout=2)
            with sock:
                sock.sendall(opening + (3).to_bytes(GENERATION_BYTES, "big"))
                admitted = linked.wait(1.0)
                if not admitted:  # refused: the listener closes the connection
                    assert sock.recv(1) == b""
            linked.clear()
            assert admitted == expected, opening
        assert got == [3]
    finally:
        listener.close()
