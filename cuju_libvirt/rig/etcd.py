"""A real etcd cluster for tests and benchmarks: 3 (or 5) members of Debian's ``etcd-server``.

Two placements:

* **loopback** (:meth:`EtcdCluster.loopback`): every member on 127.0.0.1 with ports of its
  own, for tests of the coordination logic that need no rig;
* **in the rig** (:meth:`EtcdCluster.in_nodes`): each member in a network namespace of its
  own (a :class:`~cuju_libvirt.rig.nodes.NamespaceNode`), on the rig's LAN, so a test can
  crash, isolate or cut a member like a host.

Members run with the settings docs/cluster.md recommends, scaled for tests: ``--pre-vote``
(a member that was cut off and comes back cannot force a new election and stall the
cluster with it), heartbeat 20 ms and election timeout 200 ms (a dead leader is replaced
in a few hundred ms; DESIGN.md measured 0.31 s with 10/100 ms). Data directories live in a
temporary directory (``/dev/shm/cuju-etcd-*``) removed by :meth:`EtcdCluster.stop` (or
by the next cluster's start, when the process that made it was killed); loopback members also die with
the process that started them (``setpriv --pdeathsig``), rig members with the rig's cgroup.
A cluster is healthy in ~2.4 s here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cuju_libvirt.cujud.coord import EtcdClient, tls_context
from cuju_libvirt.errors import CoordError, RigError
from cuju_libvirt.rig.guest_net import socket_in
from cuju_libvirt.rig.nodes import LAN_PREFIXLEN, NamespaceNode
from cuju_libvirt.rig.pki import HostCredentials
from cuju_libvirt.rig.sandbox import Keeper, find_tool, pid_alive, tool
from cuju_libvirt.rig.teardown import PREFIX

if TYPE_CHECKING:
    from cuju_libvirt.rig.hosts import Rig

log = logging.getLogger(__name__)

HEARTBEAT_MS = 20
ELECTION_MS = 200
CLIENT_PORT, PEER_PORT = 2379, 2380
DATA_BASE, DATA_PREFIX = "/dev/shm", "cuju-etcd-"
#: LAN addresses of rig members: .31, .32, ... (the rig uses .1 and .1x, guests .100 and up).
RIG_MEMBER_ADDRESS = "198.19.0.{}"
RIG_MEMBER_FIRST = 31

Spawn = Callable[[Sequence[str], Any], "subprocess.Popen[bytes]"]


def etcd_binary() -> str | None:
    """The etcd server binary, or None when ``etcd-server`` is not installed."""
    return find_tool("etcd")


def _local_spawn(argv: Sequence[str], out: Any) -> subprocess.Popen[bytes]:
    """Start a loopback member that dies with this process (``setpriv --pdeathsig``)."""
    setpriv = find_tool("setpriv")
    prefix = [setpriv, "--pdeathsig", "KILL"] if setpriv else []
    return subprocess.Popen(prefix + list(argv), stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT)


def sweep_stale() -> list[Path]:
    """Remove the data directories of clusters whose starting process died (a killed test run)."""
    removed = []
    for path in Path(DATA_BASE).glob(f"{DATA_PREFIX}*"):
        try:
            owner = int((path / "owner.pid").read_text())
        except (OSError, ValueError):
            owner = 0
        if owner and pid_alive(owner):
            continue
        if owner or time.time() - path.stat().st_mtime > 60:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Member:
    name: str
    host: str
    client_port: int
    peer_port: int
    spawn: Spawn
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    #: ``https`` when the cluster serves its clients over TLS (:attr:`EtcdCluster.tls`).
    scheme: str = "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass(frozen=True)
class EtcdTLS:
    """TLS on the members' client port: their server certificate (``server``, valid for every
    member's address), and clients must show one signed by the same CA (``--client-cert-auth``)
    unless ``client_cert_auth`` is off. ``client``: what :meth:`EtcdCluster.client` shows."""

    server: HostCredentials
    client: HostCredentials | None
    client_cert_auth: bool = True


@dataclass
class EtcdCluster:
    """A cluster of real etcd members; use as a context manager (``with EtcdCluster.loopback():``)."""

    members: list[Member]
    token: str = field(default_factory=lambda: f"cuju-{time.monotonic_ns():x}")
    heartbeat_ms: int = HEARTBEAT_MS
    election_ms: int = ELECTION_MS
    data_dir: Path | None = None
    #: Where the data directory is made (default ``/dev/shm``; the rig's root for rig members).
    data_base: Path | None = None
    #: The namespaces of rig members (:func:`in_rig`), by member name.
    nodes: dict[str, EtcdNode] = field(default_factory=dict)
    #: The network namespace clients connect from (rig members are not reachable from here).
    netns: str | None = None
    #: TLS on the client port (:class:`EtcdTLS`); None: plain HTTP.
    tls: EtcdTLS | None = None

    def __post_init__(self) -> None:
        for m in self.members:
            m.scheme = "http" if self.tls is None else "https"

    @classmethod
    def loopback(cls, size: int = 3, **kwargs: Any) -> EtcdCluster:
        ports = _free_ports(2 * size)
        members = [Member(f"m{i}", "127.0.0.1", ports[2 * i], ports[2 * i + 1], _local_spawn)
                   for i in range(size)]
        return cls(members, **kwargs)

    @classmethod
    def in_nodes(cls, nodes: Sequence[tuple[str, str, Spawn]], **kwargs: Any) -> EtcdCluster:
        """One member per ``(name, ip, spawn)``: ``spawn(argv, stdout)`` starts it in its namespace."""
        return cls([Member(name, ip, CLIENT_PORT, PEER_PORT, spawn) for name, ip, spawn in nodes], **kwargs)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def client(self, timeout: float = 1.0, endpoints: Sequence[str] | None = None) -> EtcdClient:
        """A client of ``endpoints`` (default: all members) that connects from :attr:`netns`."""
        netns = self.netns
        connect = None if netns is None else (
            lambda host, port, t: socket_in(netns, lambda: socket.create_connection((host, port), t)))
        tls = None if self.tls is None else tls_context(
            self.tls.server.ca_file, *((self.tls.client.cert_file, self.tls.client.key_file)
                                       if self.tls.client is not None else ()))
        return EtcdClient(self.endpoints if endpoints is None else endpoints, timeout=timeout,
                          connect=connect, tls=tls)

    def __enter__(self) -> EtcdCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- life cycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        binary = etcd_binary()
        if binary is None:
            raise RigError("etcd is not installed: apt-get install etcd-server (scripts/debian-packages.txt)")
        sweep_stale()
        self.data_dir = Path(tempfile.mkdtemp(prefix=DATA_PREFIX, dir=self.data_base or DATA_BASE))
        (self.data_dir / "owner.pid").write_text(str(os.getpid()))
        for m in self.members:
            self.start_member(m, new=True)
        self.wait_healthy(timeout)

    def _argv(self, m: Member, state: str) -> list[str]:
        binary = etcd_binary()
        assert binary is not None and self.data_dir is not None
        cluster = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            binary, "--name", m.name, "--data-dir", str(self.data_dir / m.name),
            "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", cluster, "--initial-cluster-state", state,
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", str(self.heartbeat_ms), "--election-timeout", str(self.election_ms),
            "--pre-vote", "--logger", "zap", "--log-level", "warn",
            *self._tls_argv(),
        ]

    def _tls_argv(self) -> list[str]:
        if self.tls is None:
            return []
        server = self.tls.server
        return ["--cert-file", str(server.cert_file), "--key-file", str(server.key_file),
                "--trusted-ca-file", str(server.ca_file),
                *(["--client-cert-auth"] if self.tls.client_cert_auth else [])]

    def start_member(self, m: Member, *, new: bool = False) -> None:
        """Start (or restart, keeping its data) one member."""
        assert self.data_dir is not None
        if m.running:
            return
        m.log_path = self.data_dir / f"{m.name}.log"
        with open(m.log_path, "ab") as out:
            m.proc = m.spawn(self._argv(m, "new" if new else "existing"), out)

    def kill_member(self, m: Member) -> None:
        """SIGKILL one member (its data stays: :meth:`start_member` brings it back)."""
        if m.proc is not None and m.proc.poll() is None:
            m.proc.kill()
            m.proc.wait(10)

    def wait_healthy(self, timeout: float = 30.0) -> float:
        """Wait until every running member answers and agrees on a leader; seconds waited."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        last = ""
        while time.monotonic() < deadline:
            for m in self.members:
                if m.proc is not None and m.proc.poll() is not None:
                    raise RigError(f"etcd member {m.name} exited ({m.proc.returncode}): {self._tail(m)}")
            try:
                leaders = {self.client(0.5, [m.client_url]).status().get("leader")
                           for m in self.members if m.running}
                if len(leaders) == 1 and "0" not in leaders and None not in leaders:
                    self.client(1.0, [m.client_url for m in self.members if m.running]).get("/health")
                    return time.monotonic() - t0
                last = f"leaders seen: {sorted(str(x) for x in leaders)}"
            except CoordError as err:
                last = str(err)
            time.sleep(0.05)
        raise RigError(f"etcd cluster not healthy within {timeout:.0f} s ({last})")

    def leader(self) -> Member:
        """The member that currently leads (asked of a running member)."""
        for m in self.members:
            if not m.running:
                continue
            with contextlib.suppress(CoordError):
                status = self.client(0.5, [m.client_url]).status()
                leader_id = str(status.get("leader"))
                if leader_id == str(status["header"]["member_id"]):
                    return m
                for other in self.members:
                    if other.running and other is not m:
                        with contextlib.suppress(CoordError):
                            st = self.client(0.5, [other.client_url]).status()
                            if str(st["header"]["member_id"]) == leader_id:
                                return other
        raise RigError("no etcd member reports a leader")

    def stop(self) -> None:
        for m in self.members:
            if m.proc is not None:
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    self.kill_member(m)
                m.proc = None
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    @staticmethod
    def _tail(m: Member) -> str:
        try:
            return (m.log_path.read_text(errors="replace") if m.log_path else "")[-400:].strip()
        except OSError:
            return "(no log)"

    def iter_running(self) -> Iterator[Member]:
        return (m for m in self.members if m.running)


class EtcdNode(NamespaceNode):
    """A network namespace of its own for one etcd member, on the rig's LAN (``eth0``)."""

    def __init__(self, rig: Rig, index: int) -> None:
        self.label = f"rig {rig.id} etcd{index}"
        self.cgroup = rig.cgroup
        self.address = RIG_MEMBER_ADDRESS.format(RIG_MEMBER_FIRST + index)
        self.keeper: Keeper | None = Keeper.spawn(
            f"{PREFIX}{rig.id}-etcd{index}", rig.cgroup, ("net",), setup="ip link set lo up",
            stderr_path=rig.root / f"etcd{index}-keeper.log")
        ip, port = tool("ip"), f"port-e{index}"
        lan_pid = rig.lan._keeper().pid
        subprocess.run([ip, "link", "add", "eth0", "netns", str(self.keeper.pid), "type", "veth",
                        "peer", "name", port, "netns", str(lan_pid)], check=True, capture_output=True)
        rig.lan.run([ip, "-batch", "-"], input=f"link set {port} master br0\nlink set {port} up\n")
        self.run([ip, "-batch", "-"],
                 input=f"addr add {self.address}/{LAN_PREFIXLEN} dev eth0\nlink set eth0 up\n")

    def spawn(self, argv: Sequence[str], out: Any) -> subprocess.Popen[bytes]:
        return self.popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def set_link(self, up: bool) -> None:
        """Cut (``up=False``) or restore this member's only link: a partition of the member."""
        self.run([tool("ip"), "link", "set", "eth0", "up" if up else "down"])


def in_rig(rig: Rig, size: int = 3, **kwargs: Any) -> EtcdCluster:
    """A cluster of ``size`` members, each in a namespace of its own on ``rig``'s LAN (not
    started: use it as a context manager). Everything it runs is in the rig's cgroup."""
    nodes = [EtcdNode(rig, i) for i in range(size)]
    cluster = EtcdCluster.in_nodes([(f"e{i}", n.address, n.spawn) for i, n in enumerate(nodes)],
                                   data_base=rig.root, netns=rig.lan.netns_path, **kwargs)
    cluster.nodes = {m.name: n for m, n in zip(cluster.members, nodes, strict=True)}
    return cluster
