"""The two-host rig: two real, isolated libvirtd "hosts" and a LAN, all on this one machine.

::

    with Rig() as rig:                       # Rig().up() ... rig.down()
        subprocess.run(["virsh", "-c", rig.a.uri, "define", "vm.xml"])
        rig.b.popen(["cujud", "--config", "/etc/cuju-libvirt/cujud.yaml"])
        rig.lan.popen(["python3", "observer.py", "--listen", OBSERVER_ADDRESS])

Each host (``a`` and ``b``) is a mount + UTS + network namespace with hostname ``cuju-a`` /
``cuju-b``, its own virtlogd and libvirtd, and its own libvirt directories: per-host
directories of the rig root are bind-mounted over the standard paths *inside* the host's
mount namespace, so libvirt runs with its stock paths while tests outside reach everything
through the rig root::

    <base>/cuju-rig-<id>/          tmpfs, source "cuju-rig-<id>" (base: $CUJU_RIG_BASE or /tmp)
        rig.json                   state read by `python -m cuju_libvirt.rig down|status`
        dev/kvm                    /dev/kvm with Debian's permissions (root:kvm 0660), see below
        a/etc    -> /etc/libvirt        generated libvirtd.conf (own host_uuid), qemu.conf, hooks/qemu.d/
        a/run    -> /run                libvirt/libvirt-sock, libvirtd.pid, cuju-libvirt/ (cujud)
        a/lib    -> /var/lib/libvirt    qemu/ram/: memory_backing_dir, the guests' RAM files
        a/log    -> /var/log/libvirt    qemu/NAME.log, libvirtd.log, virtlogd.log
        a/cache  -> /var/cache/libvirt  QEMU capabilities cache
        a/hosts  -> /etc/hosts          names of both hosts and the observer
        b/...                           host B, the same

Networks (addresses from 198.18.0.0/15 only; no interface ever exists in the root network
namespace, so interface names need no prefix and rigs cannot collide)::

      host A netns                      host B netns
      ft0 198.18.0.1/30 ============== ft0 198.18.0.2/30         the FT link (veth pair)
      br-lan 198.19.0.11/24            br-lan 198.19.0.12/24      guests' NICs: <interface type='bridge'>
        `- uplink                        `- uplink                                <source bridge='br-lan'/>
             |        lan netns             |
             `---- port-a  br0  port-b -----'                     the LAN (second heartbeat path)
                   198.19.0.1/24 (OBSERVER_ADDRESS)               tests' observers: rig.lan.popen(...)

Process containment and teardown: see :mod:`cuju_libvirt.rig.sandbox`. A rig owned by a
process (the default) also starts a *reaper* in its own session that tears the rig down
when the owner dies without calling :meth:`Rig.down` (SIGKILL, a crashed test run).
``python -m cuju_libvirt.rig down --all`` removes whatever is left of rigs whose owner is gone.

``/dev/kvm``: this machine has no udev, so ``/dev/kvm`` is ``root:root 0600`` instead of
Debian's ``root:kvm 0660``. libvirt 9.0 then concludes at every domain start that KVM "is no
longer available" to the ``libvirt-qemu`` user and re-probes QEMU's capabilities (~4 s per
``virsh start``). Each host sees a node with Debian's permissions in its own mount namespace
instead; guests still run TCG (``<domain type='qemu'>``), nothing outside the rig changes.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cuju_libvirt.errors import RigError
from cuju_libvirt.rig.guests import cache_dir as guest_cache_dir
from cuju_libvirt.rig.sandbox import (
    Cgroup,
    Keeper,
    RigUnavailable,
    cgroup2_mount,
    check_capabilities,
    pid_alive,
    pid_start_time,
    run_quiet,
    tool,
)
from cuju_libvirt.rig.teardown import PREFIX, STATE_FILE, RigTraces, default_base, read_state, remove_rig

log = logging.getLogger(__name__)

FT_PREFIXLEN = 30
LAN_PREFIXLEN = 24
#: The LAN address of the ``lan`` namespace, where tests run their observers.
OBSERVER_ADDRESS = "198.19.0.1"
#: First LAN address free for guests (the rig itself uses .1, .11 and .12).
FIRST_GUEST_ADDRESS = "198.19.0.100"
FT_IFACE = "ft0"
LAN_BRIDGE = "br-lan"


@dataclass(frozen=True)
class HostSpec:
    """Name and addresses of one rig host."""

    name: str
    hostname: str
    ft_address: str
    lan_address: str


HOST_SPECS = (
    HostSpec("a", "cuju-a", "198.18.0.1", "198.19.0.11"),
    HostSpec("b", "cuju-b", "198.18.0.2", "198.19.0.12"),
)

#: (directory of the host under the rig root, the standard path it replaces inside the host).
#: /run comes last: it is where the others' sockets live once libvirtd runs.
BINDS = (
    ("etc", "/etc/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("hosts", "/etc/hosts"),
    ("run", "/run"),
)

_HOST_SETUP = """\
root=$1; shift; hostname_=$1; shift
while [ $# -gt 0 ]; do mount --bind "$1" "$2"; shift 2; done
hostname "$hostname_"
"""

_NET_SETUP = """\
for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 /proc/sys/net/ipv6/conf/default/disable_ipv6; do
    if [ -w "$f" ]; then echo 1 > "$f"; fi
done
ip link set lo up
"""


def _daemon_env() -> dict[str, str]:
    """Environment for processes started inside a host: ours, without client libvirt settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIBVIRT_")}
    path = env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
    env["PATH"] = os.pathsep.join([*path, *(d for d in ("/usr/sbin", "/sbin") if d not in path)])
    return env


def _lsm_active() -> bool:
    """True if AppArmor or SELinux is enforcing here (their profiles do not know the rig's paths)."""
    apparmor = Path("/sys/module/apparmor/parameters/enabled")
    try:
        if apparmor.read_text().strip() == "Y":
            return True
    except OSError:
        pass
    try:
        return Path("/sys/fs/selinux/enforce").read_text().strip() == "1"
    except OSError:
        return False


class _NamespaceNode:
    """Something that owns a keeper and runs commands inside its namespaces."""

    label: str
    keeper: Keeper | None
    cgroup: Cgroup

    def _keeper(self) -> Keeper:
        if self.keeper is None or not self.keeper.alive():
            raise RigError(f"{self.label} is not running (its namespace keeper is gone)")
        return self.keeper

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this node's namespaces and the rig's cgroup."""
        return self.cgroup.wrap(self._keeper().nsenter(argv))

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside, wait, and return its output; :class:`RigError` if it fails and ``check``."""
        try:
            proc = subprocess.run(
                self.command(argv), input=input, capture_output=True, text=True, timeout=timeout,
                env=dict(env) if env is not None else _daemon_env(), check=False,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as err:
            raise RigError(f"{self.label}: {' '.join(argv)} did not finish within {timeout:.0f} s") from err
        if check and proc.returncode != 0:
            raise RigError(
                f"{self.label}: {' '.join(argv)} failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        return proc

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside and return it running (keyword arguments go to :class:`subprocess.Popen`).

        It is part of the rig's cgroup, so :meth:`Rig.down` ends it if the caller does not.
        """
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("env", _daemon_env())
        return subprocess.Popen(self.command(argv), **kwargs)


class Host(_NamespaceNode):
    """One libvirt host of the rig: its namespaces, directories, configuration and daemons."""

    def __init__(self, rig_id: str, spec: HostSpec, root: Path, cgroup: Cgroup, keeper: Keeper | None = None):
        self.rig_id = rig_id
        self.spec = spec
        self.name = spec.name
        self.hostname = spec.hostname
        self.label = f"rig {rig_id} host {spec.name}"
        self.root = root
        self.cgroup = cgroup
        self.keeper = keeper

    def __repr__(self) -> str:
        return f"<Host {self.name} ({self.hostname}) of rig {self.rig_id}>"

    @property
    def uri(self) -> str:
        """The libvirt URI that reaches this host's libvirtd from outside (and inside)."""
        return f"qemu+unix:///system?socket={self.root}/run/libvirt/libvirt-sock"

    @property
    def ft_address(self) -> str:
        return self.spec.ft_address

    @property
    def lan_address(self) -> str:
        return self.spec.lan_address

    @property
    def hooks_dir(self) -> Path:
        """``/etc/libvirt/hooks/qemu.d`` of this host, seen from outside."""
        return self.root / "etc" / "hooks" / "qemu.d"

    @property
    def run_dir(self) -> Path:
        """``/run/cuju-libvirt`` (cujud's run directory) of this host, seen from outside."""
        return self.root / "run" / "cuju-libvirt"

    def outside(self, inside: str | os.PathLike[str]) -> Path:
        """The path, seen from outside, of ``inside`` (a path as the host sees it).

        Only paths under the host's own directories can be mapped (``/etc/libvirt``,
        ``/run``, ``/var/lib/libvirt``, ``/var/log/libvirt``, ``/var/cache/libvirt``);
        anything else is the same file inside and outside.
        """
        path = Path(inside)
        best: tuple[int, Path] | None = None
        for sub, target in BINDS:
            t = Path(target)
            if (path == t or t in path.parents) and (best is None or len(t.parts) > best[0]):
                best = (len(t.parts), self.root / sub / path.relative_to(t))
        return best[1] if best else path

    # -- construction ----------------------------------------------------------------------

    def prepare(self, host_uuid: str) -> None:
        """Create the host's directories and write its libvirt configuration."""
        self.root.mkdir()
        # Directory skeletons as the Debian packages ship them (owners and modes included),
        # so libvirt finds what it expects; then what the rig itself needs.
        for sub, target in BINDS:
            if target in ("/etc/libvirt", "/etc/hosts", "/run"):
                continue
            _copy_dir_skeleton(Path(target), self.root / sub)
        for d in ("etc/hooks/qemu.d", "etc/qemu/networks/autostart", "etc/nwfilter", "run/libvirt",
                  "run/cuju-libvirt", "log/qemu", "cache/qemu", "lib/qemu/ram"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        qemu_dir = self.root / "lib" / "qemu"
        st = qemu_dir.stat()
        os.chown(qemu_dir / "ram", st.st_uid, st.st_gid)
        etc = self.root / "etc"
        header = f"# Generated by the cuju-libvirt test rig {self.rig_id} for host {self.hostname}.\n"
        (etc / "libvirtd.conf").write_text(
            header
            + f'host_uuid = "{host_uuid}"\n'
            + 'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
        )
        (etc / "virtlogd.conf").write_text(header + 'log_outputs = "3:file:/var/log/libvirt/virtlogd.log"\n')
        qemu_conf = [
            header,
            "# Guest RAM in files on the rig's tmpfs: shared memory backing, readable from outside.",
            'memory_backing_dir = "/var/lib/libvirt/qemu/ram"',
            "# No cgroups of libvirt's own: QEMU stays in the rig's cgroup (one cgroup.kill ends it),",
            "# and the two hosts cannot collide on libvirt's machine-wide /machine/qemu-ID-NAME groups.",
            "cgroup_controllers = [ ]",
            "# Plain chown without trusted.libvirt.* xattrs: both hosts use the same image files,",
            "# and nothing is left on files outside the rig.",
            "remember_owner = 0",
        ]
        if _lsm_active():
            qemu_conf += ["# The LSM profiles do not know the rig's paths.", 'security_driver = "none"']
        (etc / "qemu.conf").write_text("\n".join(qemu_conf) + "\n")
        (etc / "libvirt.conf").write_text(header + 'uri_default = "qemu:///system"\n')

    def write_hosts_file(self, entries: Sequence[tuple[str, str]]) -> None:
        lines = ["127.0.0.1\tlocalhost", *(f"{addr}\t{name}" for addr, name in entries)]
        (self.root / "hosts").write_text("\n".join(lines) + "\n")

    def start_namespaces(self, kvm_node: Path | None) -> None:
        """Start the keeper: new namespaces, the bind mounts inside, the hostname, loopback."""
        binds: list[str] = []
        for sub, target in BINDS:
            binds += [str(self.root / sub), target]
        if kvm_node is not None:
            binds[-2:-2] = [str(kvm_node), "/dev/kvm"]
        self.keeper = Keeper.spawn(
            f"{PREFIX}{self.rig_id}-{self.name}", self.cgroup, ("mount", "uts", "net"),
            setup=_HOST_SETUP + _NET_SETUP, args=[str(self.root), self.hostname, *binds],
            stderr_path=self.root / "log" / "keeper.log",
        )

    # -- daemons ----------------------------------------------------------------------------

    def start_daemons(self) -> None:
        """Start virtlogd, then libvirtd (``-d``), and wait until libvirtd accepts connections."""
        self._start_daemon("virtlogd", self.root / "run" / "libvirt" / "virtlogd-sock")
        self._start_daemon("libvirtd", self.root / "run" / "libvirt" / "libvirt-sock")

    def _start_daemon(self, name: str, sock: Path, timeout: float = 60.0) -> None:
        t0 = time.monotonic()
        errfile = self.root / "log" / f"{name}.stderr"
        with open(errfile, "ab") as err:
            proc = subprocess.run(
                self.command([tool(name), "-d"]), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                env=_daemon_env(), timeout=timeout, check=False,
            )
        if proc.returncode != 0:
            raise RigError(
                f"{self.label}: {name} -d failed (exit {proc.returncode}): "
                f"{errfile.read_text(errors='replace').strip()} (see also {self.root}/log/{name}.log)"
            )
        deadline = t0 + timeout
        while not _accepts_connections(sock):
            if time.monotonic() > deadline:
                raise RigError(f"{self.label}: {name} did not listen on {sock} within {timeout:.0f} s "
                               f"(see {self.root}/log/{name}.log)")
            time.sleep(0.02)
        log.info("%s: %s up (%.2f s)", self.label, name, time.monotonic() - t0)

    def daemon_pid(self, name: str = "libvirtd") -> int | None:
        """The pid of this host's ``libvirtd`` or ``virtlogd``, or None if it does not run."""
        try:
            pid = int((self.root / "run" / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def stop_libvirtd(self, timeout: float = 30.0) -> None:
        """Stop libvirtd (SIGTERM, then SIGKILL); running guests stay up."""
        pid = self.daemon_pid("libvirtd")
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            if time.monotonic() > deadline:
                log.warning("%s: libvirtd %d ignored SIGTERM for %.0f s; killing it", self.label, pid,
                            timeout)
                os.kill(pid, signal.SIGKILL)
                deadline += 10
            time.sleep(0.05)

    def restart_libvirtd(self) -> None:
        """Restart libvirtd, e.g. to make it read newly installed hooks; guests keep running."""
        self.stop_libvirtd()
        self._start_daemon("libvirtd", self.root / "run" / "libvirt" / "libvirt-sock")

    def install_hook(self, name: str, source: str | os.PathLike[str], *, restart: bool = False) -> Path:
        """Install executable ``source`` as ``/etc/libvirt/hooks/qemu.d/<name>`` inside the host.

        libvirtd reads hooks only when it starts: pass ``restart=True`` once it runs (or give
        the hooks to :class:`Rig` so they are in place before the first start). Returns the
        outside path of the installed hook.
        """
        if "/" in name or name in ("", ".", ".."):
            raise RigError(f"hook name {name!r} must be a plain file name")
        target = self.hooks_dir / name
        shutil.copyfile(source, target)
        target.chmod(0o755)
        if restart:
            self.restart_libvirtd()
        return target

    # -- what tests look at ---------------------------------------------------------------

    def virsh(self, *args: str, check: bool = True, timeout: float = 120.0) -> str:
        """Run ``virsh -c <uri> ARGS`` from outside and return its stdout."""
        proc = subprocess.run(
            [tool("virsh"), "-q", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout,
            check=False, stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise RigError(f"{self.label}: virsh {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def qemu_pid(self, domain: str) -> int | None:
        """The pid of the QEMU running ``domain`` on this host, or None."""
        try:
            pid = int(self.outside(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def ram_files(self, domain: str) -> list[Path]:
        """Outside paths of the running ``domain``'s guest-RAM files (``mem-path`` on its QEMU
        command line; the path changes with every start)."""
        pid = self.qemu_pid(domain)
        if pid is None:
            raise RigError(f"{self.label}: domain {domain!r} has no running QEMU")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        paths = re.findall(r'"mem-path":"([^"]+)"', cmdline) + re.findall(r"mem-path=([^,\x00]+)", cmdline)
        if not paths:
            raise RigError(f"{self.label}: domain {domain!r} has no file-backed RAM (no mem-path)")
        return [self.outside(p) for p in paths]

    def log_file(self, domain: str) -> Path:
        """Outside path of libvirt's log of ``domain`` (``/var/log/libvirt/qemu/<domain>.log``)."""
        return self.root / "log" / "qemu" / f"{domain}.log"


class Lan(_NamespaceNode):
    """The LAN: a network namespace with bridge ``br0`` joining both hosts' ``br-lan``."""

    def __init__(self, rig_id: str, cgroup: Cgroup, keeper: Keeper | None = None):
        self.rig_id = rig_id
        self.label = f"rig {rig_id} lan"
        self.cgroup = cgroup
        self.keeper = keeper
        self.address = OBSERVER_ADDRESS

    def start_namespaces(self, stderr_path: Path) -> None:
        self.keeper = Keeper.spawn(f"{PREFIX}{self.rig_id}-lan", self.cgroup, ("net",), setup=_NET_SETUP,
                                   stderr_path=stderr_path)


def capabilities_cache_dir() -> Path:
    """Where QEMU capabilities probed by one rig's libvirtd are kept for the next rig."""
    return guest_cache_dir() / "libvirt-qemu-capabilities"


def _accepts_connections(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def _copy_dir_skeleton(src: Path, dst: Path) -> None:
    """Create ``dst`` with the directory tree of ``src`` (directories only, owners and modes kept)."""
    if not src.is_dir():
        raise RigUnavailable([f"{src} does not exist (install libvirt-daemon-system: scripts/setup.sh)"])
    for dirpath, _dirnames, _files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        if rel.parts and rel.parts[0] == "sanlock":
            continue
        target = dst / rel
        target.mkdir(exist_ok=True)
        st = os.stat(dirpath)
        os.chown(target, st.st_uid, st.st_gid)
        target.chmod(stat.S_IMODE(st.st_mode))


class Rig:
    """Two libvirt hosts (:attr:`a`, :attr:`b`) joined by an FT link and a LAN (:attr:`lan`).

    ``Rig().up()`` brings it up and returns it; :meth:`down` removes every trace of it (also
    a context manager). ``hooks`` maps file names to executables installed into
    ``/etc/libvirt/hooks/qemu.d/`` of both hosts before libvirtd first starts. An ``owned``
    rig (the default) is torn down by a reaper process if its owner dies first; the CLI's
    ``up`` makes rigs that are not owned and stay until ``down``.
    """

    def __init__(
        self,
        *,
        base: Path | None = None,
        rig_id: str | None = None,
        hooks: Mapping[str, str | os.PathLike[str]] | None = None,
        owned: bool = True,
    ) -> None:
        self.id = rig_id or secrets.token_hex(3)
        if not re.fullmatch(r"[a-z0-9]{1,12}", self.id):
            raise RigError(f"rig id {self.id!r}: use 1-12 lower-case letters and digits")
        self.base = base or default_base()
        self.name = PREFIX + self.id
        self.root = self.base / self.name
        self.hooks = dict(hooks or {})
        self.owned = owned
        cg_mount = cgroup2_mount()
        self.cgroup = Cgroup((cg_mount or Path("/nonexistent-cgroup2")) / self.name)
        self.hosts: dict[str, Host] = {}
        self.lan = Lan(self.id, self.cgroup)
        self._reaper: subprocess.Popen[bytes] | None = None
        self._reaper_fd: int | None = None
        self._made_root = False

    def __repr__(self) -> str:
        return f"<Rig {self.id} at {self.root}>"

    @property
    def a(self) -> Host:
        return self.hosts["a"]

    @property
    def b(self) -> Host:
        return self.hosts["b"]

    def __enter__(self) -> Rig:
        return self.up()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.down()
        except RigError:
            if exc is None:
                raise
            log.exception("rig %s: teardown failed while handling another error", self.id)

    # -- up ---------------------------------------------------------------------------------

    def up(self) -> Rig:
        """Bring the rig up; on any failure remove what was made and raise.

        :class:`~cuju_libvirt.rig.sandbox.RigUnavailable` if this machine cannot run a rig.
        """
        check_capabilities()
        t0 = time.monotonic()
        log.info("rig %s: bringing up two libvirt hosts under %s", self.id, self.root)
        try:
            self._make_root()
            if self.owned:
                self._start_reaper()
            self._write_state()
            kvm = self._make_kvm_node()
            names = [(s.lan_address, s.hostname) for s in HOST_SPECS]
            names += [(s.ft_address, f"{s.hostname}-ft") for s in HOST_SPECS]
            names.append((OBSERVER_ADDRESS, "observer"))
            for spec in HOST_SPECS:
                host = Host(self.id, spec, self.root / spec.name, self.cgroup)
                host.prepare(str(uuid.uuid4()))
                host.write_hosts_file(names)
                for hook_name, source in self.hooks.items():
                    host.install_hook(hook_name, source)
                host.start_namespaces(kvm)
                self.hosts[spec.name] = host
                log.info("%s: namespaces up, hostname %s, libvirt dirs under %s", host.label, host.hostname,
                         host.root)
            self.lan.start_namespaces(self.root / "lan-keeper.log")
            self._wire_networks()
            self._write_state()
            self._seed_capabilities()
            self.a.start_daemons()
            self._share_capabilities(self.a, self.b)
            self.b.start_daemons()
            self._write_state()
        except BaseException as err:
            if not self._made_root:  # nothing of ours exists (e.g. the id was taken): touch nothing
                raise
            log.error("rig %s: bringing up failed (%s); removing what was made", self.id, err)
            try:
                self.down()
            except RigError as down_err:
                log.error("%s", down_err)
            raise
        log.info("rig %s: up in %.1f s; host a %s, host b %s", self.id, time.monotonic() - t0,
                 self.a.uri, self.b.uri)
        return self

    def _make_root(self) -> None:
        if self.root.exists() or self.cgroup.exists():
            raise RigError(f"rig {self.id} exists already ({self.root}); pick another id or run down")
        self.root.mkdir(mode=0o755)
        self._made_root = True
        proc = subprocess.run(
            [tool("mount"), "-t", "tmpfs", "-o", "mode=0755", self.name, str(self.root)],
            capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            self.root.rmdir()
            raise RigUnavailable([f"cannot mount a tmpfs on {self.root}: {proc.stderr.strip()}"])
        self.cgroup = Cgroup.create(self.name)

    def _start_reaper(self) -> None:
        """A process in its own session that removes the rig when our end of a pipe closes."""
        r, w = os.pipe()
        try:
            self._reaper = subprocess.Popen(
                [sys.executable, "-m", "cuju_libvirt.rig", "_reap", str(self.root)], stdin=r,
                stdout=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            os.close(r)
        self._reaper_fd = w

    def _disarm_reaper(self) -> None:
        if self._reaper_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._reaper_fd, b"disarm\n")
            os.close(self._reaper_fd)
            self._reaper_fd = None
        if self._reaper is not None:
            try:
                self._reaper.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait()
            self._reaper = None

    def stage_file(self, source: str | os.PathLike[str], name: str | None = None) -> Path:
        """Copy ``source`` (e.g. a cached guest disk image) onto the rig's tmpfs; return the copy.

        Give each guest its own copy of a disk image: QEMU locks images it writes, so two
        guests (of this rig, another rig, or another test) cannot use one cached file, and
        libvirt's chown at start then touches only the copy. Both hosts see the same path.
        """
        images = self.root / "images"
        images.mkdir(mode=0o755, exist_ok=True)
        target = images / (name or Path(source).name)
        if "/" in target.name or target.exists():
            raise RigError(f"cannot stage {source} as {target}: exists already or bad name")
        shutil.copyfile(source, target)
        target.chmod(0o644)
        return target

    def _make_kvm_node(self) -> Path | None:
        """A /dev/kvm node with Debian's permissions for the hosts' mount namespaces (see module doc)."""
        try:
            rdev = os.stat("/dev/kvm").st_rdev
        except OSError:
            return None  # no KVM here: libvirt sees none, consistently, and guests use TCG
        node = self.root / "dev" / "kvm"
        node.parent.mkdir()
        os.mknod(node, 0o660 | stat.S_IFCHR, rdev)
        try:
            gid = grp.getgrnam("kvm").gr_gid
        except KeyError:
            gid = 0
        os.chown(node, 0, gid)
        node.chmod(0o660)
        return node

    def _wire_networks(self) -> None:
        """The FT link and the LAN; every interface is created directly inside its namespace."""
        ip = tool("ip")
        a, b, lan = self.a._keeper().pid, self.b._keeper().pid, self.lan._keeper().pid
        for (name1, ns1), (name2, ns2) in (
            ((FT_IFACE, a), (FT_IFACE, b)), (("uplink", a), ("port-a", lan)), (("uplink", b), ("port-b", lan))
        ):
            cmd = ["link", "add", name1, "netns", str(ns1), "type", "veth",
                   "peer", "name", name2, "netns", str(ns2)]
            proc = run_quiet([ip, *cmd])
            if proc.returncode != 0:
                why = proc.stderr.strip()
                raise RigUnavailable([f"cannot create a veth pair (ip {' '.join(cmd)}): {why}"])
        self.lan.run([ip, "-batch", "-"], input=(
            "link add br0 type bridge\n"
            "link set port-a master br0\nlink set port-b master br0\n"
            "link set port-a up\nlink set port-b up\nlink set br0 up\n"
            f"addr add {OBSERVER_ADDRESS}/{LAN_PREFIXLEN} dev br0\n"
        ))
        for host in self.hosts.values():
            host.run([ip, "-batch", "-"], input=(
                f"addr add {host.ft_address}/{FT_PREFIXLEN} dev {FT_IFACE}\nlink set {FT_IFACE} up\n"
                f"link add {LAN_BRIDGE} type bridge\nlink set uplink master {LAN_BRIDGE}\n"
                f"link set uplink up\nlink set {LAN_BRIDGE} up\n"
                f"addr add {host.lan_address}/{LAN_PREFIXLEN} dev {LAN_BRIDGE}\n"
            ))
        log.info("rig %s: FT link %s <-> %s (%s), LAN %s/%d with observer %s", self.id, self.a.ft_address,
                 self.b.ft_address, FT_IFACE, OBSERVER_ADDRESS, LAN_PREFIXLEN, OBSERVER_ADDRESS)

    def _seed_capabilities(self) -> None:
        """Give both hosts the QEMU capabilities cache kept from earlier rigs, if any.

        Probing QEMU takes libvirt 4-8 s here. libvirt validates a cached file itself (QEMU
        and libvirtd binaries, kernel, microcode, /dev/kvm access) and re-probes if it does
        not fit, so seeding only ever saves time.
        """
        kept = capabilities_cache_dir()
        files = sorted(kept.glob("*.xml")) if kept.is_dir() else []
        for host in self.hosts.values():
            target = host.root / "cache" / "qemu" / "capabilities"
            target.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copyfile(f, target / f.name)
                (target / f.name).chmod(0o600)

    def _share_capabilities(self, src: Host, dst: Host) -> None:
        """Make ``src`` probe QEMU (or validate its seeded cache); copy the result to ``dst``
        (before its libvirtd starts) and keep it for later rigs."""
        t0 = time.monotonic()
        src.virsh("capabilities")
        src_dir = src.root / "cache" / "qemu" / "capabilities"
        files = sorted(src_dir.glob("*.xml"))
        for f in files:
            shutil.copy2(f, dst.root / "cache" / "qemu" / "capabilities" / f.name)
        kept = capabilities_cache_dir()
        try:
            kept.mkdir(parents=True, exist_ok=True)
            for f in files:
                if not (kept / f.name).exists() or (kept / f.name).read_bytes() != f.read_bytes():
                    tmp = kept / f".{f.name}.{self.id}.tmp"
                    shutil.copyfile(f, tmp)
                    tmp.replace(kept / f.name)
        except OSError as err:
            log.debug("cannot keep QEMU capabilities in %s: %s", kept, err)
        log.info("%s: QEMU capabilities ready in %.1f s (shared with host %s)", src.label,
                 time.monotonic() - t0, dst.name)

    def _write_state(self) -> None:
        state: dict[str, Any] = {
            "version": 1,
            "id": self.id,
            "root": str(self.root),
            "cgroup": str(self.cgroup.path),
            "owner": {"pid": os.getpid(), "start": pid_start_time(os.getpid())} if self.owned else None,
            "reaper": (
                {"pid": self._reaper.pid, "start": pid_start_time(self._reaper.pid)} if self._reaper else None
            ),
            "hosts": {
                h.name: {
                    "hostname": h.hostname, "uri": h.uri, "ft_address": h.ft_address,
                    "lan_address": h.lan_address, "keeper": h.keeper.pid if h.keeper else None,
                }
                for h in self.hosts.values()
            },
            "lan": {"address": self.lan.address, "keeper": self.lan.keeper.pid if self.lan.keeper else None},
            "namespaces": self.namespace_ids(),
        }
        tmp = self.root / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.root / STATE_FILE)

    def namespace_ids(self) -> dict[str, dict[str, str]]:
        """The kernel's ids of every namespace of the rig, per node (to check they are gone later)."""
        ids: dict[str, dict[str, str]] = {}
        for label, node in [*self.hosts.items(), ("lan", self.lan)]:
            if node.keeper is not None and node.keeper.alive():
                ids[label] = node.keeper.ns_ids()
        return ids

    # -- down -------------------------------------------------------------------------------

    def down(self) -> None:
        """Remove the rig: guests, daemons, everything started inside, namespaces, tmpfs, cgroup.

        Idempotent. :class:`RigError` lists whatever could not be removed.
        """
        self._disarm_reaper()
        root_exists = self.root.exists()
        traces = RigTraces(
            self.id,
            root=self.root if root_exists else None,
            mounted=root_exists and os.path.ismount(self.root),
            cgroup=self.cgroup.path if self.cgroup.exists() else None,
            state=read_state(self.root) if root_exists else None,
        )
        try:
            remove_rig(traces)
        finally:
            for node in [*self.hosts.values(), self.lan]:
                if node.keeper is not None:
                    node.keeper.reap()

    # -- attach -----------------------------------------------------------------------------

    @classmethod
    def attach(cls, root: Path) -> Rig:
        """The running rig whose root is ``root``, from its state file (e.g. one made by the CLI)."""
        state = read_state(root)
        if state is None:
            raise RigError(f"{root}: no rig state ({STATE_FILE}) there")
        rig = cls(base=root.parent, rig_id=str(state["id"]), owned=False)
        rig.cgroup = Cgroup(Path(state["cgroup"]))
        for spec in HOST_SPECS:
            info = (state.get("hosts") or {}).get(spec.name)
            if info is None:
                continue
            keeper = Keeper(f"{PREFIX}{rig.id}-{spec.name}", int(info["keeper"]), ("mount", "uts", "net"))
            rig.hosts[spec.name] = Host(rig.id, spec, root / spec.name, rig.cgroup, keeper)
        lan_pid = (state.get("lan") or {}).get("keeper")
        if lan_pid:
            rig.lan.keeper = Keeper(f"{PREFIX}{rig.id}-lan", int(lan_pid), ("net",))
        return rig

    def iter_nodes(self) -> Iterator[_NamespaceNode]:
        yield from self.hosts.values()
        yield self.lan
