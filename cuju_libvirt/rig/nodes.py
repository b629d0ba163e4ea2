"""One node of the two-host rig: a libvirt :class:`Host` or the :class:`Lan`.

A node is a set of namespaces held by a :class:`~cuju_libvirt.rig.sandbox.Keeper`; commands
run inside with :meth:`Host.run` / :meth:`Host.popen` (``nsenter``, in the rig's cgroup).
A host also has its own libvirt directories, bind-mounted over the stock paths inside its
mount namespace (see :data:`BINDS` and :mod:`cuju_libvirt.rig.hosts` for the layout), its
generated libvirt configuration, and its virtlogd and libvirtd.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cuju_libvirt.errors import RigError
from cuju_libvirt.rig.sandbox import Cgroup, Keeper, RigUnavailable, pid_alive, tool
from cuju_libvirt.rig.teardown import PREFIX

log = logging.getLogger(__name__)

#: Addresses and interface names (the same in every rig: they live in the rig's own namespaces).
FT_PREFIXLEN = 30
LAN_PREFIXLEN = 24
#: The LAN address of the ``lan`` namespace, where tests run their observers.
OBSERVER_ADDRESS = "198.19.0.1"
#: First LAN address free for guests (the rig itself uses .1, .11 and .12).
FIRST_GUEST_ADDRESS = "198.19.0.100"
FT_IFACE = "ft0"
LAN_BRIDGE = "br-lan"
#: Each host's ``br-lan`` has the address PREFIX:NN (NN: the host's number from 1), set
#: when it is made: locally administered, unique in a rig (rigs do not share a LAN).
LAN_BRIDGE_MAC_PREFIX = "02:00:c6:13:00"


#: The FT network of a rig of three or more hosts: one bridge, every host's ``ft0`` on it.
FT_SWITCH_PREFIXLEN = 24
FT_SWITCH_BRIDGE = "br-ft"
#: Host names of a rig, in order (``a`` and ``b`` in every rig).
HOST_NAMES = "abcdefgh"
MAX_HOSTS = len(HOST_NAMES)


@dataclass(frozen=True)
class HostSpec:
    """Name and addresses of one rig host."""

    name: str
    hostname: str
    ft_address: str
    lan_address: str
    ft_prefixlen: int = FT_PREFIXLEN


def host_specs(count: int = 2) -> tuple[HostSpec, ...]:
    """The hosts of a rig of ``count`` hosts: ``a`` (cuju-a), ``b`` (cuju-b), ``c`` ...

    Two hosts share a point-to-point FT link (a /30 veth pair); three or more have their
    ``ft0`` on one FT bridge (a /24). LAN addresses are 198.19.0.11, .12, ...
    """
    if not 2 <= count <= MAX_HOSTS:
        raise RigError(f"a rig has 2 to {MAX_HOSTS} hosts, not {count}")
    prefix = FT_PREFIXLEN if count == 2 else FT_SWITCH_PREFIXLEN
    return tuple(HostSpec(name, f"cuju-{name}", f"198.18.0.{i + 1}", f"198.19.0.{11 + i}", prefix)
                 for i, name in enumerate(HOST_NAMES[:count]))


HOST_SPECS = host_specs(2)

#: Writable private copies of these trees inside each host (overlayfs, the upper layer under
#: ``<host>/overlay/<name>/upper`` on the rig's tmpfs): whatever a host writes there (cujud's
#: config and state, a package's files) stays in that host and in the rig.
OVERLAYS = (("etc", "/etc"), ("var-lib", "/var/lib"), ("var-log", "/var/log"))

#: (directory of the host under the rig root, the standard path it replaces inside the host),
#: bind-mounted in this order on top of the overlays (/dev/kvm goes in before /run).
BINDS = (
    ("etc", "/etc/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("hosts", "/etc/hosts"),
    ("cuju/etc", "/etc/cuju-libvirt"),
    ("cuju/lib", "/var/lib/cuju-libvirt"),
    ("cuju/log", "/var/log/cuju-libvirt"),
    ("run", "/run"),
)

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


class NamespaceNode:
    """Something that owns a keeper and runs commands inside its namespaces."""

    label: str
    keeper: Keeper | None
    cgroup: Cgroup

    def _keeper(self) -> Keeper:
        if self.keeper is None or not self.keeper.alive():
            raise RigError(f"{self.label} is not running (its namespace keeper is gone)")
        return self.keeper

    @property
    def netns_path(self) -> str:
        """A path naming this node's network namespace (for ``setns``, ``ip netns exec``-like
        helpers such as :class:`cuju_libvirt.rig.observer.Observer`'s ``netns=``)."""
        return f"/proc/{self._keeper().pid}/ns/net"

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


class Host(NamespaceNode):
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

        Paths under the host's own directories (:data:`BINDS`: ``/etc/libvirt``, ``/run``,
        ``/var/lib/libvirt``, ``/etc/cuju-libvirt``, ...) map to them; other paths under
        ``/etc``, ``/var/lib`` and ``/var/log`` map to the overlay's upper layer, where they
        are found if the host wrote them; anything else is the same file inside and outside.
        """
        path = Path(inside)
        best: tuple[int, Path] | None = None
        mounts = [(sub, target) for sub, target in BINDS]
        mounts += [(f"overlay/{name}/upper", target) for name, target in OVERLAYS]
        for sub, target in mounts:
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
            if target.startswith("/var/") and "cuju" not in target:
                _copy_dir_skeleton(Path(target), self.root / sub)
        for d in ("etc/hooks/qemu.d", "etc/qemu/networks/autostart", "etc/nwfilter", "run/libvirt",
                  "run/cuju-libvirt", "log/qemu", "cache/qemu", "lib/qemu/ram", "cuju/etc", "cuju/lib",
                  "cuju/log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        for name, _target in OVERLAYS:
            for layer in ("upper", "work"):
                (self.root / "overlay" / name / layer).mkdir(parents=True)
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
        """Start the keeper: new namespaces with the overlays and bind mounts inside, the
        hostname, loopback up."""
        for path in (self.root, kvm_node):
            if path is not None and any(c in str(path) for c in ",:\\"):
                raise RigError(f"{path}: the rig root must not contain ',', ':' or '\\' (overlayfs options)")
        q = shlex.quote
        lines = []
        for name, target in OVERLAYS:
            layers = self.root / "overlay" / name
            lines.append(
                f"mount -t overlay {q(f'{PREFIX}{self.rig_id}-{self.name}')} "
                f"-o {q(f'lowerdir={target},upperdir={layers}/upper,workdir={layers}/work')} {q(target)}"
            )
        lines.append("mkdir -p " + " ".join(q(t) for _sub, t in BINDS if "cuju" in t))
        binds = [(str(self.root / sub), target) for sub, target in BINDS]
        if kvm_node is not None:
            binds.insert(-1, (str(kvm_node), "/dev/kvm"))
        lines += [f"mount --bind {q(src)} {q(dst)}" for src, dst in binds]
        lines.append(f"hostname {q(self.hostname)}")
        self.keeper = Keeper.spawn(
            f"{PREFIX}{self.rig_id}-{self.name}", self.cgroup, ("mount", "uts", "net"),
            setup="\n".join(lines) + "\n" + _NET_SETUP, stderr_path=self.root / "log" / "keeper.log",
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

    # -- failures, for failover tests -------------------------------------------------------

    def processes(self) -> list[int]:
        """Every live process of this host except its keeper: virtlogd, libvirtd, QEMU, and
        whatever runs inside (cujud, hooks). Found by network namespace, which QEMU shares
        (its mount namespace is libvirt's private one)."""
        keeper = self._keeper()
        netns = keeper.ns_ids()["net"]
        found = []
        for pid in self.cgroup.pids():
            if pid == keeper.pid:
                continue
            try:
                if os.readlink(f"/proc/{pid}/ns/net") == netns and pid_alive(pid):
                    found.append(pid)
            except OSError:
                continue
        return found

    def crash(self, timeout: float = 10.0) -> list[int]:
        """Make the host die at once, as in a power loss: SIGKILL all its :meth:`processes`.

        Its namespaces, files and links stay; :meth:`reboot` boots it again. Returns the
        pids killed.
        """
        killed = self.processes()
        for pid in killed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + timeout
        while any(pid_alive(p) for p in killed):
            if time.monotonic() > deadline:
                raise RigError(f"{self.label}: processes {killed} survived SIGKILL for {timeout:.0f} s")
            time.sleep(0.02)
        log.info("%s: crashed (killed %d processes)", self.label, len(killed))
        return killed

    def reboot(self) -> None:
        """After :meth:`crash`, boot the host again: /run starts empty (libvirt forgets what
        ran), the guest RAM files on tmpfs are gone, then virtlogd and libvirtd start."""
        if self.processes():
            raise RigError(f"{self.label}: still running; crash() it before reboot()")
        for tmpfs_dir in (self.root / "run", self.root / "lib" / "qemu" / "ram"):
            for entry in tmpfs_dir.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        for d in ("run/libvirt", "run/cuju-libvirt"):
            (self.root / d).mkdir()
        self.start_daemons()
        log.info("%s: rebooted", self.label)

    def set_links(self, up: bool, links: Sequence[str] = (FT_IFACE, "uplink")) -> None:
        """Cut (``up=False``) or restore this host's FT link and LAN uplink: a network partition.

        Its guests stay on ``br-lan``; with the uplink down they are cut off from the LAN too.
        """
        state = "up" if up else "down"
        self.run([tool("ip"), "-batch", "-"], input="".join(f"link set {name} {state}\n" for name in links))


class Lan(NamespaceNode):
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
