"""Mutual TLS 1.3 for the peer channel: contexts, a thread-safe stream, certificate identity.

Layout (libvirt's and QEMU's PKI conventions, one directory of our own)::

    /etc/pki/cuju-libvirt/ca-cert.pem            the CA that signs every host of the cluster
    /etc/pki/cuju-libvirt/host-cert.pem          this host: subjectAltName DNS:<node_name>,
                                                 extendedKeyUsage serverAuth, clientAuth
    /etc/pki/cuju-libvirt/private/host-key.pem   its key (mode 0600, root)

A host is authorised by the identity in its certificate: the certificate must be signed by
the configured CA, be valid now, and name the host's ``node_name`` (a subjectAltName DNS
entry, or the subject CN when the certificate has no DNS names). The server checks that
the client's certificate names the node it says it is and that the node is one of its
``peers``; the client checks that the server's certificate names the peer it dialled.

Python's :class:`ssl.SSLSocket` must not be read and written from two threads at once
(OpenSSL forbids concurrent use of one connection), and a peer connection has a reader
thread and writers on any thread. :class:`TLSStream` therefore runs the TLS engine on
memory BIOs under one lock, and does the socket I/O itself: a reader that waits for data
never holds the lock, so writers are never blocked by it.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cuju_libvirt.errors import ConfigError, PeerAuthError, PeerError

#: The inner protocol spoken once TLS is up (``hello``/``welcome`` only; TLS seals the frames).
PROTOCOL = "cuju-peer-tls/1"
_CHUNK = 1 << 16


def make_context(*, server: bool, ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A TLS 1.3-only context that presents our certificate and requires the peer's."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the peer is named by its node name, checked in peer_identity
    ctx.verify_mode = ssl.CERT_REQUIRED
    for key, path in (("tls_ca_file", ca_file), ("tls_cert_file", cert_file), ("tls_key_file", key_file)):
        if not path.is_file():
            raise ConfigError(f"{key} {path} does not exist; create the host's certificates as "
                              "docs/security.md shows, or set peer_tls: off (pre-shared key)")
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"tls_ca_file {ca_file}: not a PEM CA certificate: {err}") from err
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"tls_cert_file {cert_file} / tls_key_file {key_file}: cannot load the "
                          f"certificate and its key (do they belong together?): {err}") from err
    return ctx


@dataclass(frozen=True)
class Contexts:
    """This host's two TLS roles on the peer channel: accepting and dialling."""

    server: ssl.SSLContext
    client: ssl.SSLContext

    @classmethod
    def load(cls, *, ca_file: Path, cert_file: Path, key_file: Path) -> Contexts:
        files = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
        return cls(make_context(server=True, **files), make_context(server=False, **files))


def cert_names(cert: dict[str, Any]) -> tuple[str, ...]:
    """The identities a certificate (``getpeercert()``'s dict) vouches for: DNS SANs, else CN."""
    dns = tuple(str(value) for kind, value in cert.get("subjectAltName", ()) if kind == "DNS")
    if dns:
        return dns
    return tuple(str(value) for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName")


def wait_readable(sock: socket.socket | TLSStream, deadline: float, what: str) -> None:
    """Return once ``sock`` has something to read (for a :class:`TLSStream`: decrypted bytes
    or raw ones); :class:`PeerError` "timed out WHAT" once ``deadline`` (monotonic) passes."""
    while not (isinstance(sock, TLSStream) and sock.pending()):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PeerError(f"timed out {what}")
        ready, _, _ = select.select([sock], [], [], remaining)
        if ready:
            return


class TLSStream:
    """A TLS connection over a connected socket, safe for one reader and many writers.

    Socket-like where :mod:`.peer` needs it: :meth:`recv` (``None`` when the bytes that
    arrived did not complete a record yet), :meth:`pending`, :meth:`sendall`,
    :meth:`fileno`, :meth:`settimeout`, :meth:`shutdown`, :meth:`close`, :meth:`getpeername`.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, *, server: bool) -> None:
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=server)
        self._lock = threading.Lock()
        self._plain = bytearray()

    # --- handshake ---

    def handshake(self, deadline: float) -> None:
        """Run the TLS handshake; :class:`PeerAuthError` when a certificate is refused."""
        while True:
            with self._lock:
                try:
                    self._tls.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                except ssl.SSLCertVerificationError as err:
                    self._flush_locked()  # our alert tells the peer why
                    hint = _VERIFY_HINTS.get(err.verify_code, "")
                    raise PeerAuthError("TLS: the peer's certificate was refused: "
                                        f"{err.verify_message}{hint}") from err
                except ssl.SSLError as err:
                    self._flush_locked()
                    raise _tls_failure(err) from err
                self._flush_locked()
            if done:
                # the peer's first records may have come with its last handshake flight
                self._decrypt(b"")
                return
            try:
                more = self._feed(deadline, "the TLS handshake")
            except ConnectionError as err:
                more = False
                why = err.strerror or str(err)
            else:
                why = "closed"
            if not more:
                raise PeerAuthError(f"connection {why} during the TLS handshake: the peer does not "
                                    "speak TLS or refused us (is it configured with peer_tls: on?)")

    def peer_cert(self) -> dict[str, Any]:
        cert = self._tls.getpeercert()
        if not cert:
            raise PeerAuthError("TLS: the peer presented no certificate")
        return dict(cert)

    def version(self) -> str:
        return self._tls.version() or "?"

    # --- data ---

    def pending(self) -> int:
        return len(self._plain)

    def recv(self, n: int) -> bytes | None:
        """Up to *n* decrypted bytes; ``b""`` at EOF; ``None`` when no whole record arrived."""
        if not self._plain:
            data = self.sock.recv(_CHUNK)
            if not data:
                return b""
            self._decrypt(data)
            if not self._plain:
                return None
        out = bytes(self._plain[:n])
        del self._plain[:n]
        return out

    def sendall(self, data: bytes) -> None:
        with self._lock:
            try:
                self._tls.write(data)
            except ssl.SSLError as err:
                raise OSError(f"TLS write failed: {err}") from err
            self._flush_locked()

    # --- socket-like ---

    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def getpeername(self) -> Any:
        return self.sock.getpeername()

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()

    # --- internals ---

    def _decrypt(self, data: bytes) -> None:
        with self._lock:
            if data:
                self._in.write(data)
            while True:
                try:
                    chunk = self._tls.read(_CHUNK)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    break
                except ssl.SSLError as err:
                    raise PeerAuthError(f"TLS: record rejected: {err.reason or err}") from err
                if not chunk:
                    break
                self._plain += chunk
            self._flush_locked()  # post-handshake messages (session tickets, key updates)

    def _flush_locked(self) -> None:
        data = self._out.read()
        if data:
            self.sock.sendall(data)

    def _feed(self, deadline: float, what: str) -> bool:
        wait_readable(self.sock, deadline, f"in {what}")
        data = self.sock.recv(_CHUNK)
        if not data:
            return False
        with self._lock:
            self._in.write(data)
        return True


#: X509 verify codes whose OpenSSL wording does not say what an operator should check.
_VERIFY_HINTS = {
    2: " (not signed by the cluster's CA, tls_ca_file)",
    19: " (a self-signed certificate, not signed by the cluster's CA, tls_ca_file)",
    20: " (not signed by the cluster's CA, tls_ca_file)",
    21: " (not signed by the cluster's CA, tls_ca_file)",
    9: " (check the clocks of both hosts)",
    10: " (renew the peer's certificate)",
}

#: OpenSSL's reasons when the other side sent something that is not TLS.
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_EOF_WHILE_READING",
                      "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"})


def _tls_failure(err: ssl.SSLError) -> PeerError:
    reason = err.reason or str(err)
    if reason in _NOT_TLS:
        return PeerAuthError(f"TLS handshake failed ({reason}): the peer does not speak TLS "
                             "(is it configured with peer_tls: on?)")
    if "ALERT" in reason or "CERTIFICATE" in reason:
        return PeerAuthError(f"TLS handshake failed: the peer refused us ({reason}); check that "
                             "both hosts' certificates are signed by the same CA and still valid")
    return PeerAuthError(f"TLS handshake failed: {reason}")
