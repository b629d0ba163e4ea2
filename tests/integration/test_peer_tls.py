"""Mutual TLS on the peer channel, on real loopback sockets, against an attacker on the path.

The attacker is a TCP relay between the two cujud ends: it records every byte (a capture),
and can flip a byte of the stream once the handshake is over. Certificates come from a
real ``openssl`` CA made per test module (cuju_libvirt.rig.pki).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cuju_libvirt.cujud import peer
from cuju_libvirt.cujud.peer import Handlers, PeerConnection, PeerOptions, PeerServer
from cuju_libvirt.cujud.tls import Contexts
from cuju_libvirt.errors import ConfigError, PeerAuthError, PeerError
from cuju_libvirt.rig.pki import PKI, HostCredentials, PKIUnavailable
from tests import helpers

pytestmark = pytest.mark.timeout(60)

KEY = b"0123456789abcdef0123456789abcdef-tls-test"
OPTS = PeerOptions(handshake_timeout=2.0, idle_timeout=3.0, frame_timeout=2.0, max_frame=256 * 1024,
                   heartbeat_interval=0.05)
SECRET = "FT-TOKEN-3f9c1d2e7a6b5c4d"
#: What a page of guest memory might hold: a pattern that must never show in a capture.
GUEST_PATTERN = "guest-memory-pattern:" + "5a" * 64


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HostCredentials]:
    try:
        ca = PKI(tmp_path_factory.mktemp("pki") / "ca")
        other = PKI(tmp_path_factory.mktemp("pki") / "other-ca", name="another CA")
    except PKIUnavailable as err:
        pytest.skip(str(err))
    return {"a": ca.host("a"), "b": ca.host("b"), "c": ca.host("c"), "a-expired": ca.host("a", expired=True),
            "a-other-ca": other.host("a")}


def contexts(creds: HostCredentials, ca_file: Path | None = None) -> Contexts:
    return Contexts.load(ca_file=ca_file or creds.ca_file, cert_file=creds.cert_file, key_file=creds.key_file)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(4, thread_name_prefix="tls-test")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


class Server:
    def __init__(self, executor: ThreadPoolExecutor, tls: Contexts | None,
                 peers: tuple[str, ...] = ("a",)) -> None:
        self.conns: list[PeerConnection] = []
        self.notes: list[dict[str, object]] = []
        handlers = Handlers(requests={"echo": lambda c, b: b},
                            notes={"tell": lambda c, b: self.notes.append(b)})
        self.server = PeerServer("127.0.0.1", 0, node="b", psk=KEY, peers=dict.fromkeys(peers),
                                 handlers=handlers, options=OPTS, executor=executor,
                                 on_connection=self.conns.append,
                                 tls=None if tls is None else tls.server)

    def close(self) -> None:
        self.server.close()
        for c in self.conns:
            c.close()
            c.join()


@pytest.fixture
def servers(executor: ThreadPoolExecutor) -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for s in made:
        s.close()


def dial(port: int, executor: ThreadPoolExecutor, tls: Contexts | None, node: str = "a") -> PeerConnection:
    return peer.connect("127.0.0.1", port, node=node, psk=KEY, expect_peer="b", handlers=Handlers(),
                        options=OPTS, executor=executor, tls=None if tls is None else tls.client)


def exchange_secret(conn: PeerConnection) -> None:
    body = {"token": SECRET, "page": GUEST_PATTERN}
    assert conn.request("echo", body, timeout=3) == body
    conn.notify("tell", body)


@contextlib.contextmanager
def relayed(executor: ThreadPoolExecutor, servers: list[Server], server_tls: Contexts | None,
            client_tls: Contexts | None) -> Iterator[tuple[Server, helpers.Relay, PeerConnection]]:
    """A server, the attacker's relay in front of it, and a connection dialled through it."""
    server = Server(executor, server_tls)
    servers.append(server)
    relay = helpers.Relay(("127.0.0.1", server.server.port))
    try:
        conn = dial(relay.port, executor, client_tls)
        try:
            yield server, relay, conn
        finally:
            conn.close()
    finally:
        relay.close()


def test_tls_channel_works_and_a_capture_shows_nothing_secret(
        pki: dict[str, HostCredentials], executor: ThreadPoolExecutor, servers: list[Server]) -> None:
    with relayed(executor, servers, contexts(pki["b"]), contexts(pki["a"])) as (server, relay, conn):
        assert conn.remote == "b"
        assert conn.security.startswith("TLS (TLSv1.3")
        exchange_secret(conn)
        helpers.wait_for(lambda: server.notes, timeout=3)
        assert server.notes == [{"token": SECRET, "page": GUEST_PATTERN}]
        helpers.wait_for(lambda: conn.heartbeat.received >= 3, timeout=3)  # heartbeats flow both ways
        assert server.conns[0].security.startswith("TLS (TLSv1.3")
    capture = bytes(relay.captured)
    assert len(capture) > 1000  # the relay really saw the traffic
    for needle in (SECRET, GUEST_PATTERN[:40], '"echo"', '"hello"', "cuju-peer"):
        assert needle.encode() not in capture, needle


def test_the_same_capture_without_tls_shows_the_secret(
        executor: ThreadPoolExecutor, servers: list[Server]) -> None:
    """The lesser mode: authenticated but readable (the check above can fail)."""
    with relayed(executor, servers, None, None) as (_server, relay, conn):
        assert conn.security.startswith("pre-shared key")
        exchange_secret(conn)
    assert SECRET.encode() in bytes(relay.captured)


def test_a_flipped_byte_closes_the_connection_and_is_never_delivered(
        pki: dict[str, HostCredentials], executor: ThreadPoolExecutor, servers: list[Server],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cuju_libvirt.cujud.peer")
    with relayed(executor, servers, contexts(pki["b"]), contexts(pki["a"])) as (server, relay, conn):
        helpers.wait_for(lambda: server.conns, timeout=3)
        with relay.lock:
            relay.fault = helpers.FlipAt(relay.upstream + 30, mask=0x40)  # inside the next record
        with pytest.raises(PeerError):
            conn.request("echo", {"token": SECRET}, timeout=2)
            conn.request("echo", {"token": SECRET}, timeout=2)
        helpers.wait_for(server.conns[0].closed.is_set, timeout=3)
        assert server.notes == []
        assert "record rejected" in caplog.text


@pytest.mark.parametrize("client, reason", [
    ("a-other-ca", "not signed by the cluster's CA"),
    ("a-expired", r"certificate has expired \(renew the peer's certificate\)"),
    ("c", "certificate for c"),
])
def test_bad_client_certificates_are_refused_with_the_reason(
        pki: dict[str, HostCredentials], executor: ThreadPoolExecutor, servers: list[Server],
        caplog: pytest.LogCaptureFixture, *, client: str, reason: str) -> None:
    caplog.set_level(logging.WARNING, logger="cuju_libvirt.cujud.peer")
    server = Server(executor, contexts(pki["b"]))
    servers.append(server)
    creds = pki[client]
    ctx = contexts(creds, ca_file=pki["a"].ca_file)  # the client trusts the server's CA
    with pytest.raises(PeerAuthError):
        dial(server.server.port, executor, ctx, node="a")
    helpers.wait_for(lambda: "authentication failed" in caplog.text, timeout=3)
    assert server.conns == []
    assert re.search(reason, caplog.text, re.I), caplog.text


def test_client_refuses_a_server_whose_certificate_names_another_node(
        pki: dict[str, HostCredentials], executor: ThreadPoolExecutor, servers: list[Server]) -> None:
    server = Server(executor, contexts(pki["c"]))  # calls itself b, certificate says c
    servers.append(server)
    with pytest.raises(PeerAuthError, match="names c, not the peer we dialled"):
        dial(server.server.port, executor, contexts(pki["a"]))


@pytest.mark.parametrize("server_tls, client_tls", [(True, False), (False, True)])
def test_tls_and_plain_hosts_refuse_each_other(
        pki: dict[str, HostCredentials], executor: ThreadPoolExecutor, servers: list[Server],
        server_tls: bool, client_tls: bool) -> None:
    server = Server(executor, contexts(pki["b"]) if server_tls else None)
    servers.append(server)
    # the dialling side says what to check too, whichever of the two it is
    with pytest.raises(PeerError, match=r"is it configured with peer_tls: on\?"):
        dial(server.server.port, executor, contexts(pki["a"]) if client_tls else None)
    assert server.conns == []


def test_missing_or_mismatched_files_name_the_key_and_the_fix(pki: dict[str, HostCredentials],
                                                             tmp_path: Path) -> None:
    a, b = pki["a"], pki["b"]
    with pytest.raises(ConfigError, match=r"tls_cert_file .* does not exist.*peer_tls: off"):
        Contexts.load(ca_file=a.ca_file, cert_file=tmp_path / "nope.pem", key_file=a.key_file)
    with pytest.raises(ConfigError, match="do they belong together"):
        Contexts.load(ca_file=a.ca_file, cert_file=a.cert_file, key_file=b.key_file)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"tls_ca_file .* not a PEM CA certificate"):
        Contexts.load(ca_file=junk, cert_file=a.cert_file, key_file=a.key_file)
    assert os.stat(a.key_file).st_mode & 0o077 == 0
