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
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import libvirt

from cuju_libvirt import config, fitness
from cuju_libvirt.cujud import control, peer, records
from cuju_libvirt.cujud.exporter import ProtectedDomains
from cuju_libvirt.cujud.links import PeerLinks
from cuju_libvirt.cujud.qemu_process import alive, ended_on_signal, log_offset, qemu_pid, ram_backing
from cuju_libvirt.cujud.standby import StandbyManager, is_standby_xml
from cuju_libvirt.cujud.virt import LibvirtConnection, LifecycleEvent, LinkState, translate
from cuju_libvirt.domain_xml import FTSpec, parse_domain
from cuju_libvirt.errors import CujuError, DomainXMLError, MonitorError, StateError
from cuju_libvirt.ft_engine.epoch import PrimaryConfig, PrimaryEngine
from cuju_libvirt.ft_engine.output import leftover_filters, remove_leftovers
from cuju_libvirt.ft_engine.state import FTMachine, FTState, Role
from cuju_libvirt.ft_engine.stats import DomainStats
from cuju_libvirt.qmp import QMPClient

LOG = logging.getLogger(__name__)
S = FTState
#: libvirt STOPPED details that mean somebody stopped the domain on purpose.
DELIBERATE_STOPS = frozenset({"SHUTDOWN", "DESTROYED", "SAVED", "MIGRATED", "FROM_SNAPSHOT"})
#: How long a dead QEMU's cause may stay unknown before it counts as a crash (s).
CLASSIFY_WAIT = 0.25
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0
STANDBY_CREATE_TIMEOUT = 120.0
QEMU_USER = "libvirt-qemu"
#: After its monitor broke, how long QEMU may take to exit before it counts as alive (s).
QEMU_EXIT_WAIT = 1.0
#: How long a connection to the peer's FT-link listener may take before the link counts as down (s).
LINK_PROBE_TIMEOUT = 2.0
#: With QEMU's signal line in its log (a deliberate stop), how long to wait for libvirt's
#: STOPPED event that names the cause (s); the VM is gone, so there is no hurry.
CAUSE_WAIT = 2.0
#: Names of the causes libvirt's STOPPED details stand for.
STOP_CAUSES = {
    "DESTROYED": "virsh destroy", "SAVED": "virsh save", "MIGRATED": "migrated to another host",
    "FROM_SNAPSHOT": "a snapshot was reverted", "FAILED": "QEMU failed", "CRASHED": "the guest crashed",
}


class PrimaryDomain:
    """A domain that runs on this host and is (to be) protected by a standby on ``peer``."""

    def __init__(self, orch: Orchestrator, name: str, uuid: str, spec: FTSpec, peer_name: str) -> None:
        self.orch = orch
        self.name = name
        self.uuid = uuid
        self.spec = spec
        self.peer = peer_name
        self.machine = FTMachine(name, Role.PRIMARY)
        self.stats = DomainStats(name, uuid, "primary", peer=peer_name, tracker=spec.tracker,
                                 epoch_ms=spec.epoch_ms)
        self.log = LOG.getChild(name.replace(".", "_"))
        self.engine: PrimaryEngine | None = None
        self.qmp: QMPClient | None = None
        self.pid = 0
        self.ended = threading.Event()
        self._wake = threading.Event()
        #: Set when something changed that makes an attempt worth making now (the peer connected).
        self._retry_now = threading.Event()
        self._log_offset = 0
        self._thread: threading.Thread | None = None
        #: True while may_release decides (the engine is still "running" then) ...
        self._deciding = False
        #: ... and while engine.start() runs on the protection loop's thread.
        self._starting = False

    # -- protecting --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the protection loop, or wake it (after a loss) for an attempt now."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._protect_loop, name=f"cujud-protect-{self.name}",
                                            daemon=True)
            self._thread.start()
        self._wake.set()

    def _protect_loop(self) -> None:
        """One per domain, for its whole life here: (re-)protect whenever it is unprotected."""
        delay = BACKOFF_MIN
        while not self.ended.is_set() and not self.orch.stopping.is_set():
            engine = self.engine
            busy = engine is not None and (engine.running or engine.fenced or self._deciding)
            if busy or self.machine.state not in (S.UNPROTECTED, S.DEGRADED):
                self._wake.wait(0.5)
                self._wake.clear()
                delay = BACKOFF_MIN if self.machine.state is S.PROTECTED else delay
                continue
            try:
                self._pair_once()
                continue
            except CujuError as err:
                self.log.warning("protection not established: %s; the VM runs UNPROTECTED, next attempt "
                                 "in %.1f s", err, delay)
                self.log.debug("details", exc_info=True)
            # The whole delay, whatever wakes the loop meanwhile: a failed attempt's own clean-up
            # (the engine's verdict asks for a re-protection) must not turn the back-off into a
            # busy loop of standby creations on the peer.
            retry_at = time.monotonic() + delay
            self._retry_now.clear()
            while (left := retry_at - time.monotonic()) > 0 and not self.ended.is_set() \
                    and not self.orch.stopping.is_set() and not self._retry_now.is_set():
                self._wake.wait(left)
                self._wake.clear()
            delay = min(delay * 2, BACKOFF_MAX)

    def retry_now(self) -> None:
        """Cut the back-off short: something changed (the peer connected again)."""
        self._retry_now.set()
        self._wake.set()

    def _pair_once(self) -> None:
        conn = self.orch.links.connection(self.peer)
        pid = qemu_pid(self.name)
        if pid is None:
            raise CujuError(f"{self.name} has no running QEMU")
        ram = ram_backing(pid)
        if not self._settle():
            return  # not this host's to protect any more (ceded) or the domain ends
        dom = self.orch.lookup(self.uuid)
        with translate(f"reading the XML of {self.name}"):
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE)
            pxml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE) \
                if dom.isPersistent() else xml
        first = self.machine.state is S.UNPROTECTED
        self.machine.move(S.PAIRING, expect=(S.UNPROTECTED, S.DEGRADED))
        sock: socket.socket | None = None
        try:
            self._probe_link()
            self.log.info("asking %s for a standby", self.peer)
            reply = conn.request("standby-create", {
                "name": self.name, "uuid": self.uuid, "xml": xml, "persistent_xml": pxml,
                "heartbeat_timeout_ms": self.spec.heartbeat_timeout_ms, "failover": self.spec.failover,
            }, timeout=STANDBY_CREATE_TIMEOUT)
            # From here on a standby may come to hold the VM's state: a cujud that dies now
            # leaves this record, and its successor asks the peer before anything leaves.
            records.write(self.orch.state_dir, records.PROTECTED, self.uuid, domain=self.name, peer=self.peer)
            sock = socket.create_connection((self.spec.link_host, self.spec.link_port), timeout=10)
            sock.sendall(bytes.fromhex(str(reply["token"])))
            sock.settimeout(None)
            self.qmp = QMPClient(fitness.qmp_socket_path(self.name))
        except (CujuError, OSError, KeyError, ValueError) as err:
            self.machine.move(S.UNPROTECTED if first else S.DEGRADED, expect=S.PAIRING)
            self._close_qmp()
            self._ask_abandon("pairing failed", quiet=True)
            if sock is not None:
                sock.close()
            raise CujuError(f"pairing with {self.peer} failed: {err}") from err
        self.pid = pid
        self._log_offset = log_offset(self.name)
        counters = self.orch.counter_dir()
        cfg = PrimaryConfig(
            ram_path=ram.path, ram_size=ram.size, tracker=self.spec.tracker, epoch_ms=self.spec.epoch_ms,
            output_commit=self.spec.output_commit, max_packets=self.spec.max_epoch_packets,
            counter_dir=str(counters), ack_timeout=self.spec.heartbeat_timeout_ms / 1e3, tag=self.name,
        )
        self.engine = PrimaryEngine(cfg, qmp=self.qmp, pid=pid, link=sock, stats=self.stats,
                                    machine=self.machine, may_release=self._may_release)
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
                self.machine.move(S.FAILED, expect=(S.UNPROTECTED, S.DEGRADED))
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
        if isinstance(err, MonitorError) or isinstance(err.__cause__, MonitorError):
            # QEMU closes its monitor a moment before it exits: give it that moment
            deadline = time.monotonic() + QEMU_EXIT_WAIT
            while alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.005)
        if not alive(self.pid):
            how = self._classify_exit()
            if self.engine is not None:
                self.engine.vm_ended = how  # the engine then says so in one INFO line, no clean-up in QEMU
            if how.startswith("crash"):
                self._crashed(how)
            else:
                self.log.info("QEMU ended (%s): stopping protection, the standby is dropped", how)
                self._ask_abandon(how, quiet=True)
                self._finish()
            return True  # nothing left to hold: the QEMU is gone
        answer = self._ask_abandon(f"protection failed: {err}")
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

    def _classify_exit(self) -> str:
        """Why QEMU ended: 'deliberate: CAUSE' or 'crash: CAUSE' (see the module docstring)."""
        sig = ended_on_signal(self.name, self._log_offset)
        event = self.orch.wait_stop_event(self.uuid, CAUSE_WAIT if sig is not None else CLASSIFY_WAIT)
        detail = event.detail_name if event is not None else None
        if detail == "SHUTDOWN":
            return f"deliberate: {self.orch.shutdown_cause(self.uuid)}"
        if detail in DELIBERATE_STOPS:
            return f"deliberate: {STOP_CAUSES.get(detail, detail)}"
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
            self.log.warning("could not tell %s (%s): it takes over when both paths are silent",
                             self.peer, err)
        self._finish()

    def _ask_abandon(self, reason: str, *, quiet: bool = False) -> dict[str, Any] | None:
        try:
            conn = self.orch.links.connection(self.peer)
            answer = conn.request("standby-abandon", {"uuid": self.uuid, "reason": reason},
                                  timeout=min(2.0, self.orch.cfg.request_timeout))
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
        self._wait_engine_done()
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
        self._ask_abandon("the domain stopped", quiet=True)
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
        libvirt.add_state_listener(self._libvirt_state)
        self.standbys = StandbyManager(
            libvirt_conn=libvirt, state_dir=cfg.state_dir, ft_host=cfg.ft_listen.host,
            ft_port=cfg.ft_listen.port, peer_silent_for=links.silent_for,
            register=domains.add, unregister=self._unregister, notify_peer=self._notify_peer,
        )

    def install(self, server: control.ControlServer, handlers: peer.Handlers) -> None:
        for method, handler in {
            "hook-prepare": self._ctl_prepare, "protect": self._ctl_protect,
            "hook-stopped": self._ctl_stopped, "set-epoch": self._ctl_set_epoch,
            "takeover": self._ctl_takeover,
        }.items():
            server.register(method, handler)
        handlers.requests["standby-create"] = lambda conn, body: self.standbys.create(conn.remote, body)
        handlers.requests["standby-abandon"] = lambda conn, body: self.standbys.abandon(body)
        handlers.requests["holds"] = lambda conn, body: {"holds": self.standbys.holds(str(body["uuid"]))}
        handlers.notes["primary-crashed"] = self._note_crashed
        handlers.notes["standby-lost"] = self._note_standby_lost

    def close(self) -> None:
        with self._lock:
            primaries = list(self.primaries.values())
        for p in primaries:
            p.shutdown()
        self.standbys.close()

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

    def resolve_peer(self, spec: FTSpec) -> str:
        """The configured peer that ``<cuju:ft peer=...>`` names (by node name or address)."""
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

    def peer_connected(self, name: str) -> None:
        """Peer ``name`` connected (again): the domains it is to protect try now, not after their back-off."""
        with self._lock:
            waiting = [p for p in self.primaries.values() if p.peer == name]
        for p in waiting:
            p.retry_now()

    def _notify_peer(self, name: str, kind: str, body: dict[str, Any]) -> None:
        self.links.connection(name).notify(kind, body)

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
            threading.Thread(target=self._adopt_running, name="cujud-adopt", daemon=True).start()

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
            if is_standby_xml(xml.encode()) or self.standbys.knows(uuid):
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

    def _lifecycle(self, event: LifecycleEvent) -> None:
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
        try:
            name = self.resolve_peer(spec)
            conn = self.links.connection(name)
        except CujuError as err:
            if was_protected is not None:
                return {"start": False, "protect": False, "reason": self._unknown_holder(was_protected, err)}
            return {"start": True, "protect": False, "reason": str(err)}
        if was_protected is not None:
            try:
                holds = conn.request("holds", {"uuid": uuid}, timeout=2.0).get("holds")
            except CujuError as err:
                return {"start": False, "protect": False, "reason": self._unknown_holder(was_protected, err)}
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
            p = PrimaryDomain(self, name, uuid, spec, peer_name)
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
        return found[0].take_over("an operator asked for it (cuju-libvirt takeover)")

    # -- peer notes ------------------------------------------------------------------------------

    def _note_crashed(self, conn: peer.PeerConnection, body: peer.Body) -> None:
        threading.Thread(target=self.standbys.primary_crashed, args=(body,), daemon=True).start()

    def _note_standby_lost(self, conn: peer.PeerConnection, body: peer.Body) -> None:
        LOG.warning("%s reports the standby of %s stopped", conn.remote, body.get("uuid"))

