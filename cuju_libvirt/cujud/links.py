"""This host's view of its configured peers: one :class:`PeerLink` each, and the lookups
the rest of cujud makes through them (the live connection to a peer, how long it was silent).

The daemon keeps the links up to date (it dials and accepts the connections); the
orchestrator and the standby manager only read them.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from cuju_libvirt import config
from cuju_libvirt.cujud import exporter, peer
from cuju_libvirt.errors import CujuError, PeerError


class PeerLink:
    """This host's view of one configured peer: the live connection, if any, and its history."""

    def __init__(self, name: str, address: config.Address, dials: bool) -> None:
        self.name = name
        self.address = address
        self.dials = dials
        self.conn: peer.PeerConnection | None = None
        self.last_error = ""
        self.connects = 0
        #: Wall-clock time the last connection was last heard from, kept after it closed.
        self.last_seen_before: float | None = None
        self.lock = threading.Lock()

    def sample(self) -> exporter.PeerSample:
        """The link as the exporter shows it: up, heartbeat round trip, last contact."""
        with self.lock:
            conn = self.conn
            seen_before = self.last_seen_before
        if conn is None or conn.closed.is_set():
            return exporter.PeerSample(self.name, False, None, seen_before)
        return exporter.PeerSample(self.name, True, conn.heartbeat.last_rtt, wall_clock(conn.last_seen))

    def status(self) -> dict[str, Any]:
        with self.lock:
            conn = self.conn
            info: dict[str, Any] = {
                "node": self.name,
                "configured_address": str(self.address),
                "role_in_connection": "dials" if self.dials else "accepts",
                "connections": self.connects,
                "last_error": self.last_error or None,
            }
        if conn is not None and not conn.closed.is_set():
            info.update(conn.status())
        else:
            info["connected"] = False
        return info


class PeerLinks(dict[str, PeerLink]):
    """Every configured peer by node name."""

    def connection(self, name: str) -> peer.PeerConnection:
        """The live connection to peer *name*; :class:`PeerError` when it is down."""
        link = self.get(name)
        if link is None:
            known = ", ".join(sorted(self)) or "none configured"
            raise CujuError(f"no peer named {name!r} (peers: {known})")
        with link.lock:
            conn = link.conn
        if conn is None or conn.closed.is_set():
            why = f": {link.last_error}" if link.last_error else ""
            raise PeerError(f"peer {name} is not connected{why}")
        return conn

    def silent_for(self, name: str) -> float:
        """Seconds since peer *name* was last heard from; infinity when it is not connected."""
        link = self.get(name)
        if link is None:
            return float("inf")
        with link.lock:
            conn = link.conn
        if conn is None or conn.closed.is_set():
            return float("inf")
        return time.monotonic() - conn.last_seen


def wall_clock(monotonic_at: float) -> float:
    """A ``time.monotonic()`` instant as wall-clock (Unix) time."""
    return time.time() - (time.monotonic() - monotonic_at)
