"""Containment for the two-host rig: capability checks, one cgroup per rig, namespace keepers.

Everything a rig starts lives in **one cgroup v2 group** (``<cgroup2>/cuju-rig-<id>``): the
namespace keepers, virtlogd, libvirtd, the QEMU processes libvirtd forks (the rig's
``qemu.conf`` sets ``cgroup_controllers = [ ]`` so libvirt does not move them elsewhere),
and anything a test starts with ``Host.popen``. Writing ``1`` to ``cgroup.kill`` ends them
all at once, wherever they were re-parented to.

A **keeper** is one small process (``sleep``, renamed ``cuju-rig-<id>-<host>``) started by
``unshare`` in fresh namespaces. It holds them: nothing is named in ``/run/netns`` and
nothing is bind-mounted in the root namespace, so when the keeper and the daemons inside
are killed the kernel removes the namespaces with their mounts, veth pairs and bridges.
Commands run inside with ``nsenter --target <keeper pid>``.

Capabilities are detected, never assumed from versions: :func:`check_capabilities` names
each missing one (not root, a tool missing, no cgroup2, namespaces refused) in a
:class:`RigUnavailable`, which tests turn into a skip with that reason.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from cuju_libvirt.errors import RigError

log = logging.getLogger(__name__)

#: Namespace kinds a keeper can hold, with the ``unshare``/``nsenter`` flag and /proc name.
NS_KINDS: Mapping[str, tuple[str, str]] = {
    "mount": ("--mount", "mnt"),
    "uts": ("--uts", "uts"),
    "net": ("--net", "net"),
}

#: Programs the rig runs; sbin directories are searched even when not on PATH.
REQUIRED_TOOLS = ("unshare", "nsenter", "ip", "mount", "umount", "bash", "sleep", "sh")
LIBVIRT_TOOLS = ("libvirtd", "virtlogd", "virsh")
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class RigUnavailable(RigError):
    """This machine lacks something the rig needs; ``reasons`` names each missing capability.

    Tests skip with this message; the CLI prints it and exits 1.
    """

    def __init__(self, reasons: Sequence[str]) -> None:
        super().__init__("the two-host rig cannot run here: " + "; ".join(reasons))
        self.reasons = list(reasons)


def find_tool(name: str) -> str | None:
    """Absolute path of program ``name`` on PATH or in the sbin directories, or None."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which(name, path=search)


def tool(name: str) -> str:
    """Absolute path of a program the rig needs; :class:`RigUnavailable` if it is missing."""
    path = find_tool(name)
    if path is None:
        raise RigUnavailable([f"program '{name}' not found (install the Debian packages: scripts/setup.sh)"])
    return path


def cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` or, on hybrid hosts,
    ``/sys/fs/cgroup/unified``), or None."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return Path(_unescape_mount_path(left.split()[4]))
    except OSError:
        return None
    return None


def _unescape_mount_path(path: str) -> str:
    """Undo the octal escapes (``\\040`` for a space) of /proc/*/mountinfo paths."""
    return path.encode("ascii", "backslashreplace").decode("unicode_escape")


@functools.cache
def check_capabilities() -> None:
    """Raise :class:`RigUnavailable` naming every missing capability; return when all are there.

    Checked: running as root, the programs (util-linux, iproute2, libvirt daemons and
    client), a writable cgroup v2 hierarchy, and, in throw-away namespaces, that mount, UTS
    and network namespaces, tmpfs, overlayfs, veth pairs and bridges work. (``cgroup.kill``,
    Linux >= 5.14, is checked when the rig's group is made.)
    """
    reasons: list[str] = []
    if os.geteuid() != 0:
        reasons.append("not running as root (it mounts, creates namespaces and runs libvirtd)")
    for name in (*REQUIRED_TOOLS, *LIBVIRT_TOOLS):
        if find_tool(name) is None:
            reasons.append(f"program '{name}' not found (install the Debian packages: scripts/setup.sh)")
    cg = cgroup2_mount()
    if cg is None:
        reasons.append("no cgroup v2 hierarchy mounted (need cgroup2 at /sys/fs/cgroup or .../unified)")
    elif not os.access(cg, os.W_OK):
        reasons.append(f"cgroup v2 hierarchy {cg} is not writable (mounted read-only or not root)")
    if not reasons:
        reasons += _probe_namespaces()
    if reasons:
        raise RigUnavailable(reasons)


#: Run in fresh namespaces: a tmpfs, an overlay on it, a veth pair and a bridge, all private
#: to the namespaces and gone with them; each failure names itself on stderr.
_PROBE = """\
mount -t tmpfs cuju-rig-probe "$1" || { echo "cannot mount a tmpfs" >&2; exit 1; }
mkdir "$1/l" "$1/u" "$1/w" "$1/m"
mount -t overlay cuju-rig-probe -o "lowerdir=$1/l,upperdir=$1/u,workdir=$1/w" "$1/m" \
    || { echo "no overlayfs (kernel module overlay)" >&2; exit 1; }
ip link add probe0 type veth peer name probe1 || { echo "no veth (kernel module veth)" >&2; exit 1; }
ip link add probebr type bridge || { echo "no bridges (kernel module bridge)" >&2; exit 1; }
"""


def _probe_namespaces() -> list[str]:
    """Try what a rig host needs, in throw-away namespaces; the reasons it cannot run, if any."""
    with tempfile.TemporaryDirectory(prefix="cuju-rig-probe-") as where:
        try:
            proc = subprocess.run(
                [tool("unshare"), "--mount", "--uts", "--net", "--propagation=private", "--",
                 tool("sh"), "-c", _PROBE, "probe", where],
                capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            return [f"cannot run unshare: {err}"]
    if proc.returncode == 0:
        return []
    detail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
    if "unshare" in detail[0]:
        return [f"cannot create mount/UTS/network namespaces ({detail[0]})"]
    return [f"in a new namespace: {detail[0]}"]


class Cgroup:
    """One cgroup v2 group that contains every process of one rig."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, name: str) -> Cgroup:
        """Create ``<cgroup2>/<name>``; :class:`RigUnavailable` if cgroup v2 cannot do the job."""
        mount = cgroup2_mount()
        if mount is None:
            raise RigUnavailable(["no cgroup v2 hierarchy mounted"])
        path = mount / name
        try:
            path.mkdir()
        except OSError as err:
            raise RigUnavailable([f"cannot create cgroup {path}: {err.strerror}"]) from err
        if not (path / "cgroup.kill").exists():
            path.rmdir()
            raise RigUnavailable([f"cgroup v2 at {mount} has no cgroup.kill (needs Linux >= 5.14)"])
        return cls(path)

    def exists(self) -> bool:
        return self.path.is_dir()

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that the process joins this group before it execs.

        Everything it forks later (daemons, QEMU) is born inside the group.
        """
        return [tool("sh"), "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *argv]

    def pids(self) -> list[int]:
        """Every live process in the group and its descendants."""
        pids: list[int] = []
        # os.walk, not Path.rglob: groups vanish while other rigs are torn down next to us,
        # and rglob raises when a directory disappears under it.
        for dirpath, _dirs, _files in os.walk(self.path):
            try:
                pids.extend(int(line) for line in Path(dirpath, "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                continue
        return pids

    def kill(self, timeout: float = 20.0) -> None:
        """SIGKILL every process in the group and wait until it is empty."""
        if not self.path.exists():
            return
        (self.path / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + timeout
        while self.pids():
            if time.monotonic() > deadline:
                left = self.pids()
                raise RigError(f"processes {left} still in {self.path} {timeout:.0f} s after cgroup.kill")
            time.sleep(0.05)

    def remove(self, timeout: float = 10.0) -> None:
        """Remove the (empty) group and any sub-groups, deepest first."""
        if not self.path.exists():
            return
        subdirs = sorted((Path(d) for d, _dirs, _files in os.walk(self.path)), key=lambda p: len(p.parts))
        subdirs = [d for d in subdirs if d != self.path]
        deadline = time.monotonic() + timeout
        for d in [*reversed(subdirs), self.path]:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as err:  # EBUSY while the last exiting tasks are released
                    if time.monotonic() > deadline:
                        raise RigError(f"cannot remove cgroup {d}: {err.strerror}") from err
                    time.sleep(0.05)


class Keeper:
    """A process that holds fresh namespaces for one rig host (or the LAN) while it lives.

    It runs a shell ``setup`` script inside the new namespaces first (bind mounts, hostname,
    sysctls), then becomes ``sleep infinity`` named ``name`` (as ``ps`` shows it).
    """

    def __init__(
        self, name: str, pid: int, kinds: Sequence[str], proc: subprocess.Popen[bytes] | None = None
    ) -> None:
        self.name = name
        self.pid = pid
        self.kinds = tuple(kinds)
        self._proc = proc

    @classmethod
    def spawn(
        cls,
        name: str,
        cgroup: Cgroup,
        kinds: Sequence[str],
        *,
        stderr_path: Path,
        setup: str = "",
        args: Sequence[str] = (),
        timeout: float = 30.0,
    ) -> Keeper:
        """Start a keeper in new ``kinds`` namespaces (``mount``, ``uts``, ``net``).

        ``setup`` is a bash script run inside first (``set -e``; ``"$1"``... are ``args``);
        its failure is raised as :class:`RigError` with its stderr (kept in ``stderr_path``,
        which also gets anything the keeper writes later). Mounts are private to
        the new mount namespace: nothing propagates back to the root namespace.
        """
        flags = [NS_KINDS[k][0] for k in kinds]
        if "mount" in kinds:
            flags.append("--propagation=private")
        script = f"set -e\n{setup}\necho ready\nexec -a \"$0\" {tool('sleep')} infinity >/dev/null\n"
        argv = [tool("unshare"), *flags, "--", tool("bash"), "-c", script, name, *args]
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                cgroup.wrap(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                start_new_session=True,
            )
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else b""
        proc.stdout.close()
        if line.strip() != b"ready":
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            detail = stderr_path.read_text(errors="replace").strip()
            raise RigError(
                f"{name}: setting up namespaces failed (exit {proc.returncode}): {detail or 'no output'}"
            )
        return cls(name, proc.pid, kinds, proc)

    def alive(self) -> bool:
        """True while the keeper process exists (a zombie does not count)."""
        return pid_alive(self.pid)

    def nsenter(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this keeper's namespaces."""
        flags = [NS_KINDS[k][0] for k in self.kinds]  # nsenter takes the same flags as unshare
        return [tool("nsenter"), f"--target={self.pid}", *flags, "--", *argv]

    def ns_ids(self) -> dict[str, str]:
        """The keeper's namespaces as the kernel names them, e.g. ``{"net": "net:[4026532301]"}``."""
        return {NS_KINDS[k][1]: os.readlink(f"/proc/{self.pid}/ns/{NS_KINDS[k][1]}") for k in self.kinds}

    def reap(self) -> None:
        """Collect the keeper's exit status if this process started it (no zombie left)."""
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("keeper %s (pid %d) did not exit", self.name, self.pid)


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def pid_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def mounts_with_source(prefix: str) -> list[tuple[str, Path]]:
    """(source, mount point) of every mount in this mount namespace whose source starts with ``prefix``."""
    found: list[tuple[str, Path]] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = right.split()
            if len(fields) >= 2 and fields[1].startswith(prefix):
                found.append((fields[1], Path(_unescape_mount_path(left.split()[4]))))
    return found


def run_quiet(
    argv: Sequence[str], timeout: float = 60.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the root namespaces, capturing text output, without raising on failure."""
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
