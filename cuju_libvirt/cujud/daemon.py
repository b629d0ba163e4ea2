"""cujud: the cuju-libvirt daemon, one per host.

This release runs the daemon's foundation: configuration, logging, the local control
socket for the hook and the CLI, the authenticated control channel to the peer hosts'
cujud with heartbeats, the connection to the local libvirtd, and the Prometheus
exporter on ``metrics_listen`` (:mod:`cuju_libvirt.cujud.exporter`). Fault tolerance itself
(pairing, epochs, failover) lives in :mod:`cuju_libvirt.cujud.orchestrator` and
:mod:`cuju_libvirt.cujud.standby`; this module only wires it in. Whatever protects a domain registers its
statistics with ``Daemon.domains`` (:class:`~cuju_libvirt.cujud.exporter.ProtectedDomains`):
from then on the exporter and the ``status`` control method show it.

Peer connections: of two peers, the one whose node name sorts first dials, the other
accepts; a dial that fails is retried with exponential backoff between
``reconnect_min`` and ``reconnect_max``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tenacity

from cuju_libvirt import __version__, config, logsetup
from cuju_libvirt.cujud import control, exporter, peer
from cuju_libvirt.cujud import tls as tlsmod
from cuju_libvirt.cujud.cluster import cluster_status
from cuju_libvirt.cujud.coord import EtcdClient
from cuju_libvirt.cujud.links import PeerLink, PeerLinks, wall_clock
from cuju_libvirt.cujud.orchestrator import Orchestrator
from cuju_libvirt.cujud.virt import LibvirtConnection, LinkState
from cuju_libvirt.errors import ConfigError, CujuError, PeerAuthError, PeerError

LOG = logging.getLogger(__name__)

#: What this cujud can do; clients check these instead of version numbers.
FEATURES: dict[str, bool] = {
    "control": True,
    "peer_channel": True,
    "heartbeat": True,
    "libvirt_events": True,
    "protection": True,
    "replication": True,
    "failover": True,
    "metrics": True,
}
#: What protection does not cover yet (``status`` shows it; docs/failover.md has the details).
LIMITS = ("disk writes are not held per epoch: a failover keeps the writes the dead primary made after the "
          "last committed epoch; serial output is held only on the ports --prepare held (serial-commit, "
          "by default file, unix and tcp; a pty console is not): on the others the lines of the lost "
          "epoch can appear twice after a failover (see docs/failover.md)")
#: Seconds between two samples of each domain's epoch count (for the epoch rate in ``status``).
RATE_SAMPLE_INTERVAL = 1.0

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70


class Daemon:
    """The running cujud: owns every server, connection and thread it starts."""

    def __init__(self, cfg: config.Config, psk: bytes, *, tls: tlsmod.Contexts | None = None) -> None:
        self.cfg = cfg
        self._psk = psk
        self._tls = tls
        self.started = time.monotonic()
        self.stopping = threading.Event()
        self.executor = ThreadPoolExecutor(8, thread_name_prefix="cujud-work")
        self.options = peer.PeerOptions(
            handshake_timeout=min(5.0, cfg.peer_timeout * 2), idle_timeout=cfg.peer_timeout,
            frame_timeout=max(1.0, cfg.peer_timeout), heartbeat_interval=cfg.heartbeat_interval,
        )
        self.links = PeerLinks(
            (name, PeerLink(name, addr, dials=cfg.node_name < name)) for name, addr in cfg.peers.items()
        )
        self.peer_handlers = peer.Handlers(requests={"ping": self._peer_ping, "version": self._peer_version})
        self.peer_server: peer.PeerServer | None = None
        self.control: control.ControlServer | None = None
        self.libvirt = LibvirtConnection(
            cfg.libvirt_uri, backoff_min=cfg.reconnect_min, backoff_max=cfg.reconnect_max
        )
        self._threads: list[threading.Thread] = []
        self._made_run_dir = False
        #: Protected domains on this host: the orchestration adds and removes them here.
        self.domains = exporter.ProtectedDomains()
        self.metrics: exporter.MetricsServer | None = None
        self.orchestrator: Orchestrator | None = None

    # --- start and stop ---

    def start(self) -> None:
        """Start everything; on failure, stop what already started and raise."""
        try:
            if not self.cfg.run_dir.exists():
                self.cfg.run_dir.mkdir(mode=0o755, parents=True)
                self._made_run_dir = True
            self.control = control.ControlServer(self.cfg.control_socket, {
                "ping": self._ctl_ping, "version": self._ctl_version, "config": self._ctl_config,
                "status": self._ctl_status, "peers": self._ctl_peers, "peer-ping": self._ctl_peer_ping,
            })
            self.orchestrator = Orchestrator(
                cfg=self.cfg, libvirt=self.libvirt, domains=self.domains, links=self.links,
                stopping=self.stopping)
            self.orchestrator.install(self.control, self.peer_handlers)
            self.orchestrator.start()
            self.peer_server = peer.PeerServer(
                self.cfg.listen.host, self.cfg.listen.port, node=self.cfg.node_name, psk=self._psk,
                peers=self.cfg.peers, handlers=self.peer_handlers, options=self.options,
                executor=self.executor, on_connection=self._adopt,
                tls=None if self._tls is None else self._tls.server,
            )
            LOG.info("peer channel listening on %s as node %r (%s)", self.cfg.listen, self.cfg.node_name,
                     "mutual TLS 1.3" if self._tls is not None
                     else "pre-shared key: authenticated, NOT encrypted; set peer_tls: on")
            for link in self.links.values():
                if link.dials:
                    t = threading.Thread(target=self._dial_loop, args=(link,), name=f"cujud-dial-{link.name}",
                                         daemon=True)
                    self._threads.append(t)
                    t.start()
                else:
                    LOG.info("waiting for peer %s to connect (it dials: its name sorts first)", link.name)
            self.metrics = exporter.MetricsServer(
                self.cfg.metrics_listen.host, self.cfg.metrics_listen.port,
                exporter.CujuCollector(self.domains, self),
            )
            sampler = threading.Thread(target=self._sample_loop, name="cujud-rates", daemon=True)
            self._threads.append(sampler)
            sampler.start()
            self.libvirt.add_state_listener(self._libvirt_state)
            self.libvirt.open_in_background()
        except BaseException:
            self.stop()
            raise
        if not self.cfg.peers:
            LOG.warning("no peers configured: add the other host under 'peers' in %s",
                        self.cfg.files[0] if self.cfg.files else config.DEFAULT_CONFIG_FILE)

    def stop(self) -> None:
        """Stop everything this daemon started and remove its run-time files."""
        self.stopping.set()
        if self.orchestrator is not None:
            self.orchestrator.close()
        if self.peer_server is not None:
            self.peer_server.close()
        for link in self.links.values():
            with link.lock:
                conn = link.conn
            if conn is not None:
                conn.close("cujud is shutting down")
                conn.join()
        for t in self._threads:
            t.join(5.0)
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        self.libvirt.close()
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self._made_run_dir:
            with contextlib.suppress(OSError):
                self.cfg.run_dir.rmdir()  # only when empty: never someone else's files

    # --- peers ---

    def _dial_loop(self, link: PeerLink) -> None:
        def attempt() -> peer.PeerConnection:
            return peer.connect(
                link.address.host, link.address.port, node=self.cfg.node_name, psk=self._psk,
                expect_peer=link.name, handlers=self.peer_handlers, options=self.options,
                executor=self.executor, tls=None if self._tls is None else self._tls.client,
            )

        def note_failure(state: tenacity.RetryCallState) -> None:
            err = state.outcome.exception() if state.outcome is not None else None
            delay = state.next_action.sleep if state.next_action is not None else 0.0
            with link.lock:
                link.last_error = str(err)
            level = logging.ERROR if isinstance(err, PeerAuthError) else logging.WARNING
            LOG.log(level, "peer %s at %s: %s; retrying in %.1f s", link.name, link.address, err, delay)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(PeerError),
            wait=tenacity.wait_exponential(
                multiplier=self.cfg.reconnect_min, min=self.cfg.reconnect_min, max=self.cfg.reconnect_max
            ),
            stop=lambda _state: self.stopping.is_set(),
            sleep=self._sleep,
            before_sleep=note_failure,
            reraise=True,
        )
        while not self.stopping.is_set():
            try:
                conn = retrying(attempt)
            except PeerError:
                return  # stopping
            self._adopt(conn)
            conn.closed.wait()
            if not self.stopping.is_set():
                self._sleep(self.cfg.reconnect_min)

    def peer_samples(self) -> list[exporter.PeerSample]:
        """Every configured peer for the exporter (:class:`~cuju_libvirt.cujud.exporter.PeerSource`)."""
        return [link.sample() for link in self.links.values()]

    def _sample_loop(self) -> None:
        while not self.stopping.wait(RATE_SAMPLE_INTERVAL):
            self.domains.sample()

    def _sleep(self, seconds: float) -> None:
        self.stopping.wait(seconds)

    def _adopt(self, conn: peer.PeerConnection) -> None:
        link = self.links.get(conn.remote)
        if link is None or self.stopping.is_set():  # the server checks names; this is belt and braces
            conn.close("not a configured peer" if link is not None else "cujud is shutting down")
            return
        with link.lock:
            old, link.conn = link.conn, conn
            link.connects += 1
            link.last_error = ""
        if old is not None and not old.closed.is_set():
            old.close("replaced by a new connection from the same peer")
        LOG.info("peer %s connected (%s)", link.name, conn.address)
        if self.orchestrator is not None:
            self.orchestrator.peer_connected(link.name)

        def lost(c: peer.PeerConnection) -> None:
            with link.lock:
                link.last_seen_before = wall_clock(c.last_seen)
                if link.conn is c:
                    link.conn = None
                    link.last_error = c.close_reason
            if self.stopping.is_set():
                return
            if c.closed_by_peer:
                LOG.info("peer %s left: %s", link.name, c.close_reason)
            else:
                LOG.warning("peer %s lost: %s", link.name, c.close_reason)

        conn.on_close(lost)

    def _peer_ping(self, conn: peer.PeerConnection, body: peer.Body) -> peer.Body:
        return {"node": self.cfg.node_name, "echo": body.get("echo")}

    def _peer_version(self, conn: peer.PeerConnection, body: peer.Body) -> peer.Body:
        return {"version": __version__, "features": FEATURES}

    def _libvirt_state(self, state: LinkState) -> None:
        LOG.debug("libvirt link %s", state.value)

    # --- control socket handlers ---

    def _ctl_ping(self, params: control.Params) -> dict[str, Any]:
        return {"node": self.cfg.node_name, "pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self.started, 3)}

    def _ctl_version(self, params: control.Params) -> dict[str, Any]:
        return {"version": __version__, "control_protocol": control.VERSION, "peer_protocol": peer.PROTOCOL,
                "features": FEATURES}

    def _ctl_config(self, params: control.Params) -> dict[str, Any]:
        return {"values": self.cfg.as_dict(), "sources": dict(self.cfg.sources),
                "files": [str(p) for p in self.cfg.files]}

    def _ctl_peers(self, params: control.Params) -> dict[str, Any]:
        return {"peers": [link.status() for link in self.links.values()]}

    def _ctl_status(self, params: control.Params) -> dict[str, Any]:
        return {
            "node": self.cfg.node_name,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "libvirt": {"uri": self.cfg.libvirt_uri, "state": self.libvirt.state.value},
            "peers": [link.status() for link in self.links.values()],
            "protection": LIMITS,
            "metrics": self.metrics.url if self.metrics is not None else None,
            "domains": self.domain_status(),
            "cluster": self.cluster_status(),
        }

    def cluster_status(self) -> dict[str, Any] | None:
        """The cluster for ``status``: the witness's ownership records (every VM: owner, backup,
        mode, generation), the hosts (lease, failure domain, free memory, VMs) and the placer;
        None in two-host mode, ``error`` when etcd does not answer."""
        orch = self.orchestrator
        if orch is None or orch.witness is None:
            return None
        try:
            return cluster_status(orch.witness, orch.cluster, configured=self.cfg.peers)
        except CujuError as err:
            return {"error": str(err), "vms": [], "hosts": [], "placer": None}

    def domain_status(self) -> list[dict[str, Any]]:
        """Every registered domain for ``status``: role, peer, state, epochs/s, lag, failover, sync."""
        rates = self.domains.rates()
        out = []
        for snap in self.domains.snapshots():
            rate = rates.get(snap.uuid)
            out.append({
                "domain": snap.domain, "uuid": snap.uuid, "role": snap.role, "peer": snap.peer,
                "state": snap.state, "protected": snap.state in exporter.PROTECTED_STATES,
                "tracker": snap.tracker, "epoch_ms": snap.epoch_ms,
                "epochs_per_s": None if rate is None else round(rate, 2),
                "epochs_committed": snap.epochs_committed, "last_acked_epoch": snap.last_acked_epoch,
                "lag_s": None if snap.replication_lag_s is None else round(snap.replication_lag_s, 6),
                "initial_sync_ratio": snap.initial_sync_ratio,
                "output_packets_held": snap.output_packets_held,
                "failovers": snap.failovers_total,
                "last_failover_duration_s": snap.last_failover_duration_s,
                "last_failover_timestamp": snap.last_failover_timestamp,
                "wire_bytes": snap.wire_bytes_total, "pages": snap.pages_total,
                "generation": snap.generation,
                "disk_sync": [
                    {"target": d.target, "synced_bytes": d.synced_bytes, "total_bytes": d.total_bytes,
                     "mode": d.mode, "why": d.why}
                    for d in snap.disk_sync
                ],
            })
        return out

    def _ctl_peer_ping(self, params: control.Params) -> dict[str, Any]:
        name = params.get("peer")
        if not isinstance(name, str):
            raise CujuError("peer-ping needs the parameter 'peer' (a node name)")
        conn = self.links.connection(name)
        start = time.monotonic()
        reply = conn.request("ping", {"echo": start}, timeout=self.cfg.request_timeout)
        rtt = time.monotonic() - start
        if reply.get("echo") != start:
            raise PeerError(f"peer {name} answered ping with a wrong echo")
        return {"peer": reply.get("node"), "rtt_ms": round(rtt * 1e3, 3),
                "heartbeat": conn.status()}


# --- command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cujud",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "cujud - the cuju-libvirt daemon (one per host).\n\n"
            "Serves the local control socket used by the libvirt hook and by\n"
            "'cuju-libvirt', keeps an authenticated channel (pre-shared key, HMAC-SHA256)\n"
            "with the cujud of each peer host, with heartbeats, and follows the local\n"
            "libvirtd's domain events. It always runs in the foreground; systemd (or\n"
            "your supervisor) runs it in the background.\n\n"
            "It exports Prometheus metrics on metrics_listen (default port 7792;\n"
            "see docs/metrics.md).\n\n"
            "It protects the domains whose XML carries <cuju:ft> (the libvirt hook asks it\n"
            "to): a standby on the peer, epochs with output commit, failover (see\n"
            "docs/failover.md)."
        ),
        epilog=(
            "FILES\n"
            f"  {config.DEFAULT_CONFIG_FILE}         main configuration (optional)\n"
            f"  {config.DEFAULT_DROPIN_DIR}/*.yaml   drop-ins, read in sorted order after it\n"
            "  /etc/cuju-libvirt/psk                pre-shared key (mode 0600, the same on both hosts)\n"
            "  /run/cuju-libvirt/cujud.sock         control socket (root only)\n\n"
            "SIGNALS\n"
            "  SIGTERM, SIGINT   shut down cleanly (connections closed, socket removed)\n\n"
            "EXIT STATUS\n"
            "  0   clean shutdown, or --print-config/--check-config succeeded\n"
            "  1   configuration refused (the message names the file, the key and the fix)\n"
            "      or a resource in use (address, control socket)\n"
            "  2   bad command-line usage\n"
            "  70  internal error (run with --debug for the traceback)\n\n"
            "See docs/cujud.md for every configuration key and both protocols."
        ),
    )
    parser.add_argument("-c", "--config", type=Path, metavar="FILE",
                        help=f"main configuration file (default {config.DEFAULT_CONFIG_FILE}); "
                             "named explicitly, it must exist")
    parser.add_argument("--config-dir", type=Path, metavar="DIR",
                        help="drop-in directory (default: cujud.d next to the main file)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration, each value with its source, and exit")
    parser.add_argument("--check-config", action="store_true",
                        help="check the configuration and the pre-shared key file, then exit")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="run in the foreground (the only mode; accepted for service managers)")
    parser.add_argument("-v", "--debug", action="store_true",
                        help="log at DEBUG level whatever log_level says, with tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def load_config(args: argparse.Namespace) -> config.Config:
    main_file: Path = args.config if args.config is not None else config.DEFAULT_CONFIG_FILE
    if args.config is not None and not args.config.exists():
        raise ConfigError(f"configuration file {args.config} does not exist")
    dropins: Path = args.config_dir if args.config_dir is not None else main_file.parent / "cujud.d"
    return config.load(main_file, dropins)


def _sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state, when it runs us."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


def load_credentials(cfg: config.Config) -> tuple[bytes, tlsmod.Contexts | None]:
    """What authenticates this host on the peer channel: certificates (TLS) or the PSK. The
    etcd client's TLS files are loaded too, so that unusable ones stop cujud here."""
    if cfg.etcd_endpoints:
        EtcdClient.for_config(cfg)
    if cfg.peer_tls == "on":
        return b"", tlsmod.Contexts.load(ca_file=cfg.tls_ca_file, cert_file=cfg.tls_cert_file,
                                         key_file=cfg.tls_key_file)
    return config.read_psk(cfg.psk_file), None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # until the configuration is known: warnings and errors on stderr
    logsetup.setup("DEBUG" if args.debug else "WARNING", journal="JOURNAL_STREAM" in os.environ)
    try:
        cfg = load_config(args)
        if args.print_config:
            sys.stdout.write(config.render(cfg))
            return EXIT_OK
        psk, tls = load_credentials(cfg)
        if args.check_config:
            print(f"cujud: configuration OK ({', '.join(map(str, cfg.files)) or 'defaults only'})")
            return EXIT_OK
    except CujuError as err:
        LOG.debug("configuration refused", exc_info=True)
        print(f"cujud: {err}", file=sys.stderr)
        return EXIT_CONFIG
    logsetup.setup("DEBUG" if args.debug else cfg.log_level, journal="JOURNAL_STREAM" in os.environ)
    LOG.info("cujud %s starting as node %r (config: %s)", __version__, cfg.node_name,
             ", ".join(map(str, cfg.files)) or "defaults only")

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        LOG.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    def on_hup(_signum: int, _frame: object) -> None:
        LOG.warning("SIGHUP: cujud does not reload its configuration; restart it to apply changes")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    daemon = Daemon(cfg, psk, tls=tls)
    try:
        daemon.start()
    except CujuError as err:
        logsetup.log_failure(LOG, "cujud could not start", err)
        return EXIT_CONFIG
    except Exception as err:
        logsetup.log_failure(LOG, "cujud could not start (internal error)", err)
        return EXIT_INTERNAL
    _sd_notify("READY=1")
    LOG.info("cujud ready (control socket %s)", cfg.control_socket)
    try:
        while not stop.wait(3600):
            pass
    finally:
        _sd_notify("STOPPING=1")
        daemon.stop()
        LOG.info("cujud stopped")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
