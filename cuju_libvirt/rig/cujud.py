"""cujud on the two rig hosts, and protected Linux guests for the end-to-end tests, the
demo and the ``failover_product`` benchmark.

    shim = write_hook_shim(tmpdir)                       # the hook, for Rig(hooks={"cuju": shim})
    with Rig(hooks={HOOK_NAME: shim}) as rig, cujud_pair(rig) as (ca, cb):
        xml = protected_linux_xml(rig, guest, "vm", observer, ...)   # via cuju-libvirt xml enable --prepare
        rig.a.virsh("define", str(xml)); rig.a.virsh("start", "vm")
        ca.wait_domain("vm", "protected")

Each cujud runs inside its host (``Host.popen``) with a configuration written to the host's
``/etc/cuju-libvirt``: node names ``cuju-a``/``cuju-b``, the peer channel on the LAN
(second heartbeat path), the FT data plane on the FT link, one pre-shared key.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from cuju_libvirt.cujud.control import ControlClient
from cuju_libvirt.errors import CujuError, RigError
from cuju_libvirt.hooks import HOOK_NAME, shim_text
from cuju_libvirt.rig.domains import domain_xml
from cuju_libvirt.rig.hosts import FIRST_GUEST_ADDRESS, LAN_BRIDGE, Host, Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest, kernel_cmdline
from cuju_libvirt.rig.nodes import LAN_PREFIXLEN
from cuju_libvirt.rig.observer import Observer, epoch_ms_from_rate, one_epoch_packets
from cuju_libvirt.rig.pki import PKI

__all__ = [
    "HOOK_NAME", "Cujud", "cujud_cluster", "cujud_pair", "protected_counter_xml", "protected_linux_xml",
    "write_hook_shim",
]

CONTROL_SOCKET = "/run/cuju-libvirt/cujud.sock"
#: Where a cujud started with ``record_tokens`` notes its FT-link tokens (inside its host).
TOKENS_FILE = "/var/log/cuju-libvirt/link-tokens.jsonl"
#: cujud as ``python -m cuju_libvirt.cujud.daemon`` runs it, except that each one-time FT-link
#: token this host hands out (and the link secret that goes with it) is also appended to the
#: file named by its first argument, one JSON object a line: what an eavesdropping test must
#: not find on the wire. The product never writes them anywhere; this wraps it in the test only.
TOKEN_RECORDER = """
import json, sys
from cuju_libvirt.cujud import standby
from cuju_libvirt.cujud.daemon import main
out = sys.argv.pop(1)
expect = standby.FTListener.expect
def recording(self, on_connect, secret=None):
    token = expect(self, on_connect, secret)
    with open(out, "a") as f:
        f.write(json.dumps({"token": token, "secret": None if secret is None else secret.hex()}) + "\\n")
    return token
standby.FTListener.expect = recording
sys.exit(main(sys.argv[1:]))
"""
#: cujud's Prometheus port on each rig host (its LAN address).
METRICS_PORT = 7792
#: Heartbeats every 50 ms: well inside the 500 ms default heartbeat-timeout-ms.
DEFAULT_SETTINGS: Mapping[str, Any] = {
    "heartbeat_interval": 0.05, "peer_timeout": 1.0, "request_timeout": 10.0,
    "reconnect_min": 0.2, "reconnect_max": 2.0, "log_level": "INFO",
}


def write_hook_shim(directory: Path) -> Path:
    """The hook file (for this Python) in ``directory``."""
    path = directory / HOOK_NAME
    path.write_text(shim_text(sys.executable))
    path.chmod(0o755)
    return path


class Cujud:
    """One cujud process on one rig host."""

    def __init__(self, host: Host, peer: Host | Sequence[Host], psk: str,
                 settings: Mapping[str, Any], *, record_tokens: bool = False) -> None:
        self.host = host
        self.record_tokens = record_tokens
        peers = [peer] if isinstance(peer, Host) else list(peer)
        self.log_path = host.outside("/var/log/cuju-libvirt/cujud.log")
        etc = host.outside("/etc/cuju-libvirt")
        etc.mkdir(parents=True, exist_ok=True)
        psk_file = etc / "psk"
        psk_file.write_text(psk)
        psk_file.chmod(0o600)
        cfg = {
            "node_name": host.hostname, "listen": f"{host.lan_address}:7790",
            "ft_listen": f"{host.ft_address}:7791", "metrics_listen": f"{host.lan_address}:{METRICS_PORT}",
            "peers": {p.hostname: f"{p.lan_address}:7790" for p in peers}, **settings,
        }
        (etc / "cujud.yaml").write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen[bytes] | None = None
        #: Where this process's lines begin in ``log_path`` (a rig's hosts keep one log file).
        self.log_start = 0

    def start(self, timeout: float = 20.0) -> Cujud:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            entry = ["-m", "cuju_libvirt.cujud.daemon"]
            if self.record_tokens:
                self.host.outside(TOKENS_FILE).unlink(missing_ok=True)  # this run's tokens only
                entry = ["-c", TOKEN_RECORDER, TOKENS_FILE]
            self.proc = self.host.popen(
                [sys.executable, *entry, "--config", "/etc/cuju-libvirt/cujud.yaml"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(CujuError, OSError):
                self.call("ping")
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RigError(f"cujud on {self.host.label} did not come up (see {self.log_path})")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
        self.proc = None

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to this cujud and reap it (SIGKILL if it outlives 30 s): what it
        started (QEMU, block servers) lives on, as after a crash of the daemon."""
        if self.proc is None:
            raise RigError(f"cujud on {self.host.label} does not run")
        self.proc.send_signal(sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        with ControlClient(self.host.outside(CONTROL_SOCKET), timeout=10.0) as client:
            return client.call(method, params)

    def log(self) -> str:
        """What this cujud logged since its last :meth:`start` (not earlier tests on the rig)."""
        with open(self.log_path, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace")

    def logged_at(self, text: str, offset: int = 0) -> float | None:
        """The wall-clock time (``time.time()``) of the first line past byte ``offset`` of the
        log that contains ``text``, or None. The log's stamps have milliseconds."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            for raw in f:
                line = raw.decode(errors="replace")
                if text in line:
                    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                    return stamp.timestamp()  # local time, as logging's asctime writes it
        return None

    def link_tokens(self) -> list[dict[str, str | None]]:
        """The FT-link tokens (hex) and link secrets (hex, or None on a link in the clear) this
        cujud handed out so far; only when started with ``record_tokens``."""
        path = self.host.outside(TOKENS_FILE)
        if not self.record_tokens:
            raise RigError(f"cujud on {self.host.label} does not record its tokens (record_tokens=False)")
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def domain(self, name: str) -> dict[str, Any] | None:
        """This cujud's ``status`` entry of ``name``, or None."""
        for entry in self.call("status")["domains"]:
            if entry["domain"] == name:
                return dict(entry)
        return None

    def one_epoch_gap(self, name: str, pps: float, epoch_ms: float) -> int:
        """The largest gap the claim allows a failover of ``name``: one epoch's datagrams of a
        sender at ``pps``, for the epochs as they ran just now on this (primary) cujud. An epoch
        lasts at least ``epoch_ms``; under TCG on shared cores it also waits for its
        predecessor's acknowledgement, so the measured epoch rate decides when it is slower."""
        rate = (self.domain(name) or {}).get("epochs_per_s")
        return one_epoch_packets(pps, epoch_ms_from_rate(epoch_ms, rate))

    def wait_domain(self, name: str, state: str, timeout: float = 120.0) -> dict[str, Any]:
        return self.wait_for(name, lambda e: e["state"] == state, repr(state), timeout)

    def committed_checkpoint(self, name: str, read: Callable[[], int], timeout: float = 120.0) -> int:
        """``read()`` of the running primary ``name``, returned once a committed epoch holds it.

        An epoch ends only once its predecessor is acknowledged, so when ``read`` runs at most
        one epoch after the last acknowledged one (``e0``) was cut already; epoch ``e0 + 2``
        was cut after it. Once that one is acknowledged, a failover resumes from a state at
        least as new as the value read: a counter that only grows is at least that value on
        the backup. Under load this waits as long as the epochs take, not a guessed margin.
        """
        first = self.wait_domain(name, "protected", timeout)
        value = read()
        start = int(first["last_acked_epoch"] or 0)
        self.wait_for(name, lambda e: int(e["last_acked_epoch"] or 0) >= start + 2,
                      f"epoch {start + 2} acknowledged", timeout)
        return value

    def wait_failed_over(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """Until this host runs ``name`` after a failover (whatever its re-protection is doing)."""
        return self.wait_for(name, lambda e: e["role"] == "primary" and (e["failovers"] or 0) >= 1,
                             "failed over here", timeout, interval=0.01)

    def wait_for(self, name: str, test: Callable[[dict[str, Any]], bool], what: str, timeout: float = 120.0,
                 interval: float = 0.1) -> dict[str, Any]:
        """This cujud's ``status`` entry of ``name`` once ``test`` holds for it."""
        deadline = time.monotonic() + timeout
        entry: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            with contextlib.suppress(CujuError, OSError):
                entry = self.domain(name)
                if entry is not None and test(entry):
                    return entry
            time.sleep(interval)
        raise RigError(f"{name} on {self.host.label}: not {what} within {timeout:.0f} s "
                       f"(last status {entry}; see {self.log_path})")

    def peer_connected(self) -> bool:
        with contextlib.suppress(CujuError, OSError):
            return any(p.get("connected") for p in self.call("peers")["peers"])
        return False

    def peers_connected(self) -> bool:
        """True when every configured peer is connected."""
        with contextlib.suppress(CujuError, OSError):
            peers = self.call("peers")["peers"]
            return bool(peers) and all(p.get("connected") for p in peers)
        return False


def _tls_settings(rig: Rig, hosts: Sequence[Host]) -> dict[Host, dict[str, str]]:
    """A CA for this rig and a certificate per host (node name in its SAN), in the hosts'
    /etc/cuju-libvirt/pki; the cujud settings that use them (``peer_tls: on``)."""
    pki = PKI(rig.root / "pki")
    out: dict[Host, dict[str, str]] = {}
    for host in hosts:
        creds = pki.host(host.hostname)
        inside = Path("/etc/cuju-libvirt/pki")
        target = host.outside(str(inside))
        (target / "private").mkdir(parents=True, exist_ok=True)
        for src, rel in ((creds.ca_file, "ca-cert.pem"), (creds.cert_file, "host-cert.pem"),
                         (creds.key_file, "private/host-key.pem")):
            shutil.copy(src, target / rel)
        (target / "private/host-key.pem").chmod(0o600)
        out[host] = {"peer_tls": "on", "tls_ca_file": str(inside / "ca-cert.pem"),
                     "tls_cert_file": str(inside / "host-cert.pem"),
                     "tls_key_file": str(inside / "private/host-key.pem")}
    return out


@contextlib.contextmanager
def cujud_pair(rig: Rig, logs: Path | None = None, *, tls: bool | Collection[Host] = False,
               record_tokens: bool = False, connected: bool = True,
               **settings: Any) -> Iterator[tuple[Cujud, Cujud]]:
    """cujud on hosts a and b, peered; stopped (SIGTERM, then SIGKILL) on exit, their logs
    (and libvirt's QEMU logs) copied into ``logs`` if given. ``tls``: mutual TLS on the peer
    channel with a CA of the rig's own, and so an encrypted FT link (or only for the hosts
    named, to show how the others are refused). ``record_tokens``: see :meth:`Cujud.link_tokens`.
    ``connected=False``: do not wait for the peers to connect (they may refuse each other)."""
    with cujud_cluster(rig, [rig.a, rig.b], logs, tls=tls, record_tokens=record_tokens,
                       connected=connected, **settings) as (ca, cb):
        yield ca, cb


@contextlib.contextmanager
def cujud_cluster(rig: Rig, hosts: Sequence[Host] | None = None, logs: Path | None = None, *,
                  tls: bool | Collection[Host] = False, record_tokens: bool = False,
                  connected: bool = True, host_settings: Mapping[str, Mapping[str, Any]] | None = None,
                  after_start: Callable[[Cujud], None] | None = None,
                  **settings: Any) -> Iterator[tuple[Cujud, ...]]:
    """cujud on ``hosts`` (default: every host of the rig), each listing all the others as
    peers, all connected before this yields (started, and returned, in the order of
    ``hosts``); stopped on exit, their logs copied into ``logs/NAME`` if given. ``tls``,
    ``record_tokens`` and ``connected`` as in :func:`cujud_pair`; ``host_settings``: settings
    of one host only, by its rig name (``{"c": {"failure_domain": "rack2"}}``);
    ``after_start(cujud)`` runs once each cujud is up, before the next one starts (to wait
    until the first is the cluster's placer, say)."""
    members = list(hosts if hosts is not None else rig.hosts.values())
    psk = secrets.token_hex(32) + "\n"
    merged = {**DEFAULT_SETTINGS, **settings}
    with_tls = members if tls is True else [h for h in members if tls and h in tls]
    per_host: dict[Host, dict[str, str]] = {h: {} for h in members}
    if with_tls:
        per_host |= _tls_settings(rig, with_tls)
    own = host_settings or {}
    cujuds = tuple(Cujud(h, [p for p in members if p is not h], psk,
                         {**merged, **per_host[h], **own.get(h.name, {})},
                         record_tokens=record_tokens) for h in members)
    try:
        for c in cujuds:
            c.start()
            if after_start is not None:
                after_start(c)
        deadline = time.monotonic() + 20
        while connected and not all(c.peers_connected() for c in cujuds):
            if time.monotonic() > deadline:
                raise RigError("the cujud did not all connect (see "
                               f"{', '.join(str(c.log_path) for c in cujuds)})")
            time.sleep(0.1)
        yield cujuds
    finally:
        for c in cujuds:
            c.stop()
            if logs is not None:
                _keep_logs(c.host, logs / c.host.name)


@contextlib.contextmanager
def hooked_rig(host_count: int = 2) -> Iterator[Rig]:
    """A rig of ``host_count`` hosts with the cuju hook installed before their libvirtd starts
    (the product path: ``virsh start`` asks cujud), up for the ``with`` block."""
    with tempfile.TemporaryDirectory(prefix="cuju-hook.") as tmp, \
            Rig(hooks={HOOK_NAME: write_hook_shim(Path(tmp))}, host_count=host_count) as rig:
        yield rig


def cleanup_protected(rig: Rig, name: str) -> None:
    """Destroy and undefine ``name`` on every host of the rig and forget cujud's records of it
    (the end of an e2e test or a benchmark run)."""
    hosts = list(rig.hosts.values())
    for _ in range(2):  # twice: a primary may re-pair onto a host whose standby just went
        for host in hosts:
            if host.keeper is not None and host.keeper.alive():
                host.virsh("destroy", name, check=False)
        time.sleep(0.5)
    for host in hosts:
        if host.keeper is not None and host.keeper.alive():
            host.virsh("undefine", name, check=False)
        for kind in ("ceded", "takeovers", "protected"):
            for f in host.outside(f"/var/lib/cuju-libvirt/{kind}").glob("*.json"):
                f.unlink()


def _keep_logs(host: Host, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    for inside in ("/var/log/cuju-libvirt", "/var/log/libvirt/qemu"):
        with contextlib.suppress(OSError):
            for f in host.outside(inside).glob("*.log"):
                shutil.copy(f, into / f.name)


def protected_linux_xml(
    rig: Rig, guest: LinuxGuest, name: str, observer: Observer, *, mac: str, pps: int,
    epoch_ms: int = 20, heartbeat_timeout_ms: int = 500, memory_mib: int = 256,
    extra: tuple[str, ...] = (), peer: str | None = None, mode: str = "count,udp",
    data_disk: Path | None = None, params: Mapping[str, Any] | None = None, data_disk_format: str = "raw",
) -> Path:
    """The Linux test guest's XML marked for protection with ``cuju-libvirt xml enable --prepare``.

    ``mode`` and ``params`` go to the guest's agent (:func:`kernel_cmdline`); ``data_disk``
    is a writable image (``data_disk_format``) the guest sees as ``/dev/vda``."""
    cmdline = kernel_cmdline(
        mode, ip=f"{FIRST_GUEST_ADDRESS}/{LAN_PREFIXLEN}", mac=mac, pps=pps,
        peer="{}:{}".format(*observer.udp_address), tcp="{}:{}".format(*observer.tcp_address),
        **(params or {}),
    )
    plain = rig.root / f"{name}.plain.xml"
    plain.write_text(domain_xml(
        name, memory_mib=memory_mib,
        kernel=rig.stage_file(guest.kernel, f"{name}-kernel"),
        initrd=rig.stage_file(guest.initrd, f"{name}-initrd"),
        cmdline=cmdline, serial_log=f"/var/log/libvirt/qemu/{name}-serial.log", bridge=LAN_BRIDGE, mac=mac,
        data_disk=data_disk, data_disk_format=data_disk_format,
    ))
    return _enable_ft(rig, plain, rig.root / f"{name}.xml", epoch_ms=epoch_ms,
                      heartbeat_timeout_ms=heartbeat_timeout_ms, extra=extra, peer=peer)


def protected_counter_xml(rig: Rig, image: Path, name: str, *, mac: str, epoch_ms: int = 20,
                          extra: tuple[str, ...] = (), disk_format: str = "raw",
                          peer: str | None = None) -> Path:
    """The boot-sector counter guest (``image``, from :func:`~cuju_libvirt.rig.guests.boot_image`;
    a copy of its own, converted to ``disk_format``) marked for protection with
    ``cuju-libvirt xml enable --prepare`` (its boot disk served and replicated, unless
    ``extra`` says ``--no-serve-disks``); ``peer`` as in :func:`protected_linux_xml`."""
    disk = rig.stage_file(image, f"{name}.img")
    if disk_format != "raw":
        converted = disk.with_suffix(f".{disk_format}")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", disk_format, str(disk), str(converted)],
                       check=True, capture_output=True, timeout=60)
        disk.unlink()
        disk = converted
    plain = rig.root / f"{name}.plain.xml"
    plain.write_text(domain_xml(
        name, memory_mib=64, disk=disk,
        serial_log=f"/var/log/libvirt/qemu/{name}-serial.log", bridge=LAN_BRIDGE, mac=mac,
    ).replace("type=\"raw\"", f"type=\"{disk_format}\"", 1))
    return _enable_ft(rig, plain, rig.root / f"{name}.xml", epoch_ms=epoch_ms, heartbeat_timeout_ms=500,
                      extra=extra, peer=peer)


def _enable_ft(rig: Rig, plain: Path, out: Path, *, epoch_ms: int, heartbeat_timeout_ms: int,
               extra: tuple[str, ...] = (), peer: str | None = None) -> Path:
    """``cuju-libvirt xml enable --prepare`` of ``plain`` into ``out``; peer: host b (its FT
    link named), or ``peer`` as given (``auto``: cujud chooses the backup, with etcd the
    cluster's placer; ``""``: no peer, the cluster's placer chooses it)."""
    where = ["--peer", peer] if peer else [] if peer == "" else ["--peer", rig.b.hostname, "--link",
                                                                 f"{rig.b.hostname}-ft"]
    proc = subprocess.run(
        [sys.executable, "-m", "cuju_libvirt.cli", "xml", "enable", str(plain), *where,
         "--epoch-ms", str(epoch_ms),
         "--heartbeat-timeout-ms", str(heartbeat_timeout_ms), *extra, "--prepare"],
        capture_output=True, text=True, check=False, timeout=60,
    )
    if proc.returncode != 0:
        raise RigError(f"cuju-libvirt xml enable failed: {proc.stderr.strip()}")
    out.write_text(proc.stdout)
    return out
