"""The authenticated control channel between the cujud of two hosts.

Wire format (``cuju-peer/1``), over TCP:

* Every frame is a 4-byte big-endian length followed by that many bytes. Frames
  before authentication hold UTF-8 JSON and may be at most ``MAX_HANDSHAKE_FRAME``
  bytes; later frames at most ``PeerOptions.max_frame``. A larger length closes the
  connection before its body is read.
* Handshake (mutual challenge-response over a pre-shared key ``PSK``; ``Nc`` and
  ``Ns`` are 32 fresh random bytes from client and server, ``C``/``S`` their node
  names, ``T(label) = "cuju-peer/1" 0 label 0 Nc Ns C 0 S``)::

      C -> S  {"msg": "hello", "proto": "cuju-peer/1", "node": C, "nonce": hex(Nc)}
      S -> C  {"msg": "challenge", "node": S, "nonce": hex(Ns),
               "proof": hex(HMAC-SHA256(PSK, T("server")))}
      C -> S  {"msg": "auth", "proof": hex(HMAC-SHA256(PSK, T("client")))}
              or {"msg": "mismatch"} and close, when the server's proof is wrong
      S -> C  {"msg": "denied"} and close, when the client's proof is wrong;
              otherwise the first sealed frame: {"msg": "welcome"} or
              {"msg": "refused", "reason": ...} (node not in the server's peers).

  Session keys: ``K = HMAC(PSK, T("session"))``, ``K_cs = HMAC(K, "c2s")``,
  ``K_sc = HMAC(K, "s2c")``: fresh for every connection, different per direction.
* Sealed frame: ``seq (8 bytes, big-endian) | mac (32) | JSON body`` with
  ``mac = HMAC-SHA256(K_dir, seq | body)``. Sequence numbers start at 0 in each
  direction and go up by one; a receiver accepts exactly the next one. A bad MAC
  (tampered, or from another session), an old sequence number (replay) or a later
  one (reordered, dropped) closes the connection and is logged with the peer's
  address and the reason. MACs and proofs are compared in constant time.
* Sealed bodies: ``{"k": "req", "id": N, "t": TYPE, "b": {...}}`` (request),
  ``{"k": "res", "id": N, "ok": true, "b": {...}}`` or ``{"k": "res", "id": N,
  "ok": false, "err": TEXT}`` (response), ``{"k": "note", "t": TYPE, "b": {...}}``
  (one-way). Heartbeats are notes ``hb`` ``{"n": N, "t": SENDER_CLOCK}`` answered by
  ``hb_ack`` with the same values, giving the round trip. A side that closes the
  connection on purpose first sends the note ``bye`` ``{"reason": TEXT}``.

Timeouts: the handshake must finish within ``handshake_timeout`` in total; after it,
a peer silent for ``idle_timeout`` is dropped, and a frame once begun must arrive in
full within ``frame_timeout`` (a slow sender cannot hold a connection open).

With ``peer_tls: on`` (:mod:`.tls`) the same framing runs inside mutual TLS 1.3 and the
handshake above is replaced by ``cuju-peer-tls/1``: after the TLS handshake (both sides
present a certificate of the cluster's CA)::

      C -> S  {"msg": "hello", "proto": "cuju-peer-tls/1", "node": C}
      S -> C  {"msg": "welcome", "node": S}, or {"msg": "refused", "reason": ...} and close

The server accepts ``C`` only if the client's certificate names ``C`` and ``C`` is one of
its peers; the client accepts ``S`` only if the server's certificate names ``S`` (and it
is the peer it dialled). Frames then carry the JSON body alone: TLS encrypts them and
detects tampering, replay, reordering and truncation. Nothing secret ever travels in a
cleartext frame. The pre-shared-key scheme stays as the lesser mode (``peer_tls: off``):
authenticated and tamper-evident, but readable by anyone on the path.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from cuju_libvirt.cujud import tls as tlsmod
from cuju_libvirt.errors import CujuError, PeerAuthError, PeerError
from cuju_libvirt.logsetup import log_failure

LOG = logging.getLogger(__name__)

PROTOCOL = "cuju-peer/1"
NONCE_BYTES = 32
MAC_BYTES = 32
SEQ_BYTES = 8
MAX_HANDSHAKE_FRAME = 4096
_LEN = struct.Struct(">I")
_SEQ = struct.Struct(">Q")

Body = dict[str, Any]
#: What ``connect``/``PeerServer`` take as a socket: a plain one, or TLS over one.
Stream = socket.socket | tlsmod.TLSStream


@dataclass(frozen=True)
class PeerOptions:
    handshake_timeout: float = 5.0
    idle_timeout: float = 3.0
    frame_timeout: float = 5.0
    max_frame: int = 1 << 20
    heartbeat_interval: float = 0.5
    #: Connections still in their handshake, at most (more are closed at once).
    max_pending: int = 16


# --- framing -----------------------------------------------------------------------------------


#: A connection that ended before a frame began.
CLOSED_BY_PEER = "connection closed by the peer"


def _recv_exact(sock: Stream, n: int, deadline: float, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        tlsmod.wait_readable(sock, deadline, f"reading {what} ({len(buf)} of {n} bytes arrived)")
        chunk = sock.recv(min(n - len(buf), 1 << 16))
        if chunk is None:  # TLS: part of a record arrived
            continue
        if not chunk:
            raise PeerError(f"connection closed inside {what}" if buf else CLOSED_BY_PEER)
        buf += chunk
    return bytes(buf)


def read_frame(
    sock: Stream, max_size: int, first_byte_deadline: float, frame_timeout: float
) -> bytes:
    """Read one length-prefixed frame. The header must start before ``first_byte_deadline``."""
    head = _recv_exact(sock, 1, first_byte_deadline, "a frame header")
    head += _recv_exact(sock, _LEN.size - 1, time.monotonic() + frame_timeout, "a frame header")
    (size,) = _LEN.unpack(head)
    if head[:2] == b"\x16\x03" and size > max_size:  # a TLS handshake record, not our frame
        raise PeerAuthError("the peer speaks TLS and this host does not: set peer_tls to the same "
                            "value on both hosts (on: mutual TLS, the recommended mode)")
    if size > max_size:
        raise PeerError(f"frame of {size} bytes exceeds the limit of {max_size}")
    return _recv_exact(sock, size, time.monotonic() + frame_timeout, f"a frame of {size} bytes")


def write_frame(sock: Stream, payload: bytes) -> None:
    sock.sendall(_LEN.pack(len(payload)) + payload)


def _encode(obj: Body) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _decode(data: bytes) -> Body:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PeerError(f"malformed JSON in a frame: {err}") from None
    if not isinstance(obj, dict):
        raise PeerError("a frame body is not a JSON object")
    return obj


# --- the session ---------------------------------------------------------------------------------


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _transcript(label: str, nc: bytes, ns: bytes, client: str, server: str) -> bytes:
    return b"\0".join([PROTOCOL.encode(), label.encode(), nc + ns + client.encode(), server.encode()])


class Session:
    """Per-connection keys and sequence counters; seals and opens frames."""

    def __init__(
        self, psk: bytes, nc: bytes, ns: bytes, *, client: str, server: str, is_client: bool
    ) -> None:
        master = _mac(psk, _transcript("session", nc, ns, client, server))
        c2s, s2c = _mac(master, b"c2s"), _mac(master, b"s2c")
        self._send_key, self._recv_key = (c2s, s2c) if is_client else (s2c, c2s)
        self.send_seq = 0
        self.recv_seq = 0

    def seal(self, body: bytes) -> bytes:
        """The next outgoing frame payload; the caller serialises calls."""
        seq = _SEQ.pack(self.send_seq)
        self.send_seq += 1
        return seq + _mac(self._send_key, seq + body) + body

    def open(self, payload: bytes) -> bytes:
        """Check one incoming frame payload; return its body or raise PeerAuthError."""
        if len(payload) < SEQ_BYTES + MAC_BYTES:
            raise PeerAuthError(f"sealed frame too short ({len(payload)} bytes)")
        seq_bytes, mac, body = payload[:SEQ_BYTES], payload[SEQ_BYTES : SEQ_BYTES + MAC_BYTES], payload[40:]
        if not hmac.compare_digest(mac, _mac(self._recv_key, seq_bytes + body)):
            raise PeerAuthError("bad MAC: message tampered with or from another session")
        (seq,) = _SEQ.unpack(seq_bytes)
        if seq < self.recv_seq:
            raise PeerAuthError(f"replayed message (sequence {seq}, expected {self.recv_seq})")
        if seq > self.recv_seq:
            raise PeerAuthError(f"message out of order (sequence {seq}, expected {self.recv_seq})")
        self.recv_seq += 1
        return body


class TLSSession:
    """The session of a TLS connection: TLS seals the frames, so bodies pass as they are."""

    def seal(self, body: bytes) -> bytes:
        return body

    def open(self, payload: bytes) -> bytes:
        return payload


def _hex_field(msg: Body, name: str, size: int) -> bytes:
    value = msg.get(name)
    if not isinstance(value, str) or len(value) != 2 * size:
        raise PeerError(f"handshake field {name!r} missing or malformed")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise PeerError(f"handshake field {name!r} is not hex") from None


def _name_field(msg: Body) -> str:
    node = msg.get("node")
    if not isinstance(node, str) or not 0 < len(node) <= 63:
        raise PeerError("handshake field 'node' missing or malformed")
    return node


def _expect(msg: Body, kind: str) -> None:
    if msg.get("msg") != kind:
        raise PeerError(f"expected a {kind!r} message, got {str(msg.get('msg'))[:40]!r}")


def client_handshake(
    sock: socket.socket, node: str, psk: bytes, *, expect_peer: str | None, deadline: float,
    frame_timeout: float = 5.0,
) -> tuple[Session, str]:
    """Authenticate as a client on a connected socket; returns the session and the server's name."""
    nc = os.urandom(NONCE_BYTES)
    write_frame(sock, _encode({"msg": "hello", "proto": PROTOCOL, "node": node, "nonce": nc.hex()}))
    try:
        challenge = _decode(read_frame(sock, MAX_HANDSHAKE_FRAME, deadline, frame_timeout))
    except (PeerError, ConnectionResetError) as err:
        if isinstance(err, PeerError) and str(err) != CLOSED_BY_PEER:
            raise
        # A peer with peer_tls: on ends a plain hello this way (OpenSSL sends no alert for it).
        raise PeerError(f"{CLOSED_BY_PEER} at our pre-shared-key hello (is it configured with "
                        "peer_tls: on? set peer_tls to the same value on both hosts)") from err
    if challenge.get("msg") == "refused":
        raise PeerError(f"peer refused the connection: {str(challenge.get('reason'))[:200]}")
    _expect(challenge, "challenge")
    server = _name_field(challenge)
    ns = _hex_field(challenge, "nonce", NONCE_BYTES)
    proof = _hex_field(challenge, "proof", MAC_BYTES)
    if not hmac.compare_digest(proof, _mac(psk, _transcript("server", nc, ns, node, server))):
        with contextlib.suppress(OSError):  # tell the server why, so that its log says it too
            write_frame(sock, _encode({"msg": "mismatch"}))
        raise PeerAuthError("the peer failed authentication: its proof does not match our pre-shared key")
    if expect_peer is not None and server != expect_peer:
        raise PeerAuthError(f"connected to node {server!r}, expected {expect_peer!r}")
    mine = _mac(psk, _transcript("client", nc, ns, node, server))
    write_frame(sock, _encode({"msg": "auth", "proof": mine.hex()}))
    session = Session(psk, nc, ns, client=node, server=server, is_client=True)
    payload = read_frame(sock, MAX_HANDSHAKE_FRAME, deadline, frame_timeout)
    if payload.startswith(b"{"):
        reply = _decode(payload)
        if reply.get("msg") == "denied":
            raise PeerAuthError("the peer rejected our authentication: the pre-shared keys differ")
        raise PeerError(f"unexpected handshake reply {str(reply.get('msg'))[:40]!r}")
    welcome = _decode(session.open(payload))
    if welcome.get("msg") == "refused":
        raise PeerAuthError(f"the peer refused us: {str(welcome.get('reason'))[:200]}")
    _expect(welcome, "welcome")
    return session, server


def server_handshake(
    sock: socket.socket, node: str, psk: bytes, *, allowed: Callable[[str], bool], deadline: float,
    frame_timeout: float = 5.0,
) -> tuple[Session, str]:
    """Authenticate a client on an accepted socket; returns the session and the client's name."""
    hello = _decode(read_frame(sock, MAX_HANDSHAKE_FRAME, deadline, frame_timeout))
    _expect(hello, "hello")
    if hello.get("proto") != PROTOCOL:
        write_frame(sock, _encode({"msg": "refused", "reason": f"this cujud speaks {PROTOCOL} only"}))
        raise PeerError(f"unsupported protocol {str(hello.get('proto'))[:40]!r}")
    client = _name_field(hello)
    nc = _hex_field(hello, "nonce", NONCE_BYTES)
    ns = os.urandom(NONCE_BYTES)
    proof = _mac(psk, _transcript("server", nc, ns, client, node))
    write_frame(sock, _encode({"msg": "challenge", "node": node, "nonce": ns.hex(), "proof": proof.hex()}))
    auth = _decode(read_frame(sock, MAX_HANDSHAKE_FRAME, deadline, frame_timeout))
    if auth.get("msg") == "mismatch":
        raise PeerAuthError(f"node {client!r} found our proof wrong: the pre-shared keys differ")
    _expect(auth, "auth")
    theirs = _hex_field(auth, "proof", MAC_BYTES)
    if not hmac.compare_digest(theirs, _mac(psk, _transcript("client", nc, ns, client, node))):
        write_frame(sock, _encode({"msg": "denied"}))
        raise PeerAuthError(f"node {client!r} failed authentication (wrong pre-shared key?)")
    session = Session(psk, nc, ns, client=client, server=node, is_client=False)
    if not allowed(client):
        refusal = {"msg": "refused", "reason": f"node {client!r} is not in my peers"}
        write_frame(sock, session.seal(_encode(refusal)))
        raise PeerAuthError(f"node {client!r} authenticated but is not in the configured peers")
    write_frame(sock, session.seal(_encode({"msg": "welcome", "node": node})))
    return session, client


def tls_client_handshake(
    stream: tlsmod.TLSStream, node: str, *, expect_peer: str | None, deadline: float,
    frame_timeout: float = 5.0,
) -> tuple[TLSSession, str]:
    """TLS handshake, then ``cuju-peer-tls/1`` as the client; returns the server's node name."""
    stream.handshake(deadline)
    names = tlsmod.cert_names(stream.peer_cert())
    if expect_peer is not None and expect_peer not in names:
        raise PeerAuthError(f"the peer's certificate names {', '.join(names) or 'nobody'}, "
                            f"not the peer we dialled ({expect_peer!r})")
    write_frame(stream, _encode({"msg": "hello", "proto": tlsmod.PROTOCOL, "node": node}))
    reply = _decode(read_frame(stream, MAX_HANDSHAKE_FRAME, deadline, frame_timeout))
    if reply.get("msg") == "refused":
        raise PeerAuthError(f"the peer refused us: {str(reply.get('reason'))[:200]}")
    _expect(reply, "welcome")
    server = _name_field(reply)
    if server not in names:
        raise PeerAuthError(f"the peer calls itself {server!r} but its certificate names "
                            f"{', '.join(names) or 'nobody'}")
    return TLSSession(), server


def tls_server_handshake(
    stream: tlsmod.TLSStream, node: str, *, allowed: Callable[[str], bool], deadline: float,
    frame_timeout: float = 5.0,
) -> tuple[TLSSession, str]:
    """TLS handshake, then ``cuju-peer-tls/1`` as the server; returns the client's node name."""
    stream.handshake(deadline)
    names = tlsmod.cert_names(stream.peer_cert())
    hello = _decode(read_frame(stream, MAX_HANDSHAKE_FRAME, deadline, frame_timeout))
    _expect(hello, "hello")
    if hello.get("proto") != tlsmod.PROTOCOL:
        write_frame(stream, _encode({"msg": "refused", "reason": f"this cujud speaks {tlsmod.PROTOCOL}"}))
        raise PeerError(f"unsupported protocol {str(hello.get('proto'))[:40]!r}")
    client = _name_field(hello)
    if client not in names:
        reason = f"your certificate names {', '.join(names) or 'nobody'}, not {client!r}"
        write_frame(stream, _encode({"msg": "refused", "reason": reason}))
        raise PeerAuthError(f"node {client!r} presented a certificate for {', '.join(names) or 'nobody'}")
    if not allowed(client):
        write_frame(stream, _encode({"msg": "refused", "reason": f"node {client!r} is not in my peers"}))
        raise PeerAuthError(f"node {client!r} has a valid certificate but is not in the configured peers")
    write_frame(stream, _encode({"msg": "welcome", "node": node}))
    return TLSSession(), client


# --- connections -----------------------------------------------------------------------------------


class _Goodbye(PeerError):
    """The peer announced an orderly close (note ``bye``)."""


RequestHandler = Callable[["PeerConnection", Body], Body]
NoteHandler = Callable[["PeerConnection", Body], None]


@dataclass
class Handlers:
    """What a connection does with incoming requests and notes, by type."""

    requests: dict[str, RequestHandler] = field(default_factory=dict)
    notes: dict[str, NoteHandler] = field(default_factory=dict)


@dataclass
class HeartbeatStats:
    sent: int = 0
    received: int = 0
    last_rtt: float | None = None
    min_rtt: float | None = None
    #: exponentially weighted mean of the round trip, seconds
    mean_rtt: float | None = None


class PeerConnection:
    """An authenticated connection: requests with timeouts, one-way notes, heartbeats."""

    def __init__(
        self, sock: Stream, session: Session | TLSSession, *, local: str, remote: str, address: str,
        handlers: Handlers, options: PeerOptions, executor: ThreadPoolExecutor,
    ) -> None:
        self.sock = sock
        self.session = session
        #: How the channel is protected, for status and logs.
        self.security = (f"TLS ({sock.version()}, certificates)" if isinstance(sock, tlsmod.TLSStream)
                         else "pre-shared key (authenticated, not encrypted)")
        self.local = local
        self.remote = remote
        self.address = address
        self.options = options
        self.handlers = handlers
        self.heartbeat = HeartbeatStats()
        self.last_seen = time.monotonic()
        self.connected_at = time.monotonic()
        self.closed = threading.Event()
        self.close_reason = ""
        #: True when the peer closed on purpose (it sent ``bye``), not a loss
        self.closed_by_peer = False
        self._executor = executor
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._hb_ids = itertools.count(1)
        self._pending: dict[int, Future[Body]] = {}
        self._pending_lock = threading.Lock()
        self._close_callbacks: list[Callable[[PeerConnection], None]] = []
        self._threads: list[threading.Thread] = []
        self.log = LOG.getChild(remote.replace(".", "_"))
        sock.settimeout(options.frame_timeout)  # bounds sendall; reads use select deadlines

    def __repr__(self) -> str:
        return f"<PeerConnection {self.local}->{self.remote} {self.address}>"

    @property
    def encrypted(self) -> bool:
        """The channel runs inside TLS: secrets (FT-link keys) may travel in it."""
        return isinstance(self.sock, tlsmod.TLSStream)

    def start(self) -> None:
        for name, target in (("rx", self._reader), ("hb", self._heartbeat_loop)):
            t = threading.Thread(target=target, name=f"cujud-peer-{self.remote}-{name}", daemon=True)
            self._threads.append(t)
            t.start()

    def on_close(self, callback: Callable[[PeerConnection], None]) -> None:
        self._close_callbacks.append(callback)
        if self.closed.is_set():
            callback(self)

    # --- sending ---

    def _send(self, body: Body) -> None:
        data = _encode(body)
        if len(data) + SEQ_BYTES + MAC_BYTES > self.options.max_frame:
            raise PeerError(f"message of {len(data)} bytes exceeds the frame limit {self.options.max_frame}")
        failure: OSError | None = None
        with self._send_lock:
            if self.closed.is_set():
                raise PeerError(f"connection to {self.remote} is closed: {self.close_reason}")
            try:
                write_frame(self.sock, self.session.seal(data))
            except OSError as err:
                failure = err
        if failure is not None:  # close() takes the send lock itself
            self.close(f"send failed: {failure}")
            raise PeerError(f"cannot send to {self.remote}: {failure}") from failure

    def notify(self, kind: str, body: Body | None = None) -> None:
        self._send({"k": "note", "t": kind, "b": body or {}})

    def request(self, kind: str, body: Body | None = None, timeout: float = 10.0) -> Body:
        """Send a request and wait for its response; PeerError on error, timeout or close."""
        rid = next(self._ids)
        future: Future[Body] = Future()
        with self._pending_lock:
            self._pending[rid] = future
        try:
            self._send({"k": "req", "id": rid, "t": kind, "b": body or {}})
            return future.result(timeout)
        except FutureTimeout:
            raise PeerError(f"{self.remote} did not answer {kind!r} within {timeout:g} s") from None
        finally:
            with self._pending_lock:
                self._pending.pop(rid, None)

    # --- receiving ---

    def _reader(self) -> None:
        reason = "closed"
        try:
            while not self.closed.is_set():
                payload = read_frame(
                    self.sock, self.options.max_frame, time.monotonic() + self.options.idle_timeout,
                    self.options.frame_timeout,
                )
                body = _decode(self.session.open(payload))
                self.last_seen = time.monotonic()
                self._dispatch(body)
        except _Goodbye as bye:
            self.closed_by_peer = True
            reason = f"the peer closed the connection: {bye}"
            self.log.info("peer %s at %s: %s", self.remote, self.address, reason)
        except PeerAuthError as err:
            reason = f"rejected: {err}"
            self.log.warning("peer %s at %s: %s; connection closed", self.remote, self.address, reason)
        except (PeerError, OSError) as err:
            reason = str(err)
            if not self.closed.is_set():
                self.log.warning("peer %s at %s: %s; connection closed", self.remote, self.address, reason)
        self.close(reason, tell_peer=False)

    def _dispatch(self, msg: Body) -> None:
        kind = msg.get("k")
        if kind == "res":
            rid = msg.get("id")
            with self._pending_lock:
                future = self._pending.get(rid) if isinstance(rid, int) else None
            if future is None:
                self.log.debug("response to unknown or expired request %r", rid)
                return
            if msg.get("ok") is True and isinstance(msg.get("b"), dict):
                future.set_result(msg["b"])
            else:
                future.set_exception(PeerError(f"{self.remote}: {str(msg.get('err'))[:500]}"))
            return
        name, body = msg.get("t"), msg.get("b")
        if not isinstance(name, str) or not isinstance(body, dict):
            raise PeerError(f"malformed message (kind {str(kind)[:20]!r})")
        if kind == "note":
            self._on_note(name, body)
        elif kind == "req" and isinstance(msg.get("id"), int):
            self._executor.submit(self._serve, msg["id"], name, body)
        else:
            raise PeerError(f"malformed message (kind {str(kind)[:20]!r})")

    def _on_note(self, name: str, body: Body) -> None:
        if name == "hb":
            self.notify("hb_ack", {"n": body.get("n"), "t": body.get("t")})
        elif name == "bye":
            raise _Goodbye(str(body.get("reason", ""))[:200] or "no reason given")
        elif name == "hb_ack":
            sent = body.get("t")
            rtt = time.monotonic() - sent if isinstance(sent, int | float) else -1.0
            if 0.0 <= rtt < self.options.idle_timeout + self.options.heartbeat_interval:
                self._record_rtt(rtt)  # anything else is not an answer to a heartbeat of ours
        else:
            handler = self.handlers.notes.get(name)
            if handler is None:
                self.log.debug("ignoring unknown note %r", name)
                return
            try:
                handler(self, body)
            except Exception as err:
                log_failure(self.log, f"handling note {name!r} from {self.remote}", err)

    def _serve(self, rid: int, name: str, body: Body) -> None:
        handler = self.handlers.requests.get(name)
        reply: Body
        if handler is None:
            reply = {"k": "res", "id": rid, "ok": False, "err": f"unknown request {name!r}"}
        else:
            try:
                reply = {"k": "res", "id": rid, "ok": True, "b": handler(self, body)}
            except CujuError as err:
                reply = {"k": "res", "id": rid, "ok": False, "err": str(err)}
            except Exception as err:
                log_failure(self.log, f"request {name!r} from {self.remote}", err)
                reply = {"k": "res", "id": rid, "ok": False, "err": f"internal error in {name!r}"}
        try:
            self._send(reply)
        except PeerError as err:
            self.log.debug("could not answer %r: %s", name, err)

    # --- heartbeats ---

    def _record_rtt(self, rtt: float) -> None:
        hb = self.heartbeat
        hb.received += 1
        hb.last_rtt = rtt
        hb.min_rtt = rtt if hb.min_rtt is None else min(hb.min_rtt, rtt)
        hb.mean_rtt = rtt if hb.mean_rtt is None else 0.9 * hb.mean_rtt + 0.1 * rtt

    def _heartbeat_loop(self) -> None:
        while not self.closed.wait(self.options.heartbeat_interval):
            try:
                self.notify("hb", {"n": next(self._hb_ids), "t": time.monotonic()})
                self.heartbeat.sent += 1
            except PeerError:
                return

    # --- closing ---

    def close(self, reason: str = "closed locally", *, tell_peer: bool = True) -> None:
        """Close the connection; unless it already broke, tell the peer why (note ``bye``)."""
        with self._send_lock:
            if self.closed.is_set():
                return
            self.close_reason = reason
            self.closed.set()  # first: our reader must not take the peer's reaction for a loss
            if tell_peer:  # best effort: the peer then logs an orderly close, not a loss
                with contextlib.suppress(OSError):
                    self.sock.settimeout(0.5)
                    write_frame(self.sock, self.session.seal(_encode({"k": "note", "t": "bye",
                                                                      "b": {"reason": reason}})))
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self._pending_lock:
            pending = list(self._pending.values())
        for future in pending:
            if not future.done():
                future.set_exception(PeerError(f"connection to {self.remote} closed: {reason}"))
        for callback in self._close_callbacks:
            try:
                callback(self)
            except Exception as err:
                log_failure(self.log, "close callback", err)

    def join(self, timeout: float = 2.0) -> None:
        for t in self._threads:
            if t is not threading.current_thread() and t.ident is not None:
                t.join(timeout)

    def status(self) -> Body:
        hb = self.heartbeat
        return {
            "node": self.remote,
            "address": self.address,
            "security": self.security,
            "connected": not self.closed.is_set(),
            "connected_for_s": round(time.monotonic() - self.connected_at, 3),
            "last_seen_s_ago": round(time.monotonic() - self.last_seen, 3),
            "heartbeats_sent": hb.sent,
            "heartbeats_acked": hb.received,
            "rtt_last_ms": None if hb.last_rtt is None else round(hb.last_rtt * 1e3, 3),
            "rtt_min_ms": None if hb.min_rtt is None else round(hb.min_rtt * 1e3, 3),
            "rtt_mean_ms": None if hb.mean_rtt is None else round(hb.mean_rtt * 1e3, 3),
        }


def _peer_name(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


def connect(
    host: str, port: int, *, node: str, psk: bytes, expect_peer: str | None, handlers: Handlers,
    options: PeerOptions, executor: ThreadPoolExecutor, tls: ssl.SSLContext | None = None,
) -> PeerConnection:
    """Dial a peer, authenticate (TLS when *tls* is a client context, else *psk*), start it."""
    deadline = time.monotonic() + options.handshake_timeout
    try:
        sock = socket.create_connection((host, port), timeout=options.handshake_timeout)
    except OSError as err:
        raise PeerError(f"cannot connect to {host}:{port}: {err.strerror or err}") from err
    address = _peer_name(sock.getpeername())
    stream: Stream = sock
    session: Session | TLSSession
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            stream = tlsmod.TLSStream(sock, tls, server=False)
            session, server = tls_client_handshake(
                stream, node, expect_peer=expect_peer, deadline=deadline, frame_timeout=options.frame_timeout
            )
        else:
            session, server = client_handshake(
                sock, node, psk, expect_peer=expect_peer, deadline=deadline,
                frame_timeout=options.frame_timeout,
            )
    except (PeerError, OSError) as err:
        sock.close()
        if isinstance(err, PeerError):
            raise
        raise PeerError(f"handshake with {address} failed: {err}") from err
    conn = PeerConnection(
        stream, session, local=node, remote=server, address=address, handlers=handlers, options=options,
        executor=executor,
    )
    conn.start()
    return conn


class PeerServer:
    """Accepts peer connections, authenticates them, hands them to ``on_connection``."""

    def __init__(
        self, host: str, port: int, *, node: str, psk: bytes, peers: Mapping[str, object] | None,
        handlers: Handlers, options: PeerOptions, executor: ThreadPoolExecutor,
        on_connection: Callable[[PeerConnection], None], tls: ssl.SSLContext | None = None,
    ) -> None:
        self.node = node
        self._psk = psk
        self._tls = tls
        self._peers = peers
        self.handlers = handlers
        self.options = options
        self._executor = executor
        self._on_connection = on_connection
        self._pending = threading.BoundedSemaphore(options.max_pending)
        self._closed = threading.Event()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(16)
        except OSError as err:
            self._sock.close()
            raise PeerError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
        self.address = self._sock.getsockname()
        self._thread = threading.Thread(target=self._accept_loop, name="cujud-peer-accept", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.address[1])

    def _allowed(self, name: str) -> bool:
        return self._peers is None or name in self._peers

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, addr = self._sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                continue
            if not self._pending.acquire(blocking=False):
                LOG.warning("peer %s: too many handshakes in progress; connection closed", _peer_name(addr))
                sock.close()
                continue
            threading.Thread(
                target=self._handshake, args=(sock, _peer_name(addr)), name="cujud-peer-handshake",
                daemon=True,
            ).start()

    def _handshake(self, sock: socket.socket, address: str) -> None:
        try:
            deadline = time.monotonic() + self.options.handshake_timeout
            sock.settimeout(self.options.frame_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session: Session | TLSSession
            stream: Stream = sock
            if self._tls is not None:
                stream = tls_stream = tlsmod.TLSStream(sock, self._tls, server=True)
                session, client = tls_server_handshake(
                    tls_stream, self.node, allowed=self._allowed, deadline=deadline,
                    frame_timeout=self.options.frame_timeout,
                )
            else:
                session, client = server_handshake(
                    sock, self.node, self._psk, allowed=self._allowed, deadline=deadline,
                    frame_timeout=self.options.frame_timeout,
                )
        except (PeerError, OSError) as err:
            kind = "authentication failed" if isinstance(err, PeerAuthError) else "handshake failed"
            LOG.warning("peer %s: %s: %s; connection closed", address, kind, err)
            sock.close()
            return
        finally:
            self._pending.release()
        if self._closed.is_set():
            sock.close()
            return
        conn = PeerConnection(
            stream, session, local=self.node, remote=client, address=address, handlers=self.handlers,
            options=self.options, executor=self._executor,
        )
        LOG.info("peer %s at %s authenticated (%s)", client, address, conn.security)
        self._on_connection(conn)
        conn.start()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(2.0)
