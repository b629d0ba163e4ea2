"""Hypothesis against the ``cuju-peer-tls/1`` hello, on real TLS 1.3 over a socketpair.

After a genuine mutual-TLS handshake (certificates of a real ``openssl`` CA, cuju_libvirt.rig.pki),
one side sends hostile frames where the hello or the welcome belongs. The other side must either
accept exactly the one well-formed message that names the certificate's node, or refuse with the
package's own PeerError: never another exception, never a hang.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cuju_libvirt.cujud import peer, tls
from cuju_libvirt.errors import PeerError
from cuju_libvirt.rig.pki import PKI, PKIUnavailable

pytestmark = pytest.mark.timeout(300)

tls_hello_like = st.fixed_dictionaries(
    {"msg": st.sampled_from(["hello", "welcome", "refused", "auth", 7]),
     "proto": st.sampled_from([tls.PROTOCOL, peer.PROTOCOL, "cuju-peer-tls/2", None]),
     "node": st.sampled_from(["a", "b", "c", "", "a" * 64, 1]) | st.text(max_size=70)},
    optional={"reason": st.text(max_size=50)},
)
hostile_frame = (st.binary(max_size=120) | tls_hello_like.map(lambda d: json.dumps(d).encode())
                 | st.just(b"\xff" * 8))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.Contexts]:
    try:
        ca = PKI(tmp_path_factory.mktemp("pki") / "ca")
    except PKIUnavailable as err:
        pytest.skip(str(err))
    made = {}
    for node in ("a", "b"):
        creds = ca.host(node)
        made[node] = tls.Contexts.load(ca_file=creds.ca_file, cert_file=creds.cert_file,
                                       key_file=creds.key_file)
    return made


def run_against(ctx: dict[str, tls.Contexts], frames: list[bytes], *, hostile_is_client: bool,
                honest: Callable[[tls.TLSStream, float], tuple[object, str]]) -> tuple[str, str | None]:
    """Handshake a real TLS pair; the hostile side sends ``frames`` (length-prefixed, raw length
    words included) and closes; returns what the honest side said: ("ok", node) or ("refused", None)."""
    honest_sock, hostile_sock = socket.socketpair()
    client_ctx, server_ctx = ctx["a"].client, ctx["b"].server  # a dials b
    hostile = tls.TLSStream(hostile_sock, client_ctx if hostile_is_client else server_ctx,
                            server=not hostile_is_client)
    stream = tls.TLSStream(honest_sock, server_ctx if hostile_is_client else client_ctx,
                           server=hostile_is_client)

    def attack() -> None:
        try:
            hostile.handshake(time.monotonic() + 10)
            for f in frames:
                hostile.sendall(struct.pack(">I", len(f)) + f)
            hostile_sock.shutdown(socket.SHUT_WR)
        except (PeerError, OSError):
            pass

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    try:
        _, node = honest(stream, time.monotonic() + 10)
        return "ok", node
    except PeerError:
        return "refused", None
    finally:
        attacker.join(15)
        honest_sock.close()
        hostile_sock.close()
        assert not attacker.is_alive()


def _first(frames: list[bytes]) -> dict[str, object] | None:
    if not frames:
        return None
    try:
        msg = json.loads(frames[0])
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


@given(st.lists(hostile_frame, max_size=3))
@example([json.dumps({"msg": "hello", "proto": tls.PROTOCOL, "node": "a"}).encode()])  # the one to take
@example([json.dumps({"msg": "hello", "proto": tls.PROTOCOL, "node": "c"}).encode()])  # a peer, not proven
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_server_takes_only_a_well_formed_hello_for_the_certificates_node(
        ctx: dict[str, tls.Contexts], frames: list[bytes]) -> None:
    outcome = run_against(ctx, frames, hostile_is_client=True, honest=lambda s, d: peer.tls_server_handshake(
        s, "b", allowed=lambda n: n in {"a", "c"}, deadline=d, frame_timeout=2))
    first = _first(frames)
    valid = (first is not None and first.get("msg") == "hello" and first.get("proto") == tls.PROTOCOL
             and first.get("node") == "a")  # the certificate names a: "c" is allowed but not proven
    assert outcome == (("ok", "a") if valid else ("refused", None)), (frames, outcome)


@given(st.lists(hostile_frame, max_size=3))
@example([json.dumps({"msg": "welcome", "node": "b"}).encode()])  # the one to take
@example([json.dumps({"msg": "welcome", "node": "c"}).encode()])  # names another than the certificate
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_client_takes_only_a_welcome_from_the_certificates_node(
        ctx: dict[str, tls.Contexts], frames: list[bytes]) -> None:
    outcome = run_against(ctx, frames, hostile_is_client=False, honest=lambda s, d: peer.tls_client_handshake(
        s, "a", expect_peer="b", deadline=d, frame_timeout=2))
    first = _first(frames)
    valid = first is not None and first.get("msg") == "welcome" and first.get("node") == "b"
    assert outcome == (("ok", "b") if valid else ("refused", None)), (frames, outcome)
