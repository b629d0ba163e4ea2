"""The two-host rig: two real, isolated libvirtd "hosts" and a LAN, all on this one machine.

::

    with Rig() as rig:                       # Rig().up() ... rig.down()
        subprocess.run(["virsh", "-c", rig.a.uri, "define", "vm.xml"])
        rig.b.popen(["cujud", "--config", "/etc/cuju-libvirt/cujud.yaml"])   # inside host b
        rig.lan.popen(["python3", "observer.py", "--listen", OBSERVER_ADDRESS])

Each host (``a`` and ``b``) is a mount + UTS + network namespace with hostname ``cuju-a`` /
``cuju-b``, its own virtlogd and libvirtd, and its own libvirt directories: per-host
directories of the rig root are bind-mounted over the standard paths *inside* the host's
mount namespace, so libvirt runs with its stock paths while tests outside reach everything
through the rig root::

    <base>/cuju-rig-<id>/          tmpfs, source "cuju-rig-<id>" (base: $CUJU_RIG_BASE or /tmp)
        rig.json                   state read by `python -m cuju_libvirt.rig down|status`
        dev/kvm                    /dev/kvm with Debian's permissions (root:kvm 0660), see below
        images/                    rig.stage_file() copies of disk images (both hosts see them)
        a/etc    -> /etc/libvirt        generated libvirtd.conf (own host_uuid), qemu.conf, hooks/qemu.d/
        a/run    -> /run                libvirt/libvirt-sock, libvirtd.pid, cuju-libvirt/ (cujud)
        a/lib    -> /var/lib/libvirt    qemu/ram/: memory_backing_dir, the guests' RAM files
        a/log    -> /var/log/libvirt    qemu/NAME.log, libvirtd.log, virtlogd.log
        a/cache  -> /var/cache/libvirt  QEMU capabilities cache
        a/hosts  -> /etc/hosts          names of both hosts and the observer
        a/cuju/etc, lib, log -> /etc/cuju-libvirt, /var/lib/cuju-libvirt, /var/log/cuju-libvirt
        a/overlay/{etc,var-lib,var-log}/upper   what host A wrote elsewhere in /etc, /var/lib, /var/log
        b/...                           host B, the same

(``/etc``, ``/var/lib`` and ``/var/log`` are private overlays in each host, so whatever a host
writes there stays in it; the directories above are bind-mounted on top.)

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
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from cuju_libvirt.errors import RigError
from cuju_libvirt.rig.guests import cache_dir as guest_cache_dir
from cuju_libvirt.rig.nodes import (
    FIRST_GUEST_ADDRESS,
    FT_IFACE,
    FT_PREFIXLEN,
    FT_SWITCH_BRIDGE,
    HOST_SPECS,
    LAN_BRIDGE,
    LAN_BRIDGE_MAC_PREFIX,
    LAN_PREFIXLEN,
    OBSERVER_ADDRESS,
    Host,
    HostSpec,
    Lan,
    NamespaceNode,
    host_specs,
)
from cuju_libvirt.rig.sandbox import (
    Cgroup,
    Keeper,
    RigUnavailable,
    cgroup2_mount,
    check_capabilities,
    pid_start_time,
    run_quiet,
    tool,
)
from cuju_libvirt.rig.teardown import PREFIX, STATE_FILE, default_base, read_state, remove_rig, traces_of

__all__ = [
    "FIRST_GUEST_ADDRESS",
    "FT_IFACE",
    "HOST_SPECS",
    "LAN_BRIDGE",
    "OBSERVER_ADDRESS",
    "PREFIX",
    "Host",
    "HostSpec",
    "Lan",
    "Rig",
    "RigUnavailable",
    "capabilities_cache_dir",
]

log = logging.getLogger(__name__)


def capabilities_cache_dir() -> Path:
    """Where QEMU capabilities probed by one rig's libvirtd are kept for the next rig."""
    return guest_cache_dir() / "libvirt-qemu-capabilities"


class Rig:
    """Libvirt hosts (:attr:`a`, :attr:`b`, ... in :attr:`hosts`) joined by an FT link and a
    LAN (:attr:`lan`); two by default, ``host_count`` up to 8 (then the FT link is a bridge).

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
        host_count: int = 2,
    ) -> None:
        self.specs = host_specs(host_count)
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

    def host(self, name: str) -> Host:
        """Host ``name`` ("a", "b", "c", ...)."""
        try:
            return self.hosts[name]
        except KeyError:
            raise RigError(f"rig {self.id} has no host {name!r} (hosts: {', '.join(self.hosts)})") from None

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
        log.info("rig %s: bringing up %d libvirt hosts under %s", self.id, len(self.specs), self.root)
        try:
            self._make_root()
            if self.owned:
                self._start_reaper()
            self._write_state()
            kvm = self._make_kvm_node()
            names = [(s.lan_address, s.hostname) for s in self.specs]
            names += [(s.ft_address, f"{s.hostname}-ft") for s in self.specs]
            names.append((OBSERVER_ADDRESS, "observer"))
            for spec in self.specs:
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
            others = [h for h in self.hosts.values() if h is not self.a]
            self._share_capabilities(self.a, others)
            for host in others:
                host.start_daemons()
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
        log.info("rig %s: up in %.1f s; %s", self.id, time.monotonic() - t0,
                 ", ".join(f"host {h.name} {h.uri}" for h in self.hosts.values()))
        return self

    def _make_root(self) -> None:
        if self.root.exists() or self.cgroup.exists():
            raise RigError(f"rig {self.id} exists already ({self.root}); pick another id or run down")
        if not self.base.is_dir():
            raise RigError(f"base directory {self.base} does not exist (set CUJU_RIG_BASE or --base)")
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
        """The FT link and the LAN; every interface is created directly inside its namespace.

        Two hosts: one veth pair between their ``ft0``. More: each host's ``ft0`` is a veth to
        ``ft-NAME`` on the bridge ``br-ft`` in the LAN namespace (no address there), so cutting
        a host's ``ft0`` still cuts that host alone off the FT network.
        """
        ip = tool("ip")
        lan = self.lan._keeper().pid
        pairs = [(("uplink", h._keeper().pid), (f"port-{h.name}", lan)) for h in self.hosts.values()]
        switched = len(self.hosts) > 2
        if switched:
            pairs += [((FT_IFACE, h._keeper().pid), (f"ft-{h.name}", lan)) for h in self.hosts.values()]
        else:
            pairs.append(((FT_IFACE, self.a._keeper().pid), (FT_IFACE, self.b._keeper().pid)))
        for (name1, ns1), (name2, ns2) in pairs:
            cmd = ["link", "add", name1, "netns", str(ns1), "type", "veth",
                   "peer", "name", name2, "netns", str(ns2)]
            proc = run_quiet([ip, *cmd])
            if proc.returncode != 0:
                why = proc.stderr.strip()
                raise RigUnavailable([f"cannot create a veth pair (ip {' '.join(cmd)}): {why}"])
        batch = ["link add br0 type bridge"]
        for h in self.hosts.values():
            batch += [f"link set port-{h.name} master br0", f"link set port-{h.name} up"]
        batch += ["link set br0 up", f"addr add {OBSERVER_ADDRESS}/{LAN_PREFIXLEN} dev br0"]
        if switched:
            batch.append(f"link add {FT_SWITCH_BRIDGE} type bridge")
            batch += [f"link set ft-{h.name} master {FT_SWITCH_BRIDGE}\nlink set ft-{h.name} up"
                      for h in self.hosts.values()]
            batch.append(f"link set {FT_SWITCH_BRIDGE} up")
        self.lan.run([ip, "-batch", "-"], input="\n".join(batch) + "\n")
        for number, host in enumerate(self.hosts.values(), 1):
            # The bridge's address is set, so it never follows its ports: unset, it takes the
            # lowest port address, which can be a guest tap's (fe:54:... of the guest's MAC),
            # the same on the standby's host, whose bridge then keeps every frame for this
            # host to itself (tests/e2e/test_rig.py::test_a_guest_tap_never_becomes_...).
            host.run([ip, "-batch", "-"], input=(
                f"addr add {host.ft_address}/{host.spec.ft_prefixlen} dev {FT_IFACE}\n"
                f"link set {FT_IFACE} up\n"
                f"link add {LAN_BRIDGE} address {LAN_BRIDGE_MAC_PREFIX}:{number:02x} type bridge\n"
                f"link set uplink master {LAN_BRIDGE}\n"
                f"link set uplink up\nlink set {LAN_BRIDGE} up\n"
                f"addr add {host.lan_address}/{LAN_PREFIXLEN} dev {LAN_BRIDGE}\n"
            ))
        log.info("rig %s: FT %s %s (%s), LAN %s/%d with observer %s", self.id,
                 f"bridge {FT_SWITCH_BRIDGE}:" if switched else "link",
                 " <-> ".join(h.ft_address for h in self.hosts.values()), FT_IFACE, OBSERVER_ADDRESS,
                 LAN_PREFIXLEN, OBSERVER_ADDRESS)

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

    def _share_capabilities(self, src: Host, dsts: list[Host]) -> None:
        """Make ``src`` probe QEMU (or validate its seeded cache); copy the result to ``dsts``
        (before their libvirtd starts) and keep it for later rigs."""
        t0 = time.monotonic()
        src.virsh("capabilities")
        src_dir = src.root / "cache" / "qemu" / "capabilities"
        files = sorted(src_dir.glob("*.xml"))
        for dst in dsts:
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
                 time.monotonic() - t0, ", ".join(d.name for d in dsts))

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
                    "ft_prefixlen": h.spec.ft_prefixlen, "lan_address": h.lan_address,
                    "keeper": h.keeper.pid if h.keeper else None,
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
        traces = traces_of(self.root)
        if traces.cgroup is None and self.cgroup.exists():
            traces.cgroup = self.cgroup.path
        try:
            remove_rig(traces, stop_reaper=False)
            # Disarmed only now: if this process dies half-way, the reaper finishes the job;
            # if removal failed, the reaper tries again when this process exits.
            self._disarm_reaper()
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
        hosts = state.get("hosts") or {}
        rig = cls(base=root.parent, rig_id=str(state["id"]), owned=False, host_count=max(2, len(hosts)))
        rig.cgroup = Cgroup(Path(state["cgroup"]))
        for name, info in sorted(hosts.items()):
            spec = HostSpec(name, str(info["hostname"]), str(info["ft_address"]), str(info["lan_address"]),
                            int(info.get("ft_prefixlen", FT_PREFIXLEN)))
            keeper = Keeper(f"{PREFIX}{rig.id}-{spec.name}", int(info["keeper"]), ("mount", "uts", "net"))
            rig.hosts[spec.name] = Host(rig.id, spec, root / spec.name, rig.cgroup, keeper)
        lan_pid = (state.get("lan") or {}).get("keeper")
        if lan_pid:
            rig.lan.keeper = Keeper(f"{PREFIX}{rig.id}-lan", int(lan_pid), ("net",))
        return rig

    def iter_nodes(self) -> Iterator[NamespaceNode]:
        yield from self.hosts.values()
        yield self.lan
