"""A private network for a test guest: a network namespace holding one tap device.

The guest's virtio-net NIC is backed by a tap device (``-netdev tap,ifname=...``) inside a
network namespace created for the purpose, so test traffic never touches the host's
networks and QEMU's user-mode networking is never used. The host end of the tap carries
:attr:`GuestNetwork.host_ip`; the guest is given :attr:`GuestNetwork.guest_ip` on its kernel
command line. Addresses come from 198.18.0.0/15 (RFC 2544 benchmarking space)::

    with GuestNetwork("lg-udp", subnet=3) as net:
        with net.entered():                       # QEMU is started inside the namespace
            guest = DirectGuest(..., extra_args=net.qemu_args()).start()
        with Observer((net.host_ip, 0), netns=net.name) as obs:
            ...

Everything is removed on exit (tap, namespace), also when the body raises; QEMU must be
gone by then (the namespace cannot be deleted while a process still uses it).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from cuju_libvirt.errors import RigError

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,12}$")


def _ip(*args: str) -> None:
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise RigError("ip not found: install the Debian package iproute2") from err
    if proc.returncode != 0:
        raise RigError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


def _setns(fd: int, what: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise RigError(f"cannot enter network namespace {what}: {os.strerror(err)} (needs root)")


@contextlib.contextmanager
def entered(netns: str) -> Iterator[None]:
    """Run the ``with`` body (this thread only) inside network namespace ``netns``.

    Processes started in the body stay in the namespace; sockets made in it keep it. The
    thread returns to its own namespace on exit, also when the body raises.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        os.close(own)
        raise RigError(f"network namespace {netns} does not exist: {err}") from err
    try:
        _setns(target, netns)
        try:
            yield
        finally:
            _setns(own, "of this thread (returning)")
    finally:
        os.close(target)
        os.close(own)


def socket_in(netns: str, make: Callable[[], socket.socket]) -> socket.socket:
    """``make()`` run on a short-lived thread inside ``netns``: a socket that lives there.

    The calling thread never changes namespace, so this is safe next to other threads.
    """
    result: list[socket.socket] = []
    failure: list[BaseException] = []

    def enter_and_make() -> None:
        try:
            with entered(netns):
                result.append(make())
        except BaseException as err:  # handed to the calling thread
            failure.append(err)

    thread = threading.Thread(target=enter_and_make, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


class GuestNetwork:
    """Network namespace ``name`` with tap device ``tap`` at 198.18.``subnet``.1/24.

    ``subnet`` (0..255) picks the /24 inside 198.18.0.0/16, so that tests running side by
    side do not share addresses. The guest is 198.18.``subnet``.2.
    """

    def __init__(self, name: str, *, subnet: int = 0, tap: str = "lgtap0", mac: str = "52:54:00:c5:00:02"):
        for what, value in (("namespace", name), ("tap", tap)):
            if not _NAME_RE.match(value):
                raise ValueError(f"{what} name {value!r}: 1-12 letters, digits, '-' or '_'")
        if not 0 <= subnet <= 255:
            raise ValueError(f"subnet {subnet} must be in 0..255")
        self.name = name
        self.tap = tap
        self.mac = mac
        self.host_ip = f"198.18.{subnet}.1"
        self.guest_ip = f"198.18.{subnet}.2"
        self.prefix = 24
        self._created = False

    def create(self) -> GuestNetwork:
        if (NETNS_DIR / self.name).exists():
            raise RigError(
                f"network namespace {self.name} already exists (left by a killed run?): "
                f"remove it with `ip netns del {self.name}`"
            )
        _ip("netns", "add", self.name)
        self._created = True
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
            _ip("-n", self.name, "tuntap", "add", "dev", self.tap, "mode", "tap")
            _ip("-n", self.name, "addr", "add", f"{self.host_ip}/{self.prefix}", "dev", self.tap)
            _ip("-n", self.name, "link", "set", self.tap, "up")
        except BaseException:
            self.destroy()
            raise
        log.info("network namespace %s with %s at %s/%d", self.name, self.tap, self.host_ip, self.prefix)
        return self

    def destroy(self) -> None:
        """Remove the tap and the namespace; idempotent."""
        if not self._created:
            return
        with contextlib.suppress(RigError):
            _ip("-n", self.name, "link", "del", self.tap)
        _ip("netns", "del", self.name)
        self._created = False

    def __enter__(self) -> GuestNetwork:
        return self.create()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()

    def entered(self) -> contextlib.AbstractContextManager[None]:
        """Run the ``with`` body (this thread) inside the namespace; see :func:`entered`."""
        return entered(self.name)

    def qemu_args(self, netdev_id: str = "lgnet0") -> list[str]:
        """``-netdev tap`` on this network's tap and a virtio-net NIC with :attr:`mac`."""
        return [
            "-netdev", f"tap,id={netdev_id},ifname={self.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev={netdev_id},mac={self.mac}",
        ]  # fmt: skip

    def cmdline_args(self) -> dict[str, str]:
        """``ip``/``mac`` keyword arguments for :func:`~cuju_libvirt.rig.linux_guest.kernel_cmdline`."""
        return {"ip": f"{self.guest_ip}/{self.prefix}", "mac": self.mac}
