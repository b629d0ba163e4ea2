"""Fixtures of the end-to-end tier: the two-host rig and counter guests on it.

* ``rig`` (session): one :class:`~cuju_libvirt.rig.hosts.Rig` for the whole session, torn
  down at its end (and by its reaper if the session is killed); rigs that killed earlier
  runs left behind are swept first. Tests are skipped, with the
  reason, when this machine cannot run a rig (not root, no cgroup v2, no libvirtd, ...).
* ``counter_image`` (session): the boot-sector counter guest (built once, cached).
* ``counter_guest``: a factory ``counter_guest(host, name, ft_peer=..., mac=...)`` that
  gives the guest its own copy of the image, writes its domain XML, ``virsh define``s it on
  ``host`` and returns a
  :class:`RigGuest`; every guest it made is destroyed and undefined after the test.
* ``ft_rig`` (module): a rig of its own with the cuju hook installed in both hosts, and
  ``cujuds``: cujud on both of its hosts for one test (the product path; protected domains
  are removed with :func:`cuju_libvirt.rig.cujud.cleanup_protected`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cuju_libvirt import FT_NAMESPACE
from cuju_libvirt.rig.cujud import Cujud, cujud_pair, hooked_rig
from cuju_libvirt.rig.domains import domain_xml
from cuju_libvirt.rig.guests import boot_image, read_counter, serial_counts
from cuju_libvirt.rig.hosts import LAN_BRIDGE, Host, Rig
from cuju_libvirt.rig.sandbox import RigUnavailable, check_capabilities
from cuju_libvirt.rig.teardown import sweep_stale


def skip_unless_rig_possible() -> None:
    """Skip the calling test, with the reason, if this machine cannot run a rig."""
    try:
        check_capabilities()
    except RigUnavailable as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def rig() -> Iterator[Rig]:
    skip_unless_rig_possible()
    sweep_stale()  # what a killed earlier run (and its killed reaper) left behind
    the_rig = Rig()
    try:
        the_rig.up()
    except RigUnavailable as err:
        pytest.skip(str(err))
    try:
        yield the_rig
    finally:
        the_rig.down()


def hooked_rig_or_skip(host_count: int = 2) -> Iterator[Rig]:
    """The body of a module fixture: :func:`hooked_rig`, or the test skipped (with the
    reason) when this machine cannot make a rig."""
    skip_unless_rig_possible()
    sweep_stale()
    with contextlib.ExitStack() as stack:
        try:
            rig = stack.enter_context(hooked_rig(host_count))
        except RigUnavailable as err:
            pytest.skip(str(err))
        yield rig


@pytest.fixture(scope="module")
def ft_rig() -> Iterator[Rig]:
    """A rig of its own, with the hook installed in both hosts before libvirtd starts."""
    yield from hooked_rig_or_skip()


@pytest.fixture
def cujuds(ft_rig: Rig, tmp_path: Path) -> Iterator[tuple[Cujud, Cujud]]:
    """cujud on both hosts; their logs end up in the test's tmp_path (kept by pytest)."""
    with cujud_pair(ft_rig, logs=tmp_path / "logs") as pair:
        yield pair


@pytest.fixture(scope="session")
def counter_image() -> Path:
    return boot_image()


def ft_element(peer: str) -> str:
    """A minimal ``<cuju:ft>`` element naming ``peer``."""
    return f'<cuju:ft xmlns:cuju="{FT_NAMESPACE}" peer="{peer}"/>'


@dataclass
class RigGuest:
    """A counter guest defined on one rig host."""

    host: Host
    name: str
    xml_file: Path

    @property
    def serial_log(self) -> Path:
        """COM1 output, seen from outside the host."""
        return self.host.outside(f"/var/log/libvirt/qemu/{self.name}-serial.log")

    def start(self) -> None:
        self.host.virsh("start", self.name)

    def ram_file(self) -> Path:
        return self.host.ram_files(self.name)[0]

    def counter(self) -> int:
        """The counter read from the guest's RAM file (0 until the guest runs its loop)."""
        return read_counter(self.ram_file())

    def serial_counts(self) -> list[int]:
        try:
            return serial_counts(self.serial_log.read_text(errors="replace"))
        except FileNotFoundError:
            return []

    def wait_counter_above(self, value: int, timeout: float = 30.0) -> int:
        """Wait until the RAM counter exceeds ``value``; return it."""
        deadline = time.monotonic() + timeout
        while (now := self.counter()) <= value:
            if time.monotonic() > deadline:
                log = self.host.log_file(self.name)
                pytest.fail(f"{self.name} on host {self.host.name}: counter stuck at {now} (see {log})")
            time.sleep(0.05)
        return now


@pytest.fixture
def counter_guest(
    rig: Rig, counter_image: Path, tmp_path: Path
) -> Iterator[Callable[..., RigGuest]]:
    made: list[RigGuest] = []

    def make(host: Host, name: str, *, ft_peer: str | None = None, mac: str | None = None) -> RigGuest:
        disk = rig.stage_file(counter_image, f"{name}.img")
        xml = domain_xml(
            name, memory_mib=64, disk=disk, serial_log=f"/var/log/libvirt/qemu/{name}-serial.log",
            bridge=LAN_BRIDGE, mac=mac, metadata=[ft_element(ft_peer)] if ft_peer else [],
        )
        xml_file = tmp_path / f"{name}.xml"
        xml_file.write_text(xml)
        host.virsh("define", str(xml_file))
        guest = RigGuest(host, name, xml_file)
        made.append(guest)
        return guest

    yield make
    for guest in made:
        guest.host.virsh("destroy", guest.name, check=False)
        guest.host.virsh("undefine", guest.name, check=False)
        (rig.root / "images" / f"{guest.name}.img").unlink(missing_ok=True)
