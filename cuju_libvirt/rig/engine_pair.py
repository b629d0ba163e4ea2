"""A primary and a standby QEMU for engine tests: same machine config, one L2 segment.

:class:`BridgedNetwork` is a network namespace holding a bridge with two taps (one per
QEMU) and the host's address on the bridge, so the standby's NIC takes over the primary's
MAC after ``announce-self``. :func:`protected_pair` starts a :class:`PrimaryEngine` and a
:class:`BackupEngine` over a loopback FT link.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cuju_libvirt.ft_engine.chardevs import ChardevHold
from cuju_libvirt.ft_engine.epoch import BackupEngine, PrimaryConfig, PrimaryEngine
from cuju_libvirt.ft_engine.linkkeys import LinkKeys
from cuju_libvirt.ft_engine.state import FTMachine, Role
from cuju_libvirt.ft_engine.stats import DomainStats
from cuju_libvirt.ft_engine.trackers import Tracker, VmStopped
from cuju_libvirt.rig.guest_net import _ip, entered
from cuju_libvirt.rig.qemu_direct import DirectGuest

NETNS_DIR = Path("/run/netns")


class BridgedNetwork:
    """Namespace ``name``: bridge ``eng-br`` at 198.18.``subnet``.1/24 with taps ``eng-tp``/``eng-ts``."""

    bridge = "eng-br"
    taps = ("eng-tp", "eng-ts")

    def __init__(self, name: str, subnet: int, mac: str = "52:54:00:e0:00:02") -> None:
        self.name = name
        self.mac = mac
        self.host_ip = f"198.18.{subnet}.1"
        self.guest_ip = f"198.18.{subnet}.2"
        self.prefix = 24
        self._created = False

    def __enter__(self) -> BridgedNetwork:
        if (NETNS_DIR / self.name).exists():
            _ip("netns", "del", self.name)  # left by a killed run of this very test
        _ip("netns", "add", self.name)
        self._created = True
        try:
            ns = ("-n", self.name)
            _ip(*ns, "link", "set", "lo", "up")
            _ip(*ns, "link", "add", self.bridge, "type", "bridge", "forward_delay", "0")
            _ip(*ns, "addr", "add", f"{self.host_ip}/{self.prefix}", "dev", self.bridge)
            _ip(*ns, "link", "set", self.bridge, "up")
            for tap in self.taps:
                _ip(*ns, "tuntap", "add", "dev", tap, "mode", "tap")
                _ip(*ns, "link", "set", tap, "master", self.bridge)
                _ip(*ns, "link", "set", tap, "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()

    def destroy(self) -> None:
        if self._created:
            _ip("netns", "del", self.name)
            self._created = False

    def entered(self) -> contextlib.AbstractContextManager[None]:
        """Run the ``with`` body (this thread) inside the namespace."""
        return entered(self.name)

    def qemu_args(self, tap: str, netdev_id: str = "hostnet0") -> list[str]:
        return [
            "-netdev", f"tap,id={netdev_id},ifname={tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev={netdev_id},mac={self.mac}",
        ]  # fmt: skip


@dataclass
class Pair:
    primary: DirectGuest
    standby: DirectGuest
    engine: PrimaryEngine
    backup: BackupEngine
    pstats: DomainStats
    bstats: DomainStats
    pmachine: FTMachine
    bmachine: FTMachine


def link_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


@contextlib.contextmanager
def protected_pair(
    primary: DirectGuest,
    standby: DirectGuest,
    config: PrimaryConfig,
    on_stopped: Callable[[int], None] | None = None,
    tracker_factory: Callable[[VmStopped], Tracker] | None = None,
    *,
    link_keys: LinkKeys | None = None,
    chardevs: ChardevHold | None = None,
) -> Iterator[Pair]:
    """Start the backup engine, then the primary engine (initial sync); clean up after.
    ``link_keys``: the FT link runs encrypted (as cujud's does with peer_tls: on);
    ``chardevs``: the primary's serial output is held by that chardev server."""
    state_dir = Path(tempfile.mkdtemp(prefix="eng-state.", dir="/dev/shm"))
    a, b = link_pair()
    pstats, bstats = DomainStats("eng", "u", "primary"), DomainStats("eng", "u", "backup")
    pm, bm = FTMachine("eng", Role.PRIMARY), FTMachine("eng", Role.BACKUP)
    # The primary populates its whole RAM mapping before its HELLO: for multi-GiB guests on a
    # loaded machine that takes longer than the backup's default 30 s of patience.
    io_timeout = max(30.0, primary.memory_mib / 1024 * 30.0)
    backup = BackupEngine(qmp=standby.qmp, ram_path=str(standby.ram_path), link=b,
                          device_state_path=str(state_dir / "state"), stats=bstats, machine=bm,
                          qemu_log=str(standby.stderr_path), io_timeout=io_timeout,
                          link_keys=link_keys.backup if link_keys else None)
    engine = PrimaryEngine(config, qmp=primary.qmp, pid=primary.pid, link=a, stats=pstats, machine=pm,
                           on_stopped=on_stopped, tracker_factory=tracker_factory,
                           link_keys=link_keys.primary if link_keys else None, chardevs=chardevs)
    try:
        backup.start()
        engine.start()
        yield Pair(primary, standby, engine, backup, pstats, bstats, pm, bm)
    finally:
        with contextlib.suppress(Exception):
            engine.stop(10)
        with contextlib.suppress(Exception):
            backup.close()
        for s in (a, b):
            s.close()
        shutil.rmtree(state_dir, ignore_errors=True)


def counter_dir() -> str:
    return tempfile.mkdtemp(prefix="eng-cnt.", dir="/dev/shm")


@contextlib.contextmanager
def scratch_counter_dir() -> Iterator[str]:
    """A :func:`counter_dir` for the ``with`` block, removed on leaving it."""
    path = counter_dir()
    try:
        yield path
    finally:
        rm(path)


def rm(path: str | os.PathLike[str]) -> None:
    shutil.rmtree(path, ignore_errors=True)
