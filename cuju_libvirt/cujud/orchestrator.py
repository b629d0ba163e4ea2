"""cujud's fault-tolerance orchestration: the primary side of each protected domain, and
the glue between the hook, the peer channel, libvirt and the epoch engine.

Primary side, per domain (:class:`PrimaryDomain`)::

    hook 'started' -> protect: (thread) ask the peer for a standby ('standby-create'),
    connect the FT link with the token it returned, PrimaryEngine: initial sync, epochs.
    The engine fails (QEMU gone, link lost, ack overdue) -> may_release(err) decides:

      QEMU gone, QEMU logged "terminating on signal" or libvirt reports STOPPED with a
        deliberate detail (DESTROYED, SHUTDOWN, SAVED, MIGRATED)  -> deliberate: drop the standby
      QEMU gone otherwise (SIGKILL, crash: libvirt's FAILED/CRASHED or no event in time)
                                          -> crash: 'primary-crashed' to the peer (fast path),
                                             this host cedes the domain (records.CEDED)
      QEMU alive: ask the peer to abandon its standby ('standby-abandon')
        abandoned                         -> release held output, run on unprotected (DEGRADED),
                                             re-protect with backoff
        taken over                        -> FENCE (VM stopped, output held), then destroy it here
        no answer (peer unreachable)      -> FENCE, and ask again until the peer answers

Held output leaves only for acknowledged epochs, or once the peer has *promised* (under its
standby's lock) never to take over in this session. That is the whole split-brain rule:
see docs/failover.md for what it covers and what it does not.

With the cluster witness (``etcd_endpoints``; docs/cluster.md) a pairing first takes a new
generation of the VM's ownership record, and held output may also leave once this host won
the record's compare-and-swap (the peer, which must win the same record to resume, then
never can). On a failure with QEMU alive the primary races that claim before it asks the
peer: won -> release and run on unprotected, lost -> destroy the copy, no answer -> the
two-host rule above.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pwd
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import libvirt
from lxml import etree

from cuju_libvirt import config, fitness
from cuju_libvirt.cujud import cluster, control, coord, events, peer, records
from cuju_libvirt.cujud.disks import disk_formats, primary_disks
from cuju_libvirt.cujud.exporter import ProtectedDomains
from cuju_libvirt.cujud.links import PeerLinks
from cuju_libvirt.cujud.qemu_process import (
    alive,
    ended_on_signal,
    log_offset,
    owner_ids,
    qemu_pid,
    ram_backing,
)
from cuju_libvirt.cujud.standby import Standby, StandbyManager, is_standby_xml
from cuju_libvirt.cujud.virt import DomainEvent, LibvirtConnection, LifecycleEvent, LinkState, translate
from cuju_libvirt.domain_xml import AUTO_PEER, DEFAULT_LINK_PORT, FTSpec, parse_domain, parse_endpoint
from cuju_libvirt.errors import CoordError, CujuError, DomainXMLError, MonitorError, StateError, caused_by
from cuju_libvirt.ft_engine import linkkeys
from cuju_libvirt.ft_engine.chardevs import ChardevHold
from cuju_libvirt.ft_engine.devstate import (
    DevicesChangedError,
    MachineProfile,
    StandbyMismatchError,
    compare_machines,
    describe_machine,
)
from cuju_libvirt.ft_engine.epoch import (
    SUSPENDED_TO_RAM,
    PrimaryConfig,
    PrimaryEngine,
    ReconfiguredError,
    ResumedElsewhereError,
    SuspendedToRAMError,
)
from cuju_libvirt.ft_engine.linkkeys import LinkKeys
from cuju_libvirt.ft_engine.output import leftover_filters, remove_leftovers
from cuju_libvirt.ft_engine.state import FTMachine, FTState, Role
from cuju_libvirt.ft_engine.stats import DomainStats
from cuju_libvirt.qmp import QMPClient

LOG = logging.getLogger(__name__)
S = FTState
#: libvirt STOPPED details that mean somebody stopped the domain on purpose.
DELIBERATE_STOPS = frozenset({"SHUTDOWN", "DESTROYED", "SAVED", "MIGRATED", "FROM_SNAPSHOT"})
#: What each of them means to an operator.
STOP_CAUSES = {
    "SHUTDOWN": "the guest powered off (or virsh shutdown)",
    "DESTROYED": "virsh destroy",
    "SAVED": "virsh save / managedsave",
    "MIGRATED": "virsh migrate",
    "FROM_SNAPSHOT": "a snapshot was reverted",
    "FAILED": "QEMU failed",
    "CRASHED": "the guest crashed",
}
#: How long a dead QEMU's cause may stay unknown before it counts as a crash (s).
CLASSIFY_WAIT = 0.25
#: How long libvirt may take to name the operation behind a "terminating on signal" (s).
DELIBERATE_WAIT = 2.0
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0
STANDBY_CREATE_TIMEOUT = 120.0
QEMU_USER = "libvirt-qemu"
#: After its monitor broke, how long QEMU may take to exit before it counts as alive (s).
QEMU_EXIT_WAIT = 1.0
#: How long a crashed primary asks its peer which epoch the takeover resumed from, to settle
#: the held serial output (then it settles at its own last acknowledged epoch: never a repeat).
SERIAL_SETTLE_WAIT = 30.0
#: How long a connection to the peer's FT-link listener may take before the link counts as down (s).
LINK_PROBE_TIMEOUT = 2.0
#: Engine failures that an operator's action caused (no fault: one WARNING line, then pairing anew).
OPERATOR_ENDS = (ReconfiguredError, DevicesChangedError, ResumedElsewhereError, SuspendedToRAMError)
#: How long one pairing attempt waits for the cluster's placer to place its standby (s).
PLACEMENT_WAIT = 10.0
#: How long a pairing that finds the VM stopped by a libvirt job waits for that job to end (s).
JOB_END_WAIT = 60.0
#: The states in which a running VM is unprotected and its protection loop pairs it.
UNPROTECTED_STATES = (S.UNPROTECTED, S.DEGRADED, S.PRIMARY_AFTER_FAILOVER)


class NotProtectableNow(CujuError):
    """The VM cannot be paired as it runs now (asleep in S3, a DIMM plugged in): said once
    while it holds, retried quietly at the longest back-off; the libvirt event that may end
    it (PMWAKEUP, DEVICE_REMOVED) starts an attempt at once."""

    until = "until then"


class NotPlaced(NotProtectableNow):
    """No host of the cluster fits the VM's standby (the placer's reason): said once while it
    holds, retried with the usual back-off; a peer's cujud connecting starts an attempt at once."""

    until = "until a host fits (retried)"


class PrimaryDomain:
    """A domain that runs on this host and is (to be) protected by a standby on ``peer``.

    ``spec_link`` says whether the FT link is the one ``<cuju:ft link=...>`` names (the
    element's own peer); otherwise the backup's cujud tells its FT-link address when it
    creates the standby. A VM that failed over to this host is re-protected with the
    machine and statistics of its former standby (``machine``, ``stats``): its failover
    history stays in ``status`` and the metrics.
    """

    def __init__(self, orch: Orchestrator, name: str, uuid: str, spec: FTSpec, peer_name: str, *,
                 spec_link: bool = True, machine: FTMachine | None = None,
                 stats: DomainStats | None = None) -> None:
        self.orch = orch
        self.name = name
        self.uuid = uuid
        self.spec = spec
        self.peer = peer_name
        self.spec_link = spec_link
        #: The backup is chosen by this cujud (the element names this host: the VM failed over
        #: here), again before every attempt: :meth:`Orchestrator.place`.
        self.placed = not spec_link
        self.machine = machine or FTMachine(name, Role.PRIMARY)
        self.stats = stats or DomainStats(name, uuid, "primary", peer=peer_name, tracker=spec.tracker,
                                          epoch_ms=spec.epoch_ms)
        self.stats.role, self.stats.peer = "primary", peer_name
        self.stats.tracker, self.stats.epoch_ms = spec.tracker, spec.epoch_ms
        self.log = LOG.getChild(name.replace(".", "_"))
        self.engine: PrimaryEngine | None = None
        self.qmp: QMPClient | None = None
        self.pid = 0
        self.ended = threading.Event()
        self._wake = threading.Event()
        #: Set by :meth:`peer_back`: the next attempt starts at once, the backoff from its start.
        self._fresh = False
        #: The last NotProtectableNow said (said once, while it holds).
        self._said_not_now: str | None = None
        self._log_offset = 0
        self._thread: threading.Thread | None = None
        #: True while may_release decides (the engine is still "running" then) ...
        self._deciding = False
        #: ... and while engine.start() runs on the protection loop's thread.
        self._starting = False
        #: The generation of the last failed pairing whose standby the peer promised to drop:
        #: the next attempt with that peer keeps it (ownership did not change), 0 otherwise.
        self._again = 0
        #: When each kind of event note was last logged (:meth:`on_event`).
        self._notes: dict[str, float] = {}
        #: The disks' image chains in the XML the standby was made from, and their sizes
        #: then (:meth:`_watch_disks`).
        self._disk_chains: events.DiskChains | None = None
        self._disk_sizes: events.DiskSizes = {}
        #: The backup host of the last pairing attempt that failed (the placer avoids it next).
        self._failed_peer: str | None = None

    @property
    def generation(self) -> int:
        """The ownership generation of the current pairing (0: no witness); shown in ``status``."""
        return self.stats.generation

    @generation.setter
    def generation(self, value: int) -> None:
        self.stats.generation = value

    # -- protecting --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the protection loop, or wake it (after a loss) for an attempt now."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._protect_loop, name=f"cujud-protect-{self.name}",
                                            daemon=True)
            self._thread.start()
        self._wake.set()

    def peer_back(self) -> None:
        """The peer's cujud (re)connected: if this VM runs unprotected, try to pair now."""
        self._fresh = True
        self._wake.set()

    def _protect_loop(self) -> None:
        """One per domain, for its whole life here: (re-)protect whenever it is unprotected."""
        delay = BACKOFF_MIN
        while not self.ended.is_set() and not self.orch.stopping.is_set():
            engine = self.engine
            busy = engine is not None and (engine.running or engine.fenced or self._deciding)
            if busy or self.machine.state not in UNPROTECTED_STATES:
                self._wake.wait(0.5)
                self._wake.clear()
                self._watch_disks()
                delay = BACKOFF_MIN if self.machine.state is S.PROTECTED else delay
                continue
            if self._fresh:
                self._fresh, delay = False, BACKOFF_MIN
            if self._vm_gone():
                return
            try:
                if self.placed:
                    self._choose_peer()
                self._pair_once()
                self._failed_peer = self._said_not_now = None
                continue
            except NotProtectableNow as err:  # not the peer's fault: no other peer is chosen
                if cluster.gist(str(err)) != self._said_not_now:  # once while it holds
                    self.log.warning("%s; the VM runs UNPROTECTED %s", err, err.until)
                    self._said_not_now = cluster.gist(str(err))
                if not isinstance(err, NotPlaced):  # an event ends the wait; a host may fit any time
                    delay = BACKOFF_MAX
            except CujuError as err:
                self._failed_peer = self.peer if self.placed else None
                self._said_not_now = None
                self.log.warning("protection not established: %s; the VM runs UNPROTECTED, next attempt "
                                 "in %.1f s", err, delay)
                self.log.debug("details", exc_info=True)
            # The whole delay, whatever wakes the loop meanwhile: a failed attempt's own clean-up
            # (the engine's verdict asks for a re-protection) must not turn the back-off into a
            # busy loop of standby creations on the peer. Only the peer's cujud coming back
            # (peer_back) starts a new attempt at once.
            retry_at = time.monotonic() + delay
            while (left := retry_at - time.monotonic()) > 0 and not self.ended.is_set() \
                    and not self.orch.stopping.is_set() and not self._fresh:
                self._wake.wait(left)
                self._wake.clear()
            delay = min(delay * 2, BACKOFF_MAX)

    def _resume_after_libvirt_job(self, dom: libvirt.virDomain) -> None:
        """Resume a VM that a finished libvirt job (a live snapshot with memory) left stopped
        in QEMU's ``postmigrate`` only because the job began inside an epoch's pause.

        libvirt decides at a job's start whether to resume the VM at its end, from the state
        it sees then; an epoch's stop looks to it like a pause nobody asked for. A pause the
        user asked for keeps libvirt's reason ``user`` (it is kept, see FTEngine's foreign
        pause); a job still running (its own stop, e.g. migrating out) is left to libvirt."""
        deadline = time.monotonic() + JOB_END_WAIT
        with translate(f"reading the state of {self.name}"):
            # the job's last steps (the disks' snapshot, its own resume) follow the memory save
            while (job := dom.jobInfo()[0]) != libvirt.VIR_DOMAIN_JOB_NONE and time.monotonic() < deadline \
                    and not self.ended.is_set():
                time.sleep(0.2)
            state, reason = dom.state()
        ours = (libvirt.VIR_DOMAIN_PAUSED_UNKNOWN, libvirt.VIR_DOMAIN_PAUSED_SNAPSHOT,
                libvirt.VIR_DOMAIN_PAUSED_MIGRATION)
        if state != libvirt.VIR_DOMAIN_PAUSED or reason not in ours or job != libvirt.VIR_DOMAIN_JOB_NONE:
            return
        with translate(f"resuming {self.name}"):
            dom.resume()
        self.log.info("resumed: a libvirt job (e.g. a live snapshot) that began inside an epoch's pause "
                      "ended with the VM stopped (QEMU 'postmigrate'); libvirt took that pause for a user's")

    def _pair_once(self) -> None:
        conn = self.orch.links.connection(self.peer)
        pid = qemu_pid(self.name)
        if pid is None:
            raise CujuError(f"{self.name} has no running QEMU")
        ram = ram_backing(pid)
        if not self._settle():
            return  # not this host's to protect any more (ceded) or the domain ends
        # QEMU's own run state: libvirt learns of a suspend a moment later. Refused before any
        # standby is asked for; libvirt's PMWAKEUP event wakes this loop.
        with QMPClient(fitness.qmp_socket_path(self.name)) as qmp:
            status = str(qmp.execute("query-status")["status"])
        if status == "suspended":
            raise NotProtectableNow(f"{self.name}: {SUSPENDED_TO_RAM}")
        dom = self.orch.lookup(self.uuid)
        if status == "postmigrate":
            self._resume_after_libvirt_job(dom)
        with translate(f"reading the XML of {self.name}"):
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE)
            persistent = bool(dom.isPersistent())
            pxml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE) \
                if persistent else xml
        unfit = fitness.check_live_fitness(xml)
        if unfit:  # hot-plugged since the start: refused before any standby is asked for
            raise NotProtectableNow(f"{self.name} cannot be protected as it runs now: "
                                    f"{'; '.join(map(str, unfit))}")
        self._disk_chains, self._disk_sizes = events.disk_chains(xml), self._read_disk_sizes(dom)
        first = self.machine.state is S.UNPROTECTED
        self.machine.move(S.PAIRING, expect=UNPROTECTED_STATES)
        sock: socket.socket | None = None
        disks = None
        try:
            if self.spec_link:  # the address is known before the peer is asked
                self._probe_link()
            disks = primary_disks(self.uuid, self.spec.disks, self.name, state_dir=self.orch.state_dir)
            self.generation = self.orch.witness_protect(self.uuid, self.name, self.peer, again=self._again)
            self._again = 0
            self.log.info("asking %s for a standby", self.peer)
            claims = disks.claims() if disks is not None else []
            reply = conn.request("standby-create", {
                "name": self.name, "uuid": self.uuid, "xml": xml, "persistent_xml": pxml,
                "persistent": persistent,
                "heartbeat_timeout_ms": self.spec.heartbeat_timeout_ms, "failover": self.spec.failover,
                "generation": self.generation,
                "disk_sizes": list(disks.sizes) if disks is not None else [],
                "disk_claims": claims,
                "disk_formats": disk_formats(self.uuid, self.spec.disks) if disks is not None else [],
            }, timeout=STANDBY_CREATE_TIMEOUT)
            if disks is not None:
                # Which replicas the backup kept: those are resynced with only what changed.
                disks.set_replicas(reply.get("disk_replicas") or [{} for _ in claims], claims)
            # From here on a standby may come to hold the VM's state: a cujud that dies now
            # leaves this record, and its successor asks the peer before anything leaves.
            records.write(self.orch.state_dir, records.PROTECTED, self.uuid, domain=self.name, peer=self.peer,
                          generation=self.generation)
            link_keys = self._link_keys(reply)
            token = bytes.fromhex(str(reply["token"]))
            if link_keys is not None:  # encrypted: the token never crosses the FT link (linkkeys)
                token = linkkeys.admission(bytes.fromhex(str(reply["link_secret"])), token)
            sock = socket.create_connection(self._link_address(reply), timeout=10)
            sock.sendall(token + self.generation.to_bytes(8, "big"))
            sock.settimeout(None)
            self.qmp = QMPClient(fitness.qmp_socket_path(self.name))
            standby = self._check_standby(reply)
        except (CujuError, OSError, KeyError, ValueError) as err:
            self.machine.move(S.UNPROTECTED if first else S.DEGRADED, expect=S.PAIRING)
            self._close_qmp()
            answer = self._ask_abandon("pairing failed", quiet=True)
            # The same pairing may be retried at the same generation only when no standby of
            # it can be left: the peer promised (a copy at a generation still the record's
            # could win a claim later).
            self._again = self.generation if answer is not None and answer.get("abandoned") else 0
            if sock is not None:
                sock.close()
            if disks is not None:
                disks.close()
            raise CujuError(f"pairing with {self.peer} failed: {err}") from err
        self.pid = pid
        self._log_offset = log_offset(self.name)
        self._own_unlabelled_disks(xml, pid)
        counters = self.orch.counter_dir()
        cfg = PrimaryConfig(
            ram_path=ram.path, ram_size=ram.size, tracker=self.spec.tracker, epoch_ms=self.spec.epoch_ms,
            epoch_policy=self.spec.epoch_policy, max_epoch_ms=self.spec.max_epoch_ms,
            output_commit=self.spec.output_commit,
            max_packets=self.spec.max_epoch_packets,
            counter_dir=str(counters), ack_timeout=self.spec.heartbeat_timeout_ms / 1e3, tag=self.name,
            standby_sections=standby.sections if standby is not None else None,
        )
        chardevs = ChardevHold.of(self.uuid) if self.spec.chardevs else None
        if self.spec.chardevs and chardevs is None:
            self.log.warning("the chardev server of %s does not run: its serial output is NOT held (it "
                             "starts with the VM; restart the VM to hold it)", self.name)
        if chardevs is not None:
            # A new protection of a VM that runs here: what an earlier one left held (a cujud
            # killed mid-protection, the VM adopted since) is this VM's past output, and the
            # new engine's epochs start again from the backup's.
            chardevs.release_all()
        self.engine = PrimaryEngine(cfg, qmp=self.qmp, pid=pid, link=sock, stats=self.stats,
                                    machine=self.machine, may_release=self._may_release, link_keys=link_keys,
                                    disks=disks, chardevs=chardevs)
        self.stats.set_initial_sync(0.0)
        self._starting = True
        try:
            report = self.engine.start()
        except CujuError:
            if not self.engine.fenced:
                self._close_qmp()
            raise
        finally:
            self._starting = False
            sock.close()  # the engine holds its own duplicate
        records.write(self.orch.state_dir, records.PROTECTED, self.uuid, domain=self.name, peer=self.peer,
                      generation=self.generation)
        self.log.info("PROTECTED by %s: initial sync of %d pages in %.2f s (%d rounds); epochs of %d ms",
                      self.peer, report.pages_sent, report.seconds, report.rounds, self.engine.epoch_ms)

    def _probe_link(self) -> None:
        """Fail at once when the FT link is down: an attempt that cannot connect must not make
        the peer start a standby domain, only to destroy it again."""
        address = (self.spec.link_host, self.spec.link_port)
        try:
            with socket.create_connection(address, timeout=LINK_PROBE_TIMEOUT):
                pass
        except OSError as err:
            raise CujuError(f"the FT link to {self.spec.link_host}:{self.spec.link_port} is down "
                            f"({err.strerror or err}); no standby was asked for") from err

    def _settle(self) -> bool:
        """Clear what an earlier session of this domain left behind before pairing anew.

        A cujud that was killed (or stopped without the peer's promise) leaves its
        ``protected`` record and its output filters in QEMU, holding the output of epochs
        the peer may have resumed. Then the VM is held stopped (FENCED) until the peer
        answers ``standby-abandon``: abandoned -> the held output leaves, the filters go, the
        VM runs and is protected anew; taken over -> the local copy is destroyed and the
        domain ``ceded``. Returns False when the domain is not this host's to protect.
        """
        if records.read(self.orch.state_dir, records.CEDED, self.uuid) is not None:
            self._cede("this host had ceded the VM to its peer (state_dir/ceded) before cujud restarted")
            return False
        record = records.read(self.orch.state_dir, records.PROTECTED, self.uuid)
        qmp = QMPClient(fitness.qmp_socket_path(self.name))
        try:
            leftovers = leftover_filters(qmp, self.name)
            if record is None and not leftovers:
                return True
            status = str(qmp.execute("query-status")["status"])
            if status == "running":
                qmp.execute("stop")
            with contextlib.suppress(StateError):
                self.machine.move(S.FAILED, expect=UNPROTECTED_STATES)
            left = (["its 'protected' record"] if record is not None else []) + \
                ([f"{len(leftovers)} output filters in QEMU"] if leftovers else [])
            self.log.info("an earlier cujud left %s: the VM is held stopped, its output held, until %s says "
                          "whether it took the VM over", " and ".join(left), self.peer)
            told = False
            while not self.ended.is_set() and not self.orch.stopping.is_set():
                answer = self._ask_abandon("cujud restarted and settles the earlier session", quiet=True)
                if answer is not None and answer.get("taken_over"):
                    qmp.close()
                    self._cede("the peer took the VM over while cujud was down")
                    return False
                if answer is not None and answer.get("abandoned"):
                    remove_leftovers(qmp, leftovers)
                    if status in ("running", "paused", "postmigrate"):  # ours (or the dead engine's) pause
                        qmp.execute("cont")
                    with contextlib.suppress(StateError):
                        self.machine.move(S.DEGRADED, expect=S.FAILED)
                    self.log.info("%s did not take the VM over: its held output is released, it runs again; "
                                  "protecting it anew", self.peer)
                    return True
                if not told:
                    self.log.error("FENCED: %s cannot be asked whether it took the VM over (an earlier cujud "
                                   "left it protected); the VM stays stopped until %s answers",
                                   self.peer, self.peer)
                    told = True
                time.sleep(0.5)
            return False
        finally:
            qmp.close()

    def _own_unlabelled_disks(self, xml: str, pid: int) -> None:
        """Give QEMU the writable disk images its libvirt never labelled.

        A VM that failed over here runs on images whose ``<source>`` carries the standby's
        ``relabel='no'``: the old primary host's libvirt owned their labels and gave them back
        (to root) when its QEMU died. QEMU reopens its images on ``cont`` after each epoch's
        device-state save, so before this host protects the VM, the images must be QEMU's, as
        libvirt's DAC driver would have made them at a start here. Called once the peer has
        created the standby (the old primary host's libvirt is then done with the images).
        """
        root = etree.fromstring(xml.encode())
        uid, gid = owner_ids(pid)
        for disk in root.iterfind("devices/disk"):
            source = disk.find("source")
            path = source.get("file") if source is not None else None
            if (source is None or not path or disk.find("readonly") is not None
                    or not any(x.get("relabel") == "no" for x in source.iterfind("seclabel"))):
                continue
            try:
                st = os.stat(path)
                if (st.st_uid, st.st_gid) != (uid, gid):
                    os.chown(path, uid, gid)
                    self.log.info("disk image %s given to QEMU's user (%d:%d): its libvirt never labelled "
                                  "it here", path, uid, gid)
            except OSError as err:
                raise CujuError(f"cannot give the disk image {path} to QEMU's user: {err}") from err

    def _vm_gone(self) -> bool:
        """True (and protection ended) once the VM no longer runs here while unprotected.

        The hook does not report the stop of a VM that failed over here: its live XML still
        carries the standby's ``-incoming`` until its next start, which the hook leaves alone.
        """
        if qemu_pid(self.name) is not None:
            return False
        try:
            if self.orch.lookup(self.uuid).isActive():
                return False
        except (CujuError, libvirt.libvirtError):
            pass
        self.log.info("the VM no longer runs here: protection ends")
        self._ask_abandon("the domain stopped", quiet=True, vm_ended=True)
        self.orch.witness_stopped(self)
        self._finish()
        return True

    def _choose_peer(self) -> None:
        members = self.orch.cluster
        if members is not None:  # the witness: the cluster's placer chooses (peer='auto' too)
            placed = self._placed_peer(members)
            if placed != self.peer:
                self.log.info("the standby goes to %s, the cluster's choice", placed)
                self.peer = self.stats.peer = placed
            return
        chosen = self.orch.place(self.uuid, prefer=self.peer)
        if chosen is None:
            raise CujuError(f"no peer host is connected to hold its standby (peers: "
                            f"{', '.join(sorted(self.orch.links)) or 'none'})")
        if chosen != self.peer:
            self.log.info("the standby goes to %s (%s does not answer)", chosen, self.peer)
            self.peer = self.stats.peer = chosen

    def _placed_peer(self, members: cluster.ClusterMember) -> str:
        """The backup host the cluster's placer chooses for a VM whose element leaves it to
        cujud (no ``peer``, ``peer='auto'``, or the VM failed over here). A placer that says
        nothing within PLACEMENT_WAIT (none elected, or stuck) leaves the choice to this host,
        by the same rules (:meth:`cluster.ClusterMember.choose_here`); one that finds no host
        that fits is believed: :class:`NotPlaced`."""
        avoid = self._failed_peer
        if avoid is None and self.peer and self.peer not in self.orch.connected_peers():
            avoid = self.peer  # the last backup is gone: its lease may not have expired yet
        memory_kib = 0
        with contextlib.suppress(CujuError, libvirt.libvirtError):
            memory_kib = int(self.orch.lookup(self.uuid).info()[1])

        def ended() -> bool:
            return self.ended.is_set() or self.orch.stopping.is_set()

        try:
            chosen, said = members.request_standby(self.uuid, self.name, avoid=avoid, memory_kib=memory_kib,
                                                   wait=PLACEMENT_WAIT, ended=ended)
            if chosen is not None:
                return chosen
            if ended():
                raise CujuError("the domain ends")
            placer = members.placer() or "none elected yet"
            if said:
                raise NotPlaced(f"the cluster's placer ({placer}) finds no host for its standby: {said}")
            chosen, note = members.choose_here(self.uuid)
        except CoordError as err:
            raise CujuError(f"the cluster's placer (etcd) could not be asked for a backup host: "
                            f"{err}") from err
        if chosen is None:
            raise NotPlaced(f"the cluster's placer ({placer}) placed no standby within "
                            f"{PLACEMENT_WAIT:.0f} s, and no host fits by its rules here either: {note}")
        self.log.warning("the cluster's placer (%s) placed no standby within %.0f s and said nothing "
                         "(see its log): this host chooses by the same rules: %s%s", placer, PLACEMENT_WAIT,
                         chosen, f" ({note})" if note else "")
        return chosen

    def _link_address(self, reply: dict[str, Any]) -> tuple[str, int]:
        """Where the FT link goes: the element's ``link`` for its own peer, else what the backup said."""
        if self.spec_link:
            return self.spec.link_host, self.spec.link_port
        told = reply.get("ft_address")
        if not isinstance(told, str) or not told:
            raise CujuError(f"{self.peer} listens for the FT link on a wildcard address (ft_listen) and "
                            "<cuju:ft link=...> names another host; fix: set ft_listen on "
                            f"{self.peer} to its FT-link address")
        endpoint = parse_endpoint(told, DEFAULT_LINK_PORT)
        return endpoint.host, endpoint.port

    def _link_keys(self, reply: dict[str, Any]) -> bytes | None:
        """This side's FT-link keys from the backup's secret; None: the link runs in the clear."""
        secret = reply.get("link_secret")
        if secret is None:
            if self.orch.cfg.peer_tls == "on":
                raise CujuError(f"{self.peer} offers no FT-link encryption although this host runs "
                                "peer_tls: on; set peer_tls: 'on' on every host")
            return None
        return LinkKeys.derive(bytes.fromhex(str(secret))).primary

    def _check_standby(self, reply: dict[str, Any]) -> MachineProfile | None:
        """Compare the peer's standby with this QEMU (machine type, memory backends, RAM blocks)
        before a single page is synced; its device sections are checked by the first save."""
        if "machine" not in reply:
            self.log.warning("%s sent no profile of its standby (an older cujud?): not compared", self.peer)
            return None
        assert self.qmp is not None
        standby = MachineProfile.from_json(reply["machine"])
        problems = compare_machines(describe_machine(self.qmp), standby)
        if problems:
            raise StandbyMismatchError(problems)
        return standby

    # -- what libvirt reports about the running VM -------------------------------------------------

    def on_event(self, event: DomainEvent | LifecycleEvent) -> None:
        """A libvirt event about this VM (event-loop thread: no libvirt calls, no waiting).

        A change the standby cannot follow ends protection before the next epoch ships
        (:meth:`PrimaryEngine.reconfigure`: one WARNING line with the cause) and the
        protection loop pairs again; anything else is one INFO line (:mod:`.events`)."""
        found = events.verdict(event)
        if found is None or self.ended.is_set():
            return
        if isinstance(event, DomainEvent) and event.kind in ("pm-wakeup", "device-removed"):
            # what kept it from being paired (asleep, a DIMM) may be gone: try now, not at the
            # next back-off
            self._fresh = True
            self._wake.set()
        engine = self.engine
        active = engine is not None and (engine.running or self._starting) \
            and self.machine.state in (S.SYNCING, S.PROTECTED)
        if found.action is events.Action.RECONFIGURE and active:
            assert engine is not None
            engine.reconfigure(found.cause)
        elif found.action is events.Action.RECONFIGURE:  # the next pairing reads the configuration anew
            self.log.debug("%s (not protected at the moment)", found.cause)
        elif self._note_due(found.cause):
            self.log.info("%s", found.cause)

    def _watch_disks(self) -> None:
        """Compare the disks' image chains and sizes with the standby's (about twice a second
        while protected). Neither comes with an event: an external disk-only snapshot moves
        the disks onto overlays, and a standby left on the old images would resume on them;
        ``virsh blockresize`` grows a disk, and a standby that opened it before would give
        the guest the old size after a failover."""
        engine = self.engine
        if self._disk_chains is None or engine is None or not engine.running \
                or self.machine.state is not S.PROTECTED:
            return
        try:
            dom = self.orch.lookup(self.uuid)
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
        except (CujuError, libvirt.libvirtError) as err:
            self.log.debug("could not read the live XML to compare the disks: %s", err)
            return
        sizes = self._read_disk_sizes(dom)
        for dev, size in sizes.items():  # a disk whose size a job hid at pairing: from now on
            self._disk_sizes.setdefault(dev, size)
        found = events.disks_changed(self._disk_chains, events.disk_chains(xml)) \
            or events.disks_resized(self._disk_sizes, sizes)
        if found is not None:
            self._disk_chains = None
            engine.reconfigure(found.cause)

    def _read_disk_sizes(self, dom: Any) -> events.DiskSizes:
        """The disks' capacities as QEMU has them, from libvirt's block stats: one call for
        every disk, no pause; NOWAIT, so that a libvirt job in progress (a snapshot, a save)
        leaves the sizes out instead of holding the protection loop."""
        try:
            found = self.orch.libvirt.conn.domainListGetStats(
                [dom], libvirt.VIR_DOMAIN_STATS_BLOCK, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)
        except (CujuError, libvirt.libvirtError) as err:
            self.log.debug("could not read the disks' sizes: %s", err)
            return {}
        return events.disk_sizes(found[0][1]) if found else {}

    def _note_due(self, cause: str) -> bool:
        """One INFO line per kind of note in a minute (a balloon reports every step)."""
        kind = cause.split(" ", 3)[:3]
        key, now = " ".join(kind), time.monotonic()
        if now - self._notes.get(key, -1e9) < 60.0:
            return False
        self._notes[key] = now
        return True

    # -- when protection fails ---------------------------------------------------------------------

    def _may_release(self, err: BaseException) -> bool:
        """The engine's question after a failure (see the module docstring)."""
        self._deciding = True
        try:
            return self._decide(err)
        finally:
            self._deciding = False

    def _decide(self, err: BaseException) -> bool:
        if self.ended.is_set() and alive(self.pid):
            return True  # cujud stops: shutdown() already has the peer's promise
        if caused_by(err, MonitorError):
            # QEMU closes its monitor a moment before it exits: give it that moment
            deadline = time.monotonic() + QEMU_EXIT_WAIT
            while alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.005)
        if not alive(self.pid):
            self._qemu_ended()
            return True  # nothing left to hold: the QEMU is gone
        won = self._claim()
        if won:
            self.log.warning("backup lost (%s); the witness made this host the sole owner (generation %d): "
                             "running UNPROTECTED, re-protecting with backoff", err, self.generation)
            threading.Thread(target=self._after_claim_won, daemon=True).start()
            return True
        if won is not None:
            threading.Thread(target=self._cede, args=("the witness gave the VM to the peer",),
                             daemon=True).start()
            return False
        answer = self._ask_abandon(f"protection failed: {err}")
        if answer is not None and answer.get("abandoned") and isinstance(err, OPERATOR_ENDS):
            self.log.info("the standby is dropped (%s); pairing again", type(err).__name__)
            threading.Thread(target=self._reprotect_after_engine, daemon=True).start()
            return True
        if answer is not None and answer.get("abandoned"):
            self.log.warning("backup lost (%s); the peer dropped its standby: running UNPROTECTED, "
                             "re-protecting with backoff", err)
            threading.Thread(target=self._reprotect_after_engine, daemon=True).start()
            return True
        if answer is not None and answer.get("taken_over"):
            threading.Thread(target=self._cede, args=("the peer took the VM over",), daemon=True).start()
            return False
        threading.Thread(target=self._resolve_fence, name=f"cujud-fence-{self.name}", daemon=True).start()
        return False

    def _qemu_ended(self, *, engine_runs: bool = True) -> None:
        """The VM's QEMU is gone: a crash cedes the VM to the standby, anything else ends
        protection (the standby is dropped)."""
        how = self._classify_exit()
        if self.engine is not None:
            self.engine.vm_ended = how  # the engine then says so in one INFO line, no clean-up in QEMU
        if how.startswith("crash"):
            self._crashed(how)
            self._settle_serial_later()
            return
        if self.engine is not None and self.engine.chardevs is not None:
            self.engine.chardevs.release_all()  # the VM ended here: its last words are real
        # one INFO line: the engine's "the VM ended (...)" when it runs, else this one
        level = logging.DEBUG if self.engine is not None and engine_runs else logging.INFO
        self.log.log(level, "QEMU ended (%s): stopping protection, the standby is dropped", how)
        self._ask_abandon(how, quiet=True, vm_ended=True)
        self.orch.witness_stopped(self)
        self._finish()

    def _claim(self, *, quiet: bool = False) -> bool | None:
        """Race the peer for the ownership record: True won, False lost, None no witness or
        no answer (then the two-host rule decides)."""
        store = self.orch.witness
        if store is None or not self.generation:
            return None
        try:
            claim = store.claim(self.uuid, self.orch.node, self.generation)
        except CoordError as err:
            if not quiet:
                self.log.error("the witness (etcd) gives no answer (%s): the two-host rule decides", err)
            return None
        if claim.won:
            self.generation = claim.record.generation
            # As good as the peer's promise: it can never resume this pairing's standby, so a
            # restart (or the next pairing's settling) has nothing to ask it.
            records.remove(self.orch.state_dir, records.PROTECTED, self.uuid)
            return True
        self.log.error("the witness gives %s to %s (generation %d, %s)", self.name, claim.record.owner,
                       claim.record.generation, claim.record.mode)
        return False

    def _after_claim_won(self) -> None:
        """The peer may be alive (only the FT link broke): it drops its standby when told."""
        self._ask_abandon("the primary won the ownership record", quiet=True)
        self._reprotect_after_engine()

    def _classify_exit(self) -> str:
        """Why QEMU is gone, in the words an operator looks for: 'deliberate: CAUSE' or 'crash:
        CAUSE'. libvirt's STOPPED detail names the operation (libvirt itself sends the SIGTERM
        after a save or a guest poweroff, so the signal alone does not), its SHUTDOWN event who
        shut the guest down. QEMU's own last events (SHUTDOWN, a completed MIGRATION: the
        engine's :meth:`~PrimaryEngine.qemu_ending`) name it without waiting for libvirt's,
        which came seconds late under load; QEMU's "terminating on signal" line is the last
        resort."""
        said = self.engine.qemu_ending() if self.engine is not None else None
        sig = ended_on_signal(self.name, self._log_offset)
        # With a signal line the exit was deliberate: give libvirt longer to say by whom,
        # unless QEMU said it already.
        wait = 0.0 if said is not None else CLASSIFY_WAIT if sig is None else DELIBERATE_WAIT
        event = self.orch.wait_stop_event(self.uuid, wait)
        detail = event.detail_name if event is not None else None
        note = f" (libvirt: STOPPED/{detail}{f', QEMU got signal {sig}' if sig is not None else ''})"
        if detail == "SHUTDOWN":
            return f"deliberate: {self.orch.shutdown_cause(self.uuid)}{note}"
        if detail in DELIBERATE_STOPS:
            return f"deliberate: {STOP_CAUSES.get(detail, detail.lower())}{note}"
        if said is not None:
            return f"deliberate: {said} (QEMU's last event{f', signal {sig}' if sig is not None else ''})"
        if sig is not None:
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = "unknown signal"
            return f"deliberate: QEMU terminated on signal {sig} ({name})"
        if detail is not None:
            return f"crash: {STOP_CAUSES.get(detail, f'libvirt reports STOPPED/{detail}')}"
        return (f"crash: QEMU was killed (SIGKILL) or crashed: no signal line from QEMU and no libvirt event "
                f"within {CLASSIFY_WAIT} s")

    def _crashed(self, how: str) -> None:
        self.log.info("the primary QEMU died (%s): the standby on %s takes over; this host cedes the VM",
                      how, self.peer)
        records.write(self.orch.state_dir, records.CEDED, self.uuid, domain=self.name, peer=self.peer,
                      reason=how)
        try:
            self.orch.links.connection(self.peer).notify("primary-crashed", {"uuid": self.uuid, "how": how})
        except CujuError as err:
            self.log.warning("could not tell %s (%s): it takes over when both paths are silent, or asks "
                             "this host when its cujud runs again", self.peer, err)
        self._finish()

    def _settle_serial_later(self) -> None:
        engine = self.engine
        if engine is not None and engine.chardevs is not None:
            threading.Thread(target=self._settle_serial, args=(engine.chardevs, engine.last_acked),
                             name=f"cujud-serial-{self.name}", daemon=True).start()

    def _settle_serial(self, hold: ChardevHold, last_acked: int | None) -> None:
        """The peer took over (or is taking over): release the held serial output up to the
        epoch it resumed from and drop the rest, which its standby prints again. Without the
        peer's word, up to ``last_acked`` (None: a restarted cujud, which knows no epoch: the
        server has been told of every ack, so what it holds was never acknowledged)."""
        deadline = time.monotonic() + SERIAL_SETTLE_WAIT
        answer: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                answer = self.orch.links.connection(self.peer).request("takeover-epoch", {"uuid": self.uuid},
                                                                       timeout=2.0)
            except CujuError:
                answer = {"pending": True}
            if not answer.get("pending"):
                break
            time.sleep(0.1)
        try:
            if "epoch" in answer:
                hold.settle(int(answer["epoch"]))
                self.log.info("held serial output settled: released up to epoch %s, where %s resumed",
                              answer["epoch"], self.peer)
            elif answer.get("resumed") is False:
                hold.release_all()  # nobody resumes it: what it printed is its last output
            elif last_acked is not None:
                hold.settle(last_acked)
                self.log.warning("%s did not say which epoch it resumed from: serial output released up to "
                                 "epoch %d, the last one it acknowledged here (a line of the epoch after it "
                                 "may be missing, none is repeated)", self.peer, last_acked)
            else:
                hold.settle(-1)
                self.log.warning("%s did not say which epoch it resumed from: the serial output held "
                                 "since the last acknowledgement is dropped (a line of those epochs may be "
                                 "missing, none is repeated)", self.peer)
        finally:
            hold.close()

    def _ask_abandon(self, reason: str, *, quiet: bool = False,
                     vm_ended: bool = False) -> dict[str, Any] | None:
        """``vm_ended``: the VM was stopped on purpose here, so the peer may start it again."""
        try:
            conn = self.orch.links.connection(self.peer)
            body = {"uuid": self.uuid, "reason": reason, "vm_ended": vm_ended}
            answer = conn.request("standby-abandon", body, timeout=min(2.0, self.orch.cfg.request_timeout))
        except CujuError as err:
            if not quiet:
                self.log.error("cannot reach %s to drop its standby: %s", self.peer, err)
            return None
        if answer.get("abandoned"):  # the peer will never resume it: nothing left to ask at a restart
            records.remove(self.orch.state_dir, records.PROTECTED, self.uuid)
        return answer

    def _wait_engine_done(self) -> PrimaryEngine | None:
        engine = self.engine
        time.sleep(0.01)  # let the failing engine return from may_release
        while engine is not None and (engine.running or self._starting) and not self.ended.is_set():
            time.sleep(0.01)
        return engine

    def _reprotect_after_engine(self) -> None:
        self._wait_engine_done()
        self._close_qmp()
        self._wake.set()

    def _resolve_fence(self) -> None:
        """Fenced: ask the peer until it answers whether it took the VM over."""
        engine = self._wait_engine_done()
        self.log.error("FENCED: %s is unreachable and may have taken over; the VM stays stopped with "
                       "its output held until %s answers", self.peer, self.peer)
        while not self.ended.is_set() and not self.orch.stopping.is_set():
            if not alive(self.pid):  # the fenced copy died: the standby is all that is left of the VM
                self._qemu_ended(engine_runs=False)
                return
            won = self._claim(quiet=True)
            if won and engine is not None:
                self.log.warning("the witness made this host the sole owner (generation %d): unfencing",
                                 self.generation)
                engine.unfence()
                self._close_qmp()
                self._ask_abandon("the primary won the ownership record", quiet=True)
                self._wake.set()
                return
            if won is False:
                self._cede("the witness gave the VM to the peer while this host was fenced")
                return
            answer = self._ask_abandon("a fenced primary asks", quiet=True)
            if answer is not None and answer.get("abandoned") and engine is not None:
                engine.unfence()
                self._close_qmp()
                self._wake.set()
                return
            if answer is not None and answer.get("taken_over"):
                self._cede("the peer took the VM over while this host was cut off")
                return
            time.sleep(0.5)

    def _cede(self, why: str) -> None:
        engine = self._wait_engine_done()
        # A restarted cujud has no engine, but the chardev server outlived the old one with
        # what it held: settle it too, or it waits for a word that never comes.
        hold = engine.chardevs if engine is not None else ChardevHold.of(self.uuid)
        if hold is not None:
            self._settle_serial(hold, engine.last_acked if engine is not None else None)
        self.log.error("%s: destroying the local copy; this host will refuse to start it", why)
        records.write(self.orch.state_dir, records.CEDED, self.uuid, domain=self.name, peer=self.peer,
                      reason=why)
        self._close_qmp()
        with contextlib.suppress(CujuError):
            dom = self.orch.lookup(self.uuid)
            with translate(f"destroying {self.name}"):
                dom.destroy()
        self._finish()

    def _finish(self) -> None:
        if records.read(self.orch.state_dir, records.CEDED, self.uuid) is None:
            records.remove(self.orch.state_dir, records.PROTECTED, self.uuid)
        self.orch.standbys.released(self.uuid)  # it ran here after a failover: not any more
        self.ended.set()
        self._wake.set()
        for state in (S.STOPPING, S.STOPPED):
            with contextlib.suppress(StateError):
                self.machine.move(state)
        self.orch.forget_primary(self)

    def _close_qmp(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None

    def stopped(self) -> None:
        """The hook reports the domain stopped; the engine (if any) classifies it itself."""
        engine = self.engine
        if engine is not None and (engine.running or engine.fenced):
            return
        self._ask_abandon("the domain stopped", quiet=True, vm_ended=True)
        self.orch.witness_stopped(self)
        self._finish()

    def shutdown(self) -> None:
        """cujud stops. Held output may leave only once the peer promised never to resume
        its standby: ask first; with the promise, protection ends in order (last epoch
        acknowledged or given up, filters removed, the ``protected`` record removed, the VM
        running); without it the filters stay in QEMU with the VM's output held, and the
        record stays: the next cujud settles it with the peer (:meth:`_settle`)."""
        self.ended.set()
        self._wake.set()
        engine = self.engine
        if engine is not None and (engine.running or self._starting):
            answer = self._ask_abandon("cujud on the primary host stops")
            if answer is not None and answer.get("abandoned"):
                engine.expect_end("cujud stops")
                try:
                    engine.stop(10)
                except CujuError as err:
                    self.log.error("protection did not end in order: %s", err)
                else:
                    self.log.info("cujud stops: protection ended (the peer dropped its standby); the VM runs "
                                  "on unprotected")
            else:
                self.log.error("cujud stops without %s's promise not to take over: the VM's output stays "
                               "HELD in QEMU's filters until cujud runs again and settles it with %s",
                               self.peer, self.peer)
        self._close_qmp()


class Orchestrator:
    """Protected domains of this host (primaries and standbys); registered into the daemon."""

    def __init__(self, *, cfg: config.Config, libvirt: LibvirtConnection, domains: ProtectedDomains,
                 links: PeerLinks, stopping: threading.Event) -> None:
        self.cfg = cfg
        self.libvirt = libvirt
        self.domains = domains
        self.links = links
        self.state_dir: Path = cfg.state_dir
        self.run_dir: Path = cfg.run_dir
        self.stopping = stopping
        self.primaries: dict[str, PrimaryDomain] = {}
        self._lock = threading.Lock()
        self._stops: dict[str, tuple[float, LifecycleEvent]] = {}
        self._shutdowns: dict[str, tuple[float, LifecycleEvent]] = {}
        self._stop_cond = threading.Condition()
        libvirt.add_lifecycle_listener(self._lifecycle)
        libvirt.add_domain_listener(self._domain_event)
        self.node = cfg.node_name
        #: The cluster witness (None: two-host mode, docs/failover.md).
        self.witness = coord.OwnershipStore(
            coord.EtcdClient.for_config(cfg), cfg.etcd_prefix,
        ) if cfg.etcd_endpoints else None
        #: This host in the cluster (its lease, the placer election; None: no witness).
        self.cluster = cluster.ClusterMember(
            self.witness, node=cfg.node_name, failure_domain=cfg.failure_domain,
            ttl=math.ceil(cfg.host_lease_ttl), peers=self.connected_peers, stopping=stopping,
        ) if self.witness is not None else None
        self.standbys = StandbyManager(
            libvirt_conn=libvirt, state_dir=cfg.state_dir, ft_host=cfg.ft_listen.host,
            ft_port=cfg.ft_listen.port, peer_silent_for=links.silent_for,
            register=domains.add, unregister=self._unregister, notify_peer=self._notify_peer,
            ask_peer=self._ask_peer,
            runs_here=self._runs_here, on_taken_over=self._after_takeover,
            disk_replica_dir=cfg.disk_replica_dir,
            witness=self.witness, node=cfg.node_name,
        )
        libvirt.add_state_listener(self._libvirt_state)

    def install(self, server: control.ControlServer, handlers: peer.Handlers) -> None:
        for method, handler in {
            "hook-prepare": self._ctl_prepare, "protect": self._ctl_protect,
            "hook-stopped": self._ctl_stopped, "set-epoch": self._ctl_set_epoch,
            "takeover": self._ctl_takeover,
        }.items():
            server.register(method, handler)
        handlers.requests["standby-create"] = lambda conn, body: self.standbys.create(
            conn.remote, body, encrypt_link=conn.encrypted)
        handlers.requests["standby-abandon"] = lambda conn, body: self.standbys.abandon(body)
        handlers.requests["holds"] = lambda conn, body: self._holds(str(body["uuid"]))
        handlers.requests["takeover-epoch"] = lambda conn, body: self.standbys.takeover_epoch(body)
        handlers.requests["vm-state"] = lambda conn, body: {"state": self.vm_state(str(body["uuid"]))}
        handlers.notes["primary-crashed"] = self._note_crashed
        handlers.notes["standby-lost"] = self._note_standby_lost

    def start(self) -> None:
        """Join the cluster (register this host, stand for placer); nothing without a witness."""
        if self.cluster is not None:
            self.cluster.start()

    def close(self) -> None:
        with self._lock:
            primaries = list(self.primaries.values())
        for p in primaries:
            p.shutdown()
        self.standbys.close()
        if self.cluster is not None:
            self.cluster.close()

    # -- helpers ------------------------------------------------------------------------------

    def counter_dir(self) -> Path:
        """Where QEMU writes the output-commit packet counters: owned by QEMU's user."""
        path = self.run_dir / "counters"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            user = pwd.getpwnam(QEMU_USER)
        except KeyError:
            return path
        os.chown(path, user.pw_uid, user.pw_gid)
        return path

    def lookup(self, uuid: str) -> Any:
        with translate(f"looking up domain {uuid}"):
            return self.libvirt.conn.lookupByUUIDString(uuid)

    def _runs_here(self, uuid: str) -> bool:
        with self._lock:
            return uuid in self.primaries

    def peer_connected(self, name: str) -> None:
        """A peer's cujud (re)connected: VMs that wait for it as their backup (or for any
        backup, when this cujud places theirs) pair now."""
        with self._lock:
            waiting = [p for p in self.primaries.values() if p.peer == name or p.placed]
        for p in waiting:
            p.peer_back()

    def place(self, uuid: str, prefer: str | None = None) -> str | None:
        """The peer to hold the standby of ``uuid`` (None: no peer is connected).

        ``prefer`` (the VM's last backup, or the old primary host after a failover) while it
        is connected; otherwise the connected peer that holds the fewest standbys of this
        host's other VMs, by name on a tie. Never this host: only peers are candidates.
        """
        connected = self.connected_peers()
        if prefer in connected:
            return prefer
        with self._lock:
            load = [p.peer for p in self.primaries.values() if p.uuid != uuid]
        return min(connected, key=lambda n: (load.count(n), n), default=None)

    def connected_peers(self) -> list[str]:
        """The configured peers whose cujud is connected right now, by name."""
        connected = []
        for name in sorted(self.links):
            with contextlib.suppress(CujuError):
                self.links.connection(name)
                connected.append(name)
        return connected

    def _after_takeover(self, sb: Standby) -> None:
        """A standby of this host took its VM over: re-protect the VM, with the old primary
        host as its backup (it is refused there until that host's cujud answers again)."""
        spec = parse_domain(sb.persistent_xml)
        if spec is None:
            return
        if sb.qmp is not None:  # the new primary engine opens its own monitor connection
            sb.qmp.close()
            sb.qmp = None
        p = PrimaryDomain(self, sb.name, sb.uuid, spec, sb.peer, spec_link=False, machine=sb.machine,
                          stats=sb.stats)
        with self._lock:
            if sb.uuid in self.primaries or self.stopping.is_set():
                return
            self.primaries[sb.uuid] = p
        p.log.info("running here after the failover: re-protecting it (backup: %s)",
                   "the cluster's placer chooses" if self.cluster is not None
                   else f"{sb.peer} while it answers, else another peer")
        p.start()

    def names_this_host(self, spec: FTSpec) -> bool:
        """True if ``<cuju:ft peer=...>`` leaves the backup to cujud: ``peer='auto'``, or the
        element names this host itself (the VM runs on its former backup)."""
        host = spec.peer_host
        return host in (AUTO_PEER, self.cfg.node_name, socket.gethostname(), self.cfg.listen.host)

    def resolve_peer(self, spec: FTSpec) -> str:
        """The configured peer that ``<cuju:ft peer=...>`` names (by node name or address). An
        element that names this host itself (the VM failed over here and was restarted) leaves
        the choice to :meth:`place` (the one other host when only one peer is configured)."""
        if spec.placed and self.witness is None:
            raise CujuError("<cuju:ft> has no peer attribute, so the cluster places the standby, but this "
                            "cujud has no witness (etcd_endpoints is not set in cujud.yaml); fix: add "
                            "peer='HOST[:PORT]' naming the backup's cujud (or peer='auto': without etcd this "
                            "host's cujud chooses among its peers), or set etcd_endpoints on every host")
        if self.names_this_host(spec) and self.links:
            return self.place("", prefer=None) or sorted(self.links)[0]
        host = spec.peer_host
        for name, link in self.links.items():
            if host in (name, link.address.host):
                return name
        try:
            wanted = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
        except OSError:
            wanted = set()
        for name, link in self.links.items():
            with contextlib.suppress(OSError):
                if wanted & {ai[4][0] for ai in socket.getaddrinfo(link.address.host, None)}:
                    return name
        known = ", ".join(sorted(self.links)) or "none"
        raise CujuError(f"<cuju:ft peer='{spec.peer}'> names no configured peer of this cujud "
                        f"(peers: {known}); "
                        "fix: use a name or address listed under 'peers' in cujud.yaml")

    # -- the witness ---------------------------------------------------------------------------

    def witness_protect(self, uuid: str, name: str, backup: str, *, again: int = 0) -> int:
        """The ownership generation for pairing ``name`` with ``backup``: a new one, or ``again``
        when the record is still that failed attempt's (:meth:`OwnershipStore.protect`); 0
        without a witness."""
        if self.witness is None:
            return 0
        try:
            return self.witness.protect(uuid, name, self.node, backup, again=again).generation
        except CoordError as err:
            raise CujuError(f"the witness (etcd) did not record the pairing: {err}") from err

    def witness_stopped(self, p: PrimaryDomain) -> None:
        """The VM stopped on purpose: record it (best effort), so any host may start it again."""
        if self.witness is None:
            return
        try:
            self.witness.release(p.uuid, self.node, mode="stopped")
        except CoordError as err:
            p.log.warning("could not record the stop with the witness: %s", err)

    def witness_owner(self, uuid: str) -> coord.Ownership | None:
        """The ownership record of ``uuid``; None without a witness, a record or an answer."""
        if self.witness is None:
            return None
        try:
            found = self.witness.read(uuid)
        except CoordError as err:
            LOG.warning("the witness (etcd) gives no answer about %s: %s", uuid, err)
            return None
        return None if found is None else found.record

    def _fence_stale_copies(self) -> None:
        """Running VMs this host protected before cujud (re)started whose ownership record has
        moved on: another host took them over; destroy the copy here, never adopt it."""
        with translate("listing the running domains"):
            domains = self.libvirt.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        for dom in domains:
            with contextlib.suppress(libvirt.libvirtError, CujuError):
                uuid = dom.UUIDString()
                mine = records.read(self.state_dir, records.PROTECTED, uuid)
                with self._lock:
                    if mine is None or uuid in self.primaries:
                        continue
                rec = self.witness_owner(uuid)
                if rec is None or rec.owner == self.node:
                    continue
                LOG.error("%s runs here from generation %s, but the witness gives it to %s (generation %d): "
                          "destroying the stale copy; this host will refuse to start it", dom.name(),
                          mine.get("generation", "?"), rec.owner, rec.generation)
                records.write(self.state_dir, records.CEDED, uuid, domain=dom.name(), peer=rec.owner,
                              reason=f"the witness gave it to {rec.owner} (generation {rec.generation})")
                with translate(f"destroying {dom.name()}"):
                    dom.destroy()
                records.remove(self.state_dir, records.PROTECTED, uuid)

    def _notify_peer(self, name: str, kind: str, body: dict[str, Any]) -> None:
        self.links.connection(name).notify(kind, body)

    def _holds(self, uuid: str) -> dict[str, Any]:
        """``holds``: did this host take ``uuid`` over (``undecided``: a standby left by an
        earlier cujud is not settled yet and may still take it over)."""
        return {"holds": self.standbys.holds(uuid), "undecided": self.standbys.deciding(uuid)}

    def _ask_peer(self, name: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.links.connection(name).request(kind, body, timeout=min(2.0, self.cfg.request_timeout))

    def vm_state(self, uuid: str) -> str:
        """What this host is to ``uuid``, for a peer whose cujud restarted with a standby of it
        (``vm-state``; :meth:`Standby.settle_after_restart` acts on it). Facts, no decision:

        * ``ceded``: this host gave the VM up (its QEMU crashed, or the peer took it over);
        * ``runs``: a QEMU of it runs here (this host is its primary, fenced or not);
        * ``deciding``: its QEMU just ended and this cujud is still finding out why;
        * ``down``: it was protected, and its copy here is gone without an orderly end (this
          host will not start it before the peer answers ``holds``);
        * ``stopped``: it does not run here and was not left protected (stopped on purpose).
        """
        if records.read(self.state_dir, records.CEDED, uuid) is not None:
            return "ceded"
        with self._lock:
            p = self.primaries.get(uuid)
        name = p.name if p is not None else None
        if name is None:
            with contextlib.suppress(CujuError, libvirt.libvirtError):
                name = self.lookup(uuid).name()
        if name is not None and qemu_pid(name) is not None:
            return "runs"
        if p is not None and not p.ended.is_set():
            return "deciding"
        if records.read(self.state_dir, records.PROTECTED, uuid) is not None:
            return "down"
        return "stopped"

    def _unregister(self, uuid: str) -> None:
        with contextlib.suppress(KeyError):
            self.domains.remove(uuid)

    def forget_primary(self, p: PrimaryDomain) -> None:
        with self._lock:
            if self.primaries.get(p.uuid) is p:
                del self.primaries[p.uuid]
        self._unregister(p.uuid)

    def _libvirt_state(self, state: LinkState) -> None:
        if state is LinkState.CONNECTED:
            threading.Thread(target=self._take_back, name="cujud-adopt", daemon=True).start()

    def _take_back(self) -> None:
        """At every (re)connection to libvirtd: first destroy the copies the witness gave to
        another host, then take back the protected domains that run here."""
        if self.witness is not None:
            try:
                self._fence_stale_copies()
            except CujuError as err:
                LOG.warning("could not check the running domains against the witness: %s", err)
        self._adopt_running()

    def _adopt_running(self) -> None:
        """Take back the protected domains that run here (cujud or libvirtd restarted): each is
        settled with the peer (:meth:`PrimaryDomain._settle`) and protected again. Domains
        that no longer run lose their rows."""
        try:
            domains = self.libvirt.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except (libvirt.libvirtError, CujuError) as err:
            LOG.warning("could not list the running domains to take back protected ones: %s", err)
            return
        running: set[str] = set()
        for dom in domains:
            try:
                name, uuid, xml = dom.name(), dom.UUIDString(), dom.XMLDesc(0)
            except libvirt.libvirtError:
                continue
            running.add(uuid)
            if self.standbys.knows(uuid):
                continue
            # a standby's XML, unless this host took that VM over (its live XML keeps -incoming)
            if is_standby_xml(xml.encode()) and records.read(self.state_dir, records.TAKEOVERS, uuid) is None:
                continue
            with self._lock:
                if uuid in self.primaries:
                    continue
            try:
                spec = parse_domain(xml)
                if spec is None:
                    continue
                LOG.info("%s runs here with <cuju:ft>: taking it back", name)
                self._protect(name, uuid, spec)
            except (CujuError, DomainXMLError) as err:
                LOG.warning("%s runs with <cuju:ft> but cannot be protected: %s", name, err)
        with self._lock:
            gone = [p for p in self.primaries.values() if p.uuid not in running]
        for p in gone:
            threading.Thread(target=p.stopped, daemon=True).start()

    def shutdown_cause(self, uuid: str) -> str:
        """Who shut ``uuid`` down, from libvirt's SHUTDOWN event (GUEST or HOST) of the last seconds."""
        seen = self._shutdowns.get(uuid)
        detail = seen[1].detail_name if seen is not None and time.monotonic() - seen[0] < 60.0 else ""
        if detail == "GUEST":
            return "the guest powered off"
        if detail == "HOST":
            return "shut down from the host (virsh shutdown)"
        return "the guest was shut down"

    def _domain_event(self, event: DomainEvent | LifecycleEvent) -> None:
        with self._lock:
            p = self.primaries.get(event.uuid)
        if p is not None:
            p.on_event(event)

    def _lifecycle(self, event: LifecycleEvent) -> None:
        self._domain_event(event)
        if event.event_name == "SHUTDOWN":
            self._shutdowns[event.uuid] = (time.monotonic(), event)
        if event.event_name != "STOPPED":
            return
        with self._lock:
            p = self.primaries.get(event.uuid)
        if p is not None:  # a domain that stops while no engine runs (in back-off, say): its row goes
            threading.Thread(target=p.stopped, daemon=True).start()
        with self._stop_cond:
            self._stops[event.uuid] = (time.monotonic(), event)
            self._stop_cond.notify_all()

    def wait_stop_event(self, uuid: str, timeout: float) -> LifecycleEvent | None:
        """A STOPPED event of ``uuid`` from the last few seconds, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._stop_cond:
            while True:
                seen = self._stops.get(uuid)
                if seen is not None and time.monotonic() - seen[0] < 5.0:
                    return seen[1]
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._stop_cond.wait(left)

    # -- control methods (hook, CLI) ----------------------------------------------------------------

    def _ctl_prepare(self, params: control.Params) -> dict[str, Any]:
        """May this domain start here, and can it be protected right now?"""
        uuid, xml = str(params.get("uuid", "")), str(params.get("xml", ""))
        ceded = records.read(self.state_dir, records.CEDED, uuid) if uuid else None
        if ceded is not None:
            return {"start": False, "protect": False,
                    "reason": f"this host ceded the domain to {ceded.get('peer')} ({ceded.get('reason')}); "
                              "it runs there: start it there, or remove the record after making sure it "
                              "does not run there"}
        spec = parse_domain(xml)
        if spec is None:
            return {"start": True, "protect": False, "reason": "no <cuju:ft> element"}
        was_protected = records.read(self.state_dir, records.PROTECTED, uuid) if uuid else None
        if was_protected is not None:
            owner = self.witness_owner(uuid)
            if owner is not None and owner.owner != self.node and owner.mode != "stopped":
                records.write(self.state_dir, records.CEDED, uuid, domain=was_protected.get("domain"),
                              peer=owner.owner, reason=f"the witness gave it to {owner.owner} "
                                                       f"(generation {owner.generation})")
                return {"start": False, "protect": False,
                        "reason": f"the witness (etcd) records {owner.owner} as the owner of this VM "
                                  f"(generation {owner.generation}): it runs there"}
            if owner is not None:
                records.remove(self.state_dir, records.PROTECTED, uuid)
                was_protected = None
        try:
            name = self.resolve_peer(spec)
            conn = self.links.connection(name)
        except CujuError as err:
            if was_protected is not None:
                return {"start": False, "protect": False, "reason": self._unknown_holder(was_protected, err)}
            return {"start": True, "protect": False, "reason": str(err)}
        if was_protected is not None:
            try:
                answer = conn.request("holds", {"uuid": uuid}, timeout=2.0)
            except CujuError as err:
                return {"start": False, "protect": False, "reason": self._unknown_holder(was_protected, err)}
            holds = answer.get("holds")
            if answer.get("undecided"):
                return {"start": False, "protect": False,
                        "reason": f"{name} holds a standby of this VM that its cujud is settling after a "
                                  "restart (it may take the VM over): try again in a few seconds"}
            if holds:
                records.write(self.state_dir, records.CEDED, uuid, domain=was_protected.get("domain"),
                              peer=name, reason="the peer took the VM over while this host was down")
                return {"start": False, "protect": False,
                        "reason": f"{name} runs this VM (it took it over while this host was down)"}
            records.remove(self.state_dir, records.PROTECTED, uuid)
        return {"start": True, "protect": True, "peer": name}

    @staticmethod
    def _unknown_holder(record: dict[str, Any], err: CujuError) -> str:
        peer_name = record.get("peer")
        return (f"the VM was protected by {peer_name} when this host last ran it, and {peer_name} cannot be "
                f"asked whether it took it over ({err}); start it once {peer_name} is reachable, or remove "
                "the record under state_dir/protected/ if you know it does not run there")

    def _ctl_protect(self, params: control.Params) -> dict[str, Any]:
        name, uuid, xml = str(params["name"]), str(params["uuid"]), str(params["xml"])
        spec = parse_domain(xml)
        if spec is None:
            raise CujuError(f"{name} has no <cuju:ft> element: nothing to protect")
        return self._protect(name, uuid, spec)

    def _protect(self, name: str, uuid: str, spec: FTSpec) -> dict[str, Any]:
        peer_name = self.resolve_peer(spec)
        with self._lock:
            if uuid in self.primaries:
                return {"scheduled": False, "reason": "already protected or being protected"}
            p = PrimaryDomain(self, name, uuid, spec, peer_name, spec_link=not self.names_this_host(spec))
            self.primaries[uuid] = p
        self.domains.add(p.stats, p.machine)
        p.start()
        return {"scheduled": True, "peer": peer_name}

    def _ctl_stopped(self, params: control.Params) -> dict[str, Any]:
        with self._lock:
            p = self.primaries.get(str(params.get("uuid", "")))
        if p is not None:
            threading.Thread(target=p.stopped, daemon=True).start()
        return {"known": p is not None}

    def _ctl_set_epoch(self, params: control.Params) -> dict[str, Any]:
        domain, value = str(params.get("domain", "")), params.get("epoch_ms")
        if not isinstance(value, int):
            raise CujuError("set-epoch needs 'epoch_ms' (an integer number of milliseconds)")
        with self._lock:
            found = [p for p in self.primaries.values() if domain in (p.name, p.uuid)]
        if not found or found[0].engine is None or not found[0].engine.running:
            raise CujuError(f"{domain!r} is not a domain this host protects right now")
        try:
            found[0].engine.epoch_ms = value
        except ValueError as err:
            raise CujuError(str(err)) from err
        return {"domain": found[0].name, "epoch_ms": value}

    def _ctl_takeover(self, params: control.Params) -> dict[str, Any]:
        """An operator's failover (``failover='manual'``, or a primary known to be dead)."""
        domain = str(params.get("domain", ""))
        found = [sb for sb in list(self.standbys.standbys.values()) if domain in (sb.name, sb.uuid)]
        if not found:
            raise CujuError(f"{domain!r} has no standby on this host")
        return found[0].take_over("an operator asked for it (cuju-libvirt takeover)", by_word=True)

    # -- peer notes ------------------------------------------------------------------------------

    def _note_crashed(self, conn: peer.PeerConnection, body: peer.Body) -> None:
        threading.Thread(target=self.standbys.primary_crashed, args=(body,), daemon=True).start()

    def _note_standby_lost(self, conn: peer.PeerConnection, body: peer.Body) -> None:
        LOG.warning("%s reports the standby of %s stopped", conn.remote, body.get("uuid"))

