"""The backup side of cujud: hot standbys created through this host's own libvirt.

The primary's cujud asks (peer request ``standby-create``) for a standby of a domain. This
host starts the very same domain as a *transient* domain, paused, with ``-incoming defer``
(its QEMU waits for state), finds its RAM file, connects to its direct QMP socket and
waits on the FT-link listener (``ft_listen``) for the primary's data connection, which
proves itself with a one-time token handed out over the authenticated peer channel.
:class:`~cuju_libvirt.ft_engine.epoch.BackupEngine` then receives epochs into the RAM file.

Failure detection (per standby, every few ms): the primary counts as dead only when
*both* paths are silent for ``heartbeat-timeout-ms``: the FT link (no epoch applied, or
the link broken) and the peer control channel (no frame, heartbeats included, or no
connection). The primary's cujud also reports a crash of its QEMU at once
(``primary-crashed``): then the standby takes over without waiting.

Every decision about one standby is taken under its lock, so an ``abandon`` (the primary
gave up on this standby and will release its held output) and a takeover exclude each
other: whichever comes first wins, and the other side is told.

With the cluster witness (``etcd_endpoints``, :mod:`cuju_libvirt.cujud.coord`) a standby is
paired at a *generation* (in ``standby-create`` and in the FT-link handshake) and resumes
only after winning the ownership record's compare-and-swap at that generation; a lost race
drops it. When etcd does not answer, silence alone never resumes it (the primary may have
won the record and released its output): it waits and asks again, and refuses to promise
anything meanwhile. The primary's own word (``primary-crashed``) or an operator's still
resume it without an answer, as in two-host mode; the record is brought up to date later.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import libvirt
from lxml import etree

from cuju_libvirt import disk_server, fitness
from cuju_libvirt.cujud import records
from cuju_libvirt.cujud.coord import OwnershipStore
from cuju_libvirt.cujud.disks import (
    backup_replicas,
    disk_targets,
    left_replicas,
    stop_servers,
    take_over_replica,
)
from cuju_libvirt.cujud.qemu_process import qemu_pid, ram_backing
from cuju_libvirt.cujud.virt import LibvirtConnection, LifecycleEvent, LinkState, translate
from cuju_libvirt.errors import CoordError, CujuError, StateError
from cuju_libvirt.ft_engine import linkkeys
from cuju_libvirt.ft_engine.devstate import MachineProfile, standby_profile
from cuju_libvirt.ft_engine.epoch import BackupEngine
from cuju_libvirt.ft_engine.linkkeys import LinkKeys
from cuju_libvirt.ft_engine.state import FTMachine, FTState, Role
from cuju_libvirt.ft_engine.stats import DomainStats
from cuju_libvirt.qmp import QMPClient

LOG = logging.getLogger(__name__)
S = FTState
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: Marks a standby's XML (the hook sees it and leaves such a domain alone). The device-state
#: blob has no configuration section (``xen-save-devices-state``): the standby must not expect one.
INCOMING_ARGS = ("-incoming", "defer", "-global", "migration.send-configuration=off")
TOKEN_BYTES = 32
#: The FT-link handshake: the one-time token, then the pairing's generation (8 bytes, big-endian).
GENERATION_BYTES = 8
HELLO_BYTES = TOKEN_BYTES + GENERATION_BYTES
DETECT_INTERVAL = 0.005
#: FT-link connections may take this long to send their token (s) ...
HANDSHAKE_TIMEOUT = 2.0
#: ... and at most this many may be in that handshake at once (as on the peer channel).
MAX_PENDING = 16
#: How often an undecided claim (no answer from etcd) is asked again (s).
CLAIM_RETRY = 0.25
#: How often a standby left by an earlier cujud asks the primary's host again (s).
SETTLE_RETRY = 0.5
#: ... and how long it waits for the peer channel (re)connecting after the restart before it
#: says in a WARNING that it cannot decide (s).
SETTLE_WARN_AFTER = 5.0


def standby_xml(xml: str) -> str:
    """The domain XML with ``-incoming defer`` added to its ``<qemu:commandline>``, and
    ``<seclabel model='dac' relabel='no'/>`` on every disk image's ``<source>`` (not on a
    served disk's NBD source).

    The disks are the primary's (the same images, shared by both hosts), and the primary's
    libvirt owns their labels: with dynamic ownership, this host's libvirt would otherwise
    give an image back to its original owner (root) when the standby's QEMU stops, and the
    primary's QEMU, which reopens its images when it resumes after each epoch's device-state
    save, would fail with "Permission denied" and stay paused.
    """
    root = etree.fromstring(xml.encode())
    # A served disk (type='network': the NBD socket of its block server) has no image file to
    # relabel, and libvirt's schema refuses a seclabel on a network <source>.
    for disk in root.iterfind("devices/disk"):
        source = disk.find("source")
        if source is None or disk.get("type") == "network":
            continue
        if not any(label.get("model") == "dac" for label in source.iterfind("seclabel")):
            etree.SubElement(source, "seclabel", model="dac", relabel="no")
    q = f"{{{QEMU_NS}}}"
    cmd = root.find(f"{q}commandline")
    if cmd is None:
        cmd = etree.SubElement(root, f"{q}commandline", nsmap={"qemu": QEMU_NS})
    # A VM that failed over to its standby keeps the standby's -incoming in its live XML
    # until its next start: re-protected from there, it must not get a second one.
    if INCOMING_ARGS[0] not in [arg.get("value") for arg in cmd.iterfind(f"{q}arg")]:
        for value in INCOMING_ARGS:
            etree.SubElement(cmd, f"{q}arg").set("value", value)
    return etree.tostring(root, encoding="unicode")


def is_standby_xml(xml: bytes) -> bool:
    """True for the XML of a standby (the hook's quick test, no XML parsing)."""
    return b"value='-incoming'" in xml or b'value="-incoming"' in xml


class FTListener:
    """Accepts FT-link data connections; each must start with the token of a standby.

    One thread accepts and reads the tokens of every connection in its handshake (a
    selector, no thread per connection): at most ``max_pending`` connections may be in
    their handshake at once (more are closed at once), and each must send its token
    within ``handshake_timeout`` seconds. Only a connection with a valid token gets a
    thread of its own (the standby's engine starts on it). So idle or slow connections
    cost one descriptor each for a bounded time, never a thread.
    """

    def __init__(self, host: str, port: int, *, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_pending: int = MAX_PENDING) -> None:
        self._server = socket.create_server((host, port), reuse_port=False)
        self._server.setblocking(False)
        self.handshake_timeout = handshake_timeout
        self.max_pending = max_pending
        #: what a connection must open with -> (its token, who takes the connection)
        self._pending: dict[bytes, tuple[bytes, Callable[[socket.socket, int], None]]] = {}
        self._wire: dict[bytes, bytes] = {}  # token -> what its connection opens with
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        #: Connections closed for want of a token in time, and refused over ``max_pending``.
        self.timed_out = 0
        self.refused = 0
        self._last_refusal_log = 0.0
        self._thread = threading.Thread(target=self._serve, name="cujud-ft-listen", daemon=True)
        self._thread.start()
        LOG.info("FT link listening on %s:%d", host, self.port)

    @property
    def port(self) -> int:
        return int(self._server.getsockname()[1])

    def expect(self, on_connect: Callable[[socket.socket, int], None], secret: bytes | None = None) -> str:
        """A one-time token for one connection (hex, for the primary, inside the peer channel).
        With the link's ``secret`` the connection must open with its admission value
        (:func:`~cuju_libvirt.ft_engine.linkkeys.admission`), so the token never crosses the link."""
        token = secrets.token_bytes(TOKEN_BYTES)
        wire = token if secret is None else linkkeys.admission(secret, token)
        with self._lock:
            self._pending[wire] = (token, on_connect)
            self._wire[token] = wire
        return token.hex()

    def forget(self, token: str) -> None:
        with self._lock:
            wire = self._wire.pop(bytes.fromhex(token), None)
            if wire is not None:
                self._pending.pop(wire, None)

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._server, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        greeting: dict[socket.socket, tuple[Any, float, bytearray]] = {}
        try:
            while not self._closed.is_set():
                now = time.monotonic()
                first = min((deadline for _, deadline, _ in greeting.values()), default=None)
                for key, _ in sel.select(None if first is None else max(0.0, first - now)):
                    if key.fileobj is self._wake_r:
                        return
                    if key.fileobj is self._server:
                        self._accept(sel, greeting)
                    else:
                        self._read_token(sel, greeting, cast(socket.socket, key.fileobj))
                now = time.monotonic()
                for sock in [s for s, (_, deadline, _) in greeting.items() if deadline <= now]:
                    addr = greeting.pop(sock)[0]
                    sel.unregister(sock)
                    sock.close()
                    self.timed_out += 1
                    LOG.debug("FT link connection from %s dropped: no token within %.1f s", addr,
                              self.handshake_timeout)
        finally:
            for sock in greeting:
                sock.close()
            sel.close()

    def _accept(self, sel: selectors.BaseSelector, greeting: dict[socket.socket, tuple[Any, float, bytearray]]
                ) -> None:
        while True:
            try:
                sock, addr = self._server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # closed
            if len(greeting) >= self.max_pending:
                sock.close()
                self.refused += 1
                now = time.monotonic()
                if now - self._last_refusal_log >= 10.0:
                    self._last_refusal_log = now
                    LOG.warning("FT link: %d connections are in their handshake already; refusing more "
                                "(%d refused so far, e.g. from %s)", len(greeting), self.refused, addr)
                continue
            sock.setblocking(False)
            greeting[sock] = (addr, time.monotonic() + self.handshake_timeout, bytearray())
            sel.register(sock, selectors.EVENT_READ)

    def _read_token(self, sel: selectors.BaseSelector,
                    greeting: dict[socket.socket, tuple[Any, float, bytearray]], sock: socket.socket) -> None:
        """Read what arrived of the hello (token, then generation); hand a complete, valid one over."""
        addr, _, hello = greeting[sock]
        try:
            chunk = sock.recv(HELLO_BYTES - len(hello))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            chunk, why = b"", str(err)
        else:
            why = "closed before its token and generation"
        if chunk:
            hello += chunk
            if len(hello) < HELLO_BYTES:
                return
        del greeting[sock]
        sel.unregister(sock)
        if not chunk:  # a probe or a port scan, not a primary: no line above DEBUG for each
            LOG.debug("FT link connection from %s dropped: %s", addr, why)
            sock.close()
            return
        token, generation = bytes(hello[:TOKEN_BYTES]), int.from_bytes(hello[TOKEN_BYTES:], "big")
        with self._lock:
            entry = self._pending.pop(token, None)
            if entry is not None:
                del self._wire[entry[0]]
        handler = None if entry is None else entry[1]
        if handler is None:
            LOG.warning("FT link connection from %s refused: unknown or used token", addr)
            sock.close()
            return
        sock.setblocking(True)
        threading.Thread(target=self._hand_over, args=(handler, sock, addr, generation), name="cujud-ft-link",
                         daemon=True).start()

    @staticmethod
    def _hand_over(handler: Callable[[socket.socket, int], None], sock: socket.socket, addr: Any,
                   generation: int) -> None:
        try:
            handler(sock, generation)
        except Exception as err:
            LOG.error("FT link connection from %s: %s", addr, err)
            LOG.debug("details", exc_info=True)
            sock.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(5.0)
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._wake_r.close()
        self._wake_w.close()


class Standby:
    """One hot standby on this host and the decisions about it (under :attr:`lock`)."""

    def __init__(self, manager: StandbyManager, *, name: str, uuid: str, peer: str, xml: str,
                 persistent_xml: str, timeout_s: float, auto_failover: bool, generation: int = 0,
                 persistent: bool = True) -> None:
        self.manager = manager
        self.name = name
        self.uuid = uuid
        self.peer = peer
        self.xml = xml
        self.persistent_xml = persistent_xml
        #: False: the VM is transient on the primary (virsh undefine), so it is after a failover too.
        self.persistent = persistent
        self.timeout_s = timeout_s
        self.auto_failover = auto_failover
        #: The ownership generation this standby was paired at (0: no witness).
        self.generation = generation
        #: The primary's replicated disk sizes (standby-create), in its disk order.
        self.disk_sizes: list[int] = []
        #: The replica images, (path, size), served and applied to (docs/disks.md).
        self.replicas: list[tuple[str, int]] = []
        #: The primary's claim per disk (standby-create), and this host's answer: the replica
        #: id and whether it was kept for a resync of only what changed (cujud/disks.py).
        self.disk_claims: list[dict[str, Any]] = []
        self.disk_answers: list[dict[str, Any]] = []
        #: The primary's format per disk (standby-create; cujud/disks.py disk_formats).
        self.disk_formats: list[dict[str, Any]] = []
        #: A claim was sent and etcd gave no answer: it may have been applied. Until a later
        #: claim answers, this standby neither resumes nor promises to stay down.
        self.undecided = False
        self.lock = threading.RLock()
        self.machine = FTMachine(name, Role.BACKUP)
        self.stats = DomainStats(name, uuid, "backup", peer=peer, generation=generation)
        self.log = LOG.getChild(name.replace(".", "_"))
        self.engine: BackupEngine | None = None
        self.qmp: QMPClient | None = None
        self.profile: MachineProfile | None = None
        self.link: socket.socket | None = None
        self.token = ""
        #: The FT link's secret (None: the link runs in the clear); set before create().
        self.link_secret: bytes | None = None
        self.abandoned = False
        self.taken_over = False
        #: The epoch the failover resumed from (None until it did): the old primary's chardev
        #: server releases its held serial output up to it and drops the rest.
        self.resumed_epoch: int | None = None
        self._done = threading.Event()
        #: Set once an abandoned standby's QEMU is destroyed and it is forgotten.
        self.gone = threading.Event()
        self._last_epoch = 0
        self._last_progress = time.monotonic()
        #: Found at start-up from its record (an earlier cujud created it and died): paused
        #: until the peer or the witness says who owns the VM (:meth:`settle_after_restart`).
        self.recovering = False
        #: The primary's word that arrived while recovering ('ceded': its QEMU crashed).
        self.peer_word: str | None = None
        self._manual_told = False

    # -- the record (what a restarted cujud needs) ------------------------------------------

    def save_record(self) -> None:
        """Written before the first epoch can arrive: a cujud that dies from then on leaves a
        standby its successor must settle with the peer, never destroy unasked."""
        records.write(self.manager.state_dir, records.STANDBYS, self.uuid, domain=self.name, peer=self.peer,
                      xml=self.xml, persistent_xml=self.persistent_xml, persistent=self.persistent,
                      timeout_ms=round(self.timeout_s * 1e3), auto_failover=self.auto_failover,
                      generation=self.generation, disk_sizes=self.disk_sizes)

    @classmethod
    def from_record(cls, manager: StandbyManager, rec: dict[str, Any]) -> Standby:
        """A standby an earlier cujud of this host created (its record), not yet reopened."""
        sb = cls(manager, name=str(rec["domain"]), uuid=str(rec["uuid"]), peer=str(rec["peer"]),
                 xml=str(rec["xml"]), persistent_xml=str(rec["persistent_xml"]),
                 timeout_s=int(rec["timeout_ms"]) / 1e3, auto_failover=bool(rec["auto_failover"]),
                 generation=int(rec["generation"]), persistent=bool(rec["persistent"]))
        sb.disk_sizes = [int(n) for n in rec["disk_sizes"]]
        sb.recovering = True
        return sb

    # -- creation ----------------------------------------------------------------------------

    def create(self) -> str:
        """Start the paused standby and wait for the primary's link; returns the link token."""
        virt = self.manager.libvirt
        # The standby QEMU opens its disks over NBD at start: their replicas must be served.
        self.replicas, self.disk_answers = backup_replicas(
            self.uuid, self.xml, self.disk_sizes, self.manager.disk_replica_dir, claims=self.disk_claims,
            receiver_journal=str(self._state_path()) + ".journal", formats=self.disk_formats,
            state_dir=self.manager.state_dir)
        try:
            with translate(f"creating the standby of {self.name}"):
                virt.conn.createXML(standby_xml(self.xml), libvirt.VIR_DOMAIN_START_PAUSED)
        except BaseException:
            stop_servers(self.uuid, self.xml)
            raise
        try:
            pid = qemu_pid(self.name)
            if pid is None:
                raise CujuError(f"standby {self.name} started but its QEMU pid file is missing")
            ram = ram_backing(pid)
            self.qmp = _connect_qmp(fitness.qmp_socket_path(self.name), 10.0)
            # What the primary compares with its own QEMU before it syncs a single page.
            self.profile = standby_profile(self.qmp)
            self.ram_path = ram.path
            self.token = self.manager.ft.expect(self._linked, self.link_secret)
        except BaseException:
            self._destroy_domain()
            raise
        self.log.info("standby created (paused, -incoming defer, RAM %s, %d MiB); waiting for the FT link",
                      ram.path, ram.size >> 20)
        return self.token

    def _state_path(self) -> Path:
        """The committed device state (its receiver journal beside it, ``.journal``)."""
        return self.manager.state_dir / "standby" / f"{self.uuid}.devstate"

    def _linked(self, sock: socket.socket, generation: int) -> None:
        with self.lock:
            if self.abandoned:
                raise StateError(f"standby {self.name} was abandoned before its link arrived")
            if generation != self.generation:
                raise StateError(f"FT link of generation {generation} for the standby of {self.name}, "
                                 f"paired at generation {self.generation}: refused")
            assert self.qmp is not None
            self.link = sock
            state_path = self._state_path()
            state_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.engine = BackupEngine(
                qmp=self.qmp, ram_path=self.ram_path, link=sock, device_state_path=str(state_path),
                stats=self.stats, machine=self.machine, tag=self.name, io_timeout=30.0,
                standby=self.profile, disks=self.replicas,
                link_keys=None if self.link_secret is None else LinkKeys.derive(self.link_secret).backup,
            )
            self.engine.start()
            self._last_progress = time.monotonic()
        threading.Thread(target=self._detect, name=f"cujud-detect-{self.name}", daemon=True).start()
        self.log.info("FT link from the primary connected; receiving")

    # -- after a restart of cujud ------------------------------------------------------------------

    def reopen(self) -> bool:
        """Take back the standby an earlier cujud left (libvirt is connected): its QEMU, RAM
        file, replicas and journal; replay the committed epochs. False when there is nothing
        to take back (the standby QEMU is gone, or was dropped meanwhile)."""
        with self.lock:
            if self.abandoned or self.engine is not None:
                return False
            try:
                dom = self.manager.libvirt.conn.lookupByUUIDString(self.uuid)
                if not dom.isActive() or not is_standby_xml(dom.XMLDesc(0).encode()):
                    raise CujuError("its QEMU no longer runs")
                pid = qemu_pid(self.name)
                if pid is None:
                    raise CujuError("its QEMU pid file is missing")
                self.ram_path = ram_backing(pid).path
                self.replicas = left_replicas(self.uuid, self.xml, self.disk_sizes)
                self.qmp = _connect_qmp(fitness.qmp_socket_path(self.name), 10.0)
                self.profile = standby_profile(self.qmp)
                self.engine = BackupEngine(
                    qmp=self.qmp, ram_path=self.ram_path, link=None,
                    device_state_path=str(self._state_path()), stats=self.stats, machine=self.machine,
                    tag=self.name, standby=self.profile, disks=self.replicas)
                epoch = self.engine.recover()
            except (CujuError, libvirt.libvirtError, OSError) as err:
                self.log.warning("the standby an earlier cujud left could not be taken back (%s): "
                                 "dropping it", err)
                self.log.debug("details", exc_info=True)
                if self.qmp is not None:
                    self.qmp.close()
                    self.qmp = None
                self.engine = None
                self.recovering = False
                self.abandon("it could not be taken back after cujud restarted")
                return False
        self.log.info("an earlier cujud left this standby (paused, %s); asking %s whether the primary still "
                      "runs before anything else", f"committed epoch {epoch}" if self.engine.consistent()
                      else "no consistent epoch yet", self.peer)
        return True

    def settle_after_restart(self) -> None:
        """Decide what the reopened standby is now, from the primary host's word (``vm-state``)
        or, when that host does not answer, the witness; never on a guess:

        * the primary runs the VM, or stopped it on purpose -> drop the standby;
        * its copy is gone (its QEMU crashed: it ceded the VM; or its cujud restarted and
          the VM no longer runs there) -> take over, as a failover does;
        * no answer: with the witness, race for the ownership record (the fencing token) once
          the peer is silent for the heartbeat timeout; without one, the standby stays paused
          (one WARNING) and asks again until the peer answers or an operator takes over."""
        warned = False
        silent_since = time.monotonic()
        delay = 0.0
        while not self._done.wait(delay):
            delay = SETTLE_RETRY
            with self.lock:
                if self.abandoned or self.taken_over:
                    return
            word, why = self.peer_word, "no answer"
            if word is None:
                try:
                    word = str(self.manager.ask_peer(self.peer, "vm-state", {"uuid": self.uuid})["state"])
                except (CujuError, KeyError) as err:
                    why = str(err)
            if word == "runs":
                self._settled_drop(f"{self.peer} runs the VM: this older standby is not needed")
                return
            if word == "stopped":
                self._settled_drop(f"the VM was stopped on purpose on {self.peer}")
                records.remove(self.manager.state_dir, records.CEDED, self.uuid)
                return
            if word in ("ceded", "down"):
                what = "its QEMU died (it ceded the VM)" if word == "ceded" else "the VM no longer runs there"
                if not self._take_over_settled(f"{self.peer} says {what} while cujud here was down",
                                               by_word=True).get("undecided"):
                    return
                continue
            if word == "deciding":  # its QEMU just ended; the primary's cujud is classifying it
                continue
            if self.manager.witness is not None and self.generation:
                if time.monotonic() - silent_since >= self.timeout_s and not self._take_over_settled(
                        f"{self.peer} does not answer ({why}), the witness decides").get("undecided"):
                    return
                continue
            if not warned and time.monotonic() - silent_since >= max(self.timeout_s, SETTLE_WARN_AFTER):
                self.log.warning("cannot tell whether %s still runs the VM (%s) and there is no witness: the "
                                 "standby stays PAUSED (it never resumes on a guess) and asks again until %s "
                                 "answers; if that host is known to be dead: cuju-libvirt takeover %s",
                                 self.peer, why, self.peer, self.name)
                warned = True

    def _settled_drop(self, reason: str) -> None:
        self.recovering = False
        self.abandon(reason)

    def _take_over_settled(self, reason: str, *, by_word: bool = False) -> dict[str, Any]:
        """Take over once settled (``undecided``: not now, ask again)."""
        engine = self.engine
        if engine is None or not engine.consistent():
            self.log.error("%s, but this standby holds no consistent epoch (the primary died during the "
                           "initial synchronisation): nothing to resume", reason)
            self._settled_drop("nothing consistent to resume")
            return {"taken_over": False}
        if not self.auto_failover:
            if not self._manual_told:
                self.log.error("%s; failover='manual': the standby stays paused until an operator runs "
                               "'cuju-libvirt takeover %s'", reason, self.name)
                self._manual_told = True
            return {"taken_over": False, "undecided": True}
        answer = self.take_over(reason, by_word=by_word)
        if not answer.get("undecided"):
            self.recovering = False
        return answer

    # -- failure detection -----------------------------------------------------------------------

    def _detect(self) -> None:
        while not self._done.wait(DETECT_INTERVAL):
            engine = self.engine
            if engine is None:
                continue
            now = time.monotonic()
            applied = engine.last_applied
            if applied != self._last_epoch and engine.link_error is None:
                self._last_epoch = applied
                self._last_progress = now
            ft_silent = now - self._last_progress >= self.timeout_s
            ctl_silent = self.manager.peer_silent_for(self.peer) >= self.timeout_s
            if (ft_silent and ctl_silent) or self.undecided:
                why = (f"no epoch on the FT link and no frame on the peer channel for "
                       f"{self.timeout_s * 1e3:.0f} ms")
                if self.machine.state is S.STANDBY and self.auto_failover:
                    if self.take_over(f"primary declared dead: {why}").get("undecided"):
                        self._done.wait(CLAIM_RETRY)
                        continue
                elif self.machine.state is S.STANDBY:
                    self.log.error("primary declared dead (%s); failover='manual': waiting for an operator",
                                   why)
                else:
                    self.log.error("primary lost during the initial synchronisation (%s): nothing "
                                   "consistent to resume; dropping the standby", why)
                    self.abandon("primary lost before the standby was consistent")
                return

    # -- decisions -------------------------------------------------------------------------------

    def take_over(self, reason: str, *, by_word: bool = False) -> dict[str, Any]:
        """Fail over: resume the standby from the last committed epoch, make it a normal domain.

        With the witness, only after winning the ownership record; ``by_word`` (the primary's
        cujud reported its QEMU dead, or an operator asked) resumes also when etcd does not
        answer, as two-host mode does."""
        with self.lock:
            if self.taken_over:
                return {"taken_over": True}
            if self.abandoned or self.engine is None:
                return {"taken_over": False, "reason": "the standby was abandoned or never linked"}
            verdict = self.manager.claim(self, quiet=self.undecided)
            if verdict == "lost":
                self.undecided = False
                self.abandon("the witness gave the VM to another host: this copy must never resume")
                return {"taken_over": False, "reason": "the witness gave the VM to another host"}
            if verdict == "unknown" and not by_word:
                if not self.undecided:
                    self.log.error("%s, but the witness (etcd) does not answer: the standby stays paused "
                                   "(it never resumes on a guess) and asks again", reason)
                self.undecided = True
                return {"taken_over": False, "undecided": True}
            self.undecided = False
            self.log.warning("TAKING OVER: %s", reason)
            self.taken_over = True  # before the first step: an abandon from now on is refused
            self._done.set()
            records.write(self.manager.state_dir, records.TAKEOVERS, self.uuid, domain=self.name,
                          peer=self.peer, reason=reason, generation=self.generation)
            records.remove(self.manager.state_dir, records.STANDBYS, self.uuid)
            # this host holds the VM now: a 'ceded' record from when it lost it is stale
            records.remove(self.manager.state_dir, records.CEDED, self.uuid)
            if verdict == "unknown":
                self.manager.settle_later(self)
            # The VM's live disks from now on: never a replica's base again, but the old
            # primary's own image may be resynced with only what either side changed.
            for (path, _), target in zip(self.replicas, disk_targets(self.xml), strict=False):
                take_over_replica(path, disk_server.ServerPaths.of(self.uuid, target).journal)
            report = self.engine.failover()
            self.resumed_epoch = report.epoch
            # for the old primary's held serial output, also when this cujud restarts meanwhile
            records.write(self.manager.state_dir, records.TAKEOVERS, self.uuid, domain=self.name,
                          peer=self.peer, reason=reason, generation=self.generation,
                          resumed_epoch=report.epoch)
            self.stats.role = "primary"  # the VM runs here now (unprotected until a new standby)
            try:
                if self.persistent:
                    with translate(f"defining {self.name} after the failover"):
                        self.manager.libvirt.conn.defineXML(self.persistent_xml)
            except CujuError as err:
                self.log.error("the VM runs, but could not be made persistent: %s", err)
            self.log.warning("failover of %s done: epoch %d resumed in %.1f ms; it is a normal domain "
                             "of this host now, UNPROTECTED", self.name, report.epoch, report.total_s * 1e3)
            self.manager.taken_over(self)
            return {"taken_over": True, "epoch": report.epoch}

    def abandon(self, reason: str) -> dict[str, Any]:
        """Drop the standby for good (never to take over in this session)."""
        with self.lock:
            if self.taken_over:
                return {"abandoned": False, "taken_over": True}
            if self.abandoned:
                return {"abandoned": True}
            if self.undecided:  # our claim may have been applied: promise nothing yet
                return {"abandoned": False, "taken_over": False, "undecided": True}
            self.abandoned = True
            self._done.set()
            self.log.info("dropping the standby: %s", reason)
            if self.token:
                self.manager.ft.forget(self.token)
        # The promise (abandoned, under the lock) is what the primary waits for; the slow
        # part (libvirt's destroy) follows on a thread of its own.
        threading.Thread(target=self._teardown, name=f"cujud-drop-{self.name}", daemon=True).start()
        return {"abandoned": True}

    def _teardown(self) -> None:
        if self.engine is not None:
            with contextlib.suppress(Exception):
                self.engine.close()
        if self.link is not None:
            with contextlib.suppress(OSError):
                self.link.shutdown(socket.SHUT_RDWR)
            self.link.close()
        if self.qmp is not None:
            self.qmp.close()
        self._destroy_domain()
        records.remove(self.manager.state_dir, records.STANDBYS, self.uuid)
        with contextlib.suppress(StateError):
            self.machine.move(S.STOPPING)
            self.machine.move(S.STOPPED)
        self.manager.forget(self)
        self.gone.set()

    def _destroy_domain(self) -> None:
        """Destroy the standby's QEMU (never after a takeover: then it is the VM). On the
        old primary host of a re-protected VM the domain is also defined there: destroying
        the standby leaves that definition inactive, as it was before."""
        if self.taken_over:
            return
        with contextlib.suppress(Exception):
            dom = self.manager.libvirt.conn.lookupByUUIDString(self.uuid)
            if dom.isActive() and is_standby_xml(dom.XMLDesc(0).encode()):
                dom.destroy()
        if self.replicas:  # the replicas stay; their servers go with the standby
            with contextlib.suppress(Exception):
                stop_servers(self.uuid, self.xml)


def _no_peer(name: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    raise CujuError(f"no channel to peer {name} ({kind})")


def _connect_qmp(path: str, timeout: float) -> QMPClient:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return QMPClient(path, connect_timeout=2.0)
        except CujuError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class StandbyManager:
    """Every standby on this host, by UUID."""

    def __init__(self, *, libvirt_conn: LibvirtConnection, state_dir: Path, ft_host: str, ft_port: int,
                 peer_silent_for: Callable[[str], float], register: Callable[[DomainStats, FTMachine], None],
                 unregister: Callable[[str], None], notify_peer: Callable[[str, str, dict[str, Any]], None],
                 ask_peer: Callable[[str, str, dict[str, Any]], dict[str, Any]] | None = None,
                 witness: OwnershipStore | None = None, node: str = "",
                 runs_here: Callable[[str], bool] = lambda _uuid: False,
                 on_taken_over: Callable[[Standby], None] = lambda _sb: None,
                 disk_replica_dir: Path = Path("/var/lib/cuju-libvirt/replicas")) -> None:
        self.libvirt = libvirt_conn
        #: Where replicas of disks without a replica= override live (cujud.yaml).
        self.disk_replica_dir = disk_replica_dir
        self.state_dir = state_dir
        self.peer_silent_for = peer_silent_for
        self._register = register
        self._unregister = unregister
        self._notify_peer = notify_peer
        #: A request to a peer's cujud (kind, body) -> its answer; CujuError without one.
        self.ask_peer = ask_peer if ask_peer is not None else _no_peer
        self.witness = witness
        self.node = node
        self._closing = threading.Event()
        #: True if this host's cujud runs ``uuid`` as a primary (a standby of it here is refused).
        self._runs_here = runs_here
        #: Called (on the taking-over thread) once a standby runs the VM: re-protection starts.
        self._on_taken_over = on_taken_over
        self.ft = FTListener(ft_host, ft_port)
        #: The FT-link address a primary connects to (None when ft_listen is a wildcard).
        self.ft_address = None if ft_host in ("", "0.0.0.0", "::") else f"{ft_host}:{self.ft.port}"
        self.standbys: dict[str, Standby] = {}
        self.failed_over: dict[str, Standby] = {}
        self._lock = threading.Lock()
        self._load_records()
        libvirt_conn.add_lifecycle_listener(self._lifecycle)
        libvirt_conn.add_state_listener(self._libvirt_state)

    def close(self) -> None:
        """Drop every standby (the peer channel is still up: a primary that asks is told)."""
        self._closing.set()
        self.ft.close()
        standbys = list(self.standbys.values())
        for sb in standbys:
            sb.abandon("cujud is shutting down")
        for sb in standbys:
            sb.gone.wait(15)

    # -- peer requests -----------------------------------------------------------------------

    def create(self, peer: str, body: dict[str, Any], *, encrypt_link: bool = False) -> dict[str, Any]:
        """A standby for the peer's domain; ``encrypt_link`` (the request came over TLS) adds a
        fresh FT-link secret to the reply (:mod:`~cuju_libvirt.ft_engine.linkkeys`)."""
        name, uuid = str(body["name"]), str(body["uuid"])
        generation = int(body.get("generation", 0))
        if generation and self.witness is None:
            raise CujuError(f"{peer} pairs {name} under the cluster witness (generation {generation}) but "
                            "this cujud has no etcd_endpoints: configure the same etcd on every host")
        with self._lock:
            old = self.standbys.get(uuid)
            if uuid in self.failed_over or self._runs_here(uuid):
                raise StateError(f"{name} runs on this host: it cannot be the backup of a copy on {peer}")
        if old is not None:
            old.abandon("replaced by a new standby of the same domain")
            old.gone.wait(60)
        self._clear_stale_copy(name, uuid, peer)
        sb = Standby(self, name=name, uuid=uuid, peer=peer, xml=str(body["xml"]),
                     persistent_xml=str(body["persistent_xml"]),
                     timeout_s=int(body["heartbeat_timeout_ms"]) / 1e3,
                     auto_failover=body.get("failover", "auto") == "auto", generation=generation,
                     persistent=bool(body.get("persistent", True)))
        # A standby here means the VM runs on the peer: an old takeover record is stale, and
        # so is a 'protected' record (this host is not its primary any more). This host must
        # not start the VM on its own while the peer may run it: 'ceded' says so to the hook
        # (also after a reboot, when the standby is gone), until a takeover here or the
        # primary's word that the VM ended on purpose.
        records.remove(self.state_dir, records.TAKEOVERS, uuid)
        records.remove(self.state_dir, records.PROTECTED, uuid)
        if records.read(self.state_dir, records.CEDED, uuid) is None:
            records.write(self.state_dir, records.CEDED, uuid, domain=name, peer=peer,
                          reason=f"it runs on {peer}, protected by a standby here")
        sb.link_secret = linkkeys.new_secret() if encrypt_link else None
        sb.disk_sizes = [int(n) for n in body.get("disk_sizes", [])]
        sb.disk_claims = [dict(c) if isinstance(c, dict) else {} for c in body.get("disk_claims", [])]
        sb.disk_formats = [dict(c) if isinstance(c, dict) else {} for c in body.get("disk_formats", [])]
        token = sb.create()
        try:
            sb.save_record()
        except OSError:
            sb.abandon("its record could not be written")
            raise
        with self._lock:
            self.standbys[uuid] = sb
        self._register(sb.stats, sb.machine)
        assert sb.profile is not None
        reply: dict[str, Any] = {"token": token, "machine": sb.profile.to_json(),
                                 "ft_address": self.ft_address, "disk_replicas": sb.disk_answers}
        if sb.link_secret is not None:
            reply["link_secret"] = sb.link_secret.hex()
        return reply

    def _clear_stale_copy(self, name: str, uuid: str, peer: str) -> None:
        """Before a standby of ``uuid`` is created here: refuse if this host runs the VM, and
        destroy a standby that no cujud tracks (its cujud died; only its creator may resume it)."""
        try:
            dom = self.libvirt.conn.lookupByUUIDString(uuid)
            active = bool(dom.isActive())
            live = dom.XMLDesc(0).encode() if active else b""
        except libvirt.libvirtError:
            return  # not known here: nothing stale
        took_over = records.read(self.state_dir, records.TAKEOVERS, uuid) is not None
        if active and (took_over or not is_standby_xml(live)):
            raise StateError(f"{name} runs on this host: it cannot be the backup of a copy on {peer}")
        if active:
            LOG.warning("destroying an orphaned standby of %s before a new one (its cujud is gone)", name)
            with translate(f"destroying the orphaned standby of {name}"):
                dom.destroy()

    def abandon(self, body: dict[str, Any]) -> dict[str, Any]:
        uuid = str(body["uuid"])
        with self._lock:
            sb = self.standbys.get(uuid)
        if sb is None:
            taken = records.read(self.state_dir, records.TAKEOVERS, uuid) is not None
            answer = {"abandoned": not taken, "taken_over": taken}
        else:
            answer = sb.abandon(str(body.get("reason", "the primary gave up on this standby")))
        if answer.get("abandoned") and body.get("vm_ended"):
            # stopped on purpose on the peer: it runs nowhere, this host may start it again
            records.remove(self.state_dir, records.CEDED, uuid)
        return answer

    def takeover_epoch(self, body: dict[str, Any]) -> dict[str, Any]:
        """The old primary asks which epoch a takeover resumed from (to settle its held serial
        output): ``{"epoch": N}``, ``{"pending": True}`` while undecided or under way,
        ``{"resumed": False}`` when this host will not resume it, ``{"known": False}`` when an
        earlier cujud of this host began a takeover and no record says where it resumed."""
        uuid = str(body["uuid"])
        with self._lock:
            sb = self.failed_over.get(uuid) or self.standbys.get(uuid)
        if sb is None:  # an earlier cujud of this host may have taken it over
            took = records.read(self.state_dir, records.TAKEOVERS, uuid)
            if took is None:
                return {"resumed": False}
            return {"epoch": int(took["resumed_epoch"])} if "resumed_epoch" in took else {"known": False}
        if sb.abandoned:
            return {"resumed": False}
        if sb.resumed_epoch is not None:
            return {"epoch": sb.resumed_epoch}
        return {"pending": True}

    def deciding(self, uuid: str) -> bool:
        """True while a standby an earlier cujud left is not settled yet: it may still take over."""
        with self._lock:
            sb = self.standbys.get(uuid)
        return sb is not None and sb.recovering

    def holds(self, uuid: str) -> bool:
        """True if this host took the domain over (the old primary must not start it)."""
        with self._lock:
            if uuid in self.failed_over:
                return True
        return records.read(self.state_dir, records.TAKEOVERS, uuid) is not None

    def knows(self, uuid: str) -> bool:
        """True for a domain this host stands by for, or took over (in this cujud's life)."""
        with self._lock:
            return uuid in self.standbys or uuid in self.failed_over

    def primary_crashed(self, body: dict[str, Any]) -> None:
        with self._lock:
            sb = self.standbys.get(str(body["uuid"]))
        if sb is None:
            return
        if sb.recovering:  # an earlier cujud's standby: settle_after_restart acts on the word
            sb.peer_word = "ceded"
            return
        if sb.machine.state is S.STANDBY and sb.auto_failover:
            sb.take_over(f"the primary's cujud reports its QEMU crashed ({body.get('how', '?')})",
                         by_word=True)
        elif sb.machine.state is not S.STANDBY:
            sb.abandon("the primary crashed before the standby was consistent")

    # -- the witness -----------------------------------------------------------------------------

    def claim(self, sb: Standby, *, quiet: bool = False) -> str:
        """Race for ``sb``'s ownership record: ``won``, ``lost``, ``unknown`` (no answer) or
        ``unwitnessed`` (no witness configured, or the pair was made without one)."""
        if self.witness is None or not sb.generation:
            return "unwitnessed"
        try:
            claim = self.witness.claim(sb.uuid, self.node, sb.generation)
        except CoordError as err:
            if not quiet:
                sb.log.warning("claiming the ownership record (generation %d): %s", sb.generation, err)
            return "unknown"
        if not claim.won:
            sb.log.warning("the witness gives %s to %s (generation %d, %s): this standby loses",
                           sb.name, claim.record.owner, claim.record.generation, claim.record.mode)
            return "lost"
        sb.log.info("the witness made this host the owner of %s (generation %d)", sb.name,
                    claim.record.generation)
        sb.generation = claim.record.generation
        return "won"

    def settle_later(self, sb: Standby) -> None:
        """After a takeover on the primary's word without an answer from etcd: bring the
        record up to date once etcd answers (a returning old primary then reads the truth)."""
        def settle() -> None:
            while not self._closing.wait(1.0):
                verdict = self.claim(sb, quiet=True)
                if verdict in {"won", "unwitnessed"}:
                    return
                if verdict == "lost":
                    sb.log.error("the witness records another owner of %s than this host, which runs it "
                                 "since the primary's cujud reported its crash: check both hosts", sb.name)
                    return
        threading.Thread(target=settle, name=f"cujud-settle-{sb.name}", daemon=True).start()

    # -- bookkeeping ---------------------------------------------------------------------------------

    def forget(self, sb: Standby) -> None:
        with self._lock:
            if self.standbys.get(sb.uuid) is sb:
                del self.standbys[sb.uuid]
        with contextlib.suppress(KeyError):
            self._unregister(sb.uuid)

    def taken_over(self, sb: Standby) -> None:
        with self._lock:
            self.standbys.pop(sb.uuid, None)
            self.failed_over[sb.uuid] = sb
        self._on_taken_over(sb)

    def released(self, uuid: str) -> None:
        """This host no longer runs ``uuid`` (it stopped or moved on after a failover here)."""
        with self._lock:
            self.failed_over.pop(uuid, None)
        records.remove(self.state_dir, records.TAKEOVERS, uuid)

    def _load_records(self) -> None:
        """The standbys an earlier cujud of this host created and left (it died): tracked from
        the start, so that no peer request about them is answered as if they did not exist;
        reopened once libvirt is connected (:meth:`_reopen_left`)."""
        for rec in records.read_all(self.state_dir, records.STANDBYS):
            try:
                sb = Standby.from_record(self, rec)
            except (KeyError, TypeError, ValueError) as err:
                LOG.warning("unreadable standby record %s (%s): its standby counts as an orphan",
                            rec.get("uuid"), err)
                with contextlib.suppress(ValueError):
                    records.remove(self.state_dir, records.STANDBYS, str(rec.get("uuid")))
                continue
            self.standbys[sb.uuid] = sb
            self._register(sb.stats, sb.machine)

    def _libvirt_state(self, state: LinkState) -> None:
        if state is LinkState.CONNECTED:
            threading.Thread(target=self._after_connect, name="cujud-orphans", daemon=True).start()

    def _after_connect(self) -> None:
        self._reopen_left()
        self._drop_orphans()

    def _reopen_left(self) -> None:
        """Reopen the standbys an earlier cujud left and settle each with its peer."""
        with self._lock:
            left = [sb for sb in self.standbys.values() if sb.recovering and sb.engine is None]
        for sb in left:
            if sb.reopen():
                threading.Thread(target=sb.settle_after_restart, name=f"cujud-settle-{sb.name}",
                                 daemon=True).start()

    def _drop_orphans(self) -> None:
        """Destroy standbys nobody here tracks and no record names (left by a cujud that died
        before the standby could hold anything): only the cujud that created a standby may
        ever resume it, and that one is gone."""
        try:
            domains = self.libvirt.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT)
        except libvirt.libvirtError as err:
            LOG.warning("could not list domains to find orphaned standbys: %s", err)
            return
        for dom in domains:
            with contextlib.suppress(libvirt.libvirtError):
                with self._lock:
                    tracked = dom.UUIDString() in self.standbys
                if tracked or not is_standby_xml(dom.XMLDesc(0).encode()):
                    continue
                LOG.warning("destroying orphaned standby %s (its cujud is gone; it must never resume)",
                            dom.name())
                dom.destroy()

    def _lifecycle(self, event: LifecycleEvent) -> None:
        if event.event_name != "STOPPED":
            return
        with self._lock:
            sb = self.standbys.get(event.uuid)
            ended = self.failed_over.pop(event.uuid, None)
        if ended is not None:  # the VM this host took over stopped here: its row and metrics go
            ended.log.info("the VM stopped (%s); it is no longer shown", event.detail_name)
            with contextlib.suppress(KeyError):
                self._unregister(ended.uuid)
            return
        if sb is None or sb.taken_over or sb.abandoned:
            return
        sb.log.error("the standby QEMU stopped (%s): the primary runs unprotected until a new standby",
                     event.detail_name)
        threading.Thread(target=self._standby_died, args=(sb,), daemon=True).start()

    def _standby_died(self, sb: Standby) -> None:
        sb.abandon("the standby QEMU stopped")
        with contextlib.suppress(CujuError):
            self._notify_peer(sb.peer, "standby-lost", {"uuid": sb.uuid})
