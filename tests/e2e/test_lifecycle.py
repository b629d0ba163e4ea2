"""Everyday virsh operations on a protected domain (issue 13 items 1, 2, 3, 6): each either
works under protection or ends it cleanly, and never leaves a VM that a failover loses.

The boot-sector counter guest is protected from host a to host b (hook + both cujud). The
lifecycle table in docs/failover.md points at these tests.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree

from cuju_libvirt.errors import RigError
from cuju_libvirt.rig.cujud import Cujud, cleanup_protected, protected_counter_xml
from cuju_libvirt.rig.guests import SUSPEND, boot_image, command_guest, read_counter
from cuju_libvirt.rig.hosts import LAN_BRIDGE, Host, Rig
from tests.e2e.test_failover import runs

MAC = "52:54:00:19:07:00"


def with_acpi(xml: Path) -> None:
    """ACPI: PCI hot-plug on pc needs it (-no-acpi otherwise)."""
    root = etree.parse(str(xml)).getroot()
    if root.find("features") is None:
        etree.SubElement(root, "features").append(etree.Element("acpi"))
    xml.write_bytes(etree.tostring(root))


def protect(rig: Rig, image: Path, ca: Cujud, cb: Cujud, name: str, *,
            edit: Callable[[etree._Element], None] | None = None, served: bool = False,
            disk_format: str = "raw") -> Path:
    """Define and start ``name`` (the counter guest) on host a, protected by host b; return
    its RAM file. ``edit`` changes the domain XML before it is defined."""
    # These tests are about the lifecycle: the boot disk stays a plain file unless a row is
    # about served disks (those have their own tests, tests/e2e/test_disk_failover.py).
    xml = protected_counter_xml(rig, image, name, mac=MAC, epoch_ms=20, disk_format=disk_format,
                                extra=() if served else ("--no-serve-disks",))
    with_acpi(xml)
    if edit is not None:
        root = etree.parse(str(xml)).getroot()
        edit(root)
        xml.write_bytes(etree.tostring(root))
    rig.a.virsh("define", str(xml))
    rig.a.virsh("start", name)
    ca.wait_domain(name, "protected", timeout=90)
    cb.wait_domain(name, "standby", timeout=30)
    return rig.a.ram_files(name)[0]


def capacity(host: Host, name: str, dev: str = "hda") -> int:
    """The size of ``dev`` that the QEMU of ``name`` on ``host`` gives the guest (``virsh domblkinfo``)."""
    info = host.virsh("domblkinfo", name, dev)
    for line in info.splitlines():
        if line.startswith("Capacity:"):
            return int(line.split()[1])
    raise AssertionError(f"no capacity in {info!r}")


def frozen_for(ram: Path, seconds: float) -> bool:
    before = read_counter(ram)
    time.sleep(seconds)
    return read_counter(ram) == before


def advancing(ram: Path, timeout: float = 10.0) -> bool:
    before = read_counter(ram)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_counter(ram) > before + 20:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(240)
def test_virsh_suspend_stays_a_pause_under_protection_and_resume_works(
    ft_rig: Rig, counter_image: Path, cujuds: tuple[Cujud, Cujud]
) -> None:
    rig, (ca, cb) = ft_rig, cujuds
    name = "lc-suspend"
    try:
        ram = protect(rig, counter_image, ca, cb, name)
        suspend_until_paused_by_user(rig.a, name)
        assert frozen_for(ram, 1.5), "the next epoch resumed a VM the user had paused"
        assert "paused (user)" in rig.a.virsh("domstate", "--reason", name)
        entry = ca.wait_domain(name, "protected", timeout=5)
        assert entry["state"] == "protected"
        rig.a.virsh("resume", name)  # on main: "domain is already running"
        assert advancing(ram), "the VM does not run after virsh resume"
        assert "running" in rig.a.virsh("domstate", name)
        ca.wait_domain(name, "protected", timeout=5)
    finally:
        cleanup_protected(rig, name)


def suspend_until_paused_by_user(host: Host, name: str) -> None:
    """``virsh suspend`` until libvirt says ``paused (user)`` (one landing inside an epoch's
    pause is a no-op in libvirt: docs/failover.md)."""
    for _ in range(20):
        host.virsh("suspend", name)
        time.sleep(0.3)
        if "user" in host.virsh("domstate", "--reason", name):
            break
    assert "paused (user)" in host.virsh("domstate", "--reason", name)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known limit: a virsh suspend that lands while libvirt sees an "
                   "epoch's pause is a no-op in libvirt and is lost (docs/failover.md, lifecycle table)")
@pytest.mark.timeout(400)
def test_every_virsh_suspend_at_a_random_moment_holds(
    ft_rig: Rig, counter_image: Path, cujuds: tuple[Cujud, Cujud]
) -> None:
    """20 ``virsh suspend`` at random moments of a protected domain, each checked and undone:
    every one must leave the VM paused. libvirt sees each epoch's own pause (QEMU's STOP
    event reaches every monitor) and answers a suspend then with success and no command to
    QEMU, so nothing on QEMU's side or in libvirt's state tells it from the epoch's pause."""
    rig, (ca, cb) = ft_rig, cujuds
    name = "lc-suspends"
    rng = random.Random()
    lost = 0
    try:
        ram = protect(rig, counter_image, ca, cb, name)
        for _ in range(20):
            time.sleep(rng.uniform(0.05, 0.3))
            rig.a.virsh("suspend", name)
            time.sleep(0.3)
            if "paused (user)" not in rig.a.virsh("domstate", "--reason", name):
                lost += 1
                continue
            rig.a.virsh("resume", name)
            assert advancing(ram)
        print(f"virsh suspend lost {lost} of 20 times under protection")
        assert lost == 0, f"{lost} of 20 suspends were lost"
    finally:
        cleanup_protected(rig, name)


@pytest.mark.timeout(240)
def test_a_failover_while_the_user_paused_the_vm_keeps_the_pause(
    ft_rig: Rig, counter_image: Path, cujuds: tuple[Cujud, Cujud]
) -> None:
    """The user's pause travels with the epochs: host b takes over a paused VM and keeps it
    paused; ``virsh resume`` there runs it on from where it stopped (on main the failover
    resumed it)."""
    rig, (ca, cb) = ft_rig, cujuds
    name = "lc-paused-fo"
    try:
        ram = protect(rig, counter_image, ca, cb, name)
        suspend_until_paused_by_user(rig.a, name)
        assert frozen_for(ram, 1.0), "the next epoch resumed a VM the user had paused"
        stopped_at = read_counter(ram)
        ca.wait_domain(name, "protected", timeout=10)
        time.sleep(0.5)  # idle epochs of the paused VM reach the backup
        pid = rig.a.qemu_pid(name)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        cb.wait_failed_over(name, timeout=60)
        b_ram = rig.b.ram_files(name)[0]
        assert frozen_for(b_ram, 1.5), "the failover resumed a VM the user had paused"
        assert rig.b.virsh("domstate", name).strip() == "paused"
        assert read_counter(b_ram) == stopped_at
        rig.b.virsh("resume", name)
        assert advancing(b_ram), "the VM does not run after virsh resume on host b"
        assert runs(rig.b, name)  # re-protection may pause it for a moment
    finally:
        cleanup_protected(rig, name)


@pytest.mark.timeout(240)
def test_virsh_shutdown_acceptance_and_the_logged_causes(
    ft_rig: Rig, counter_image: Path, cujuds: tuple[Cujud, Cujud]
) -> None:
    """libvirt refuses `virsh shutdown` while it sees an epoch's pause ("domain is not
    running"). The counter guest ignores the ACPI request, so all 20 tries hit one running
    VM; the figure goes into docs/failover.md."""
    rig, (ca, cb) = ft_rig, cujuds
    name = "lc-shutdown"
    try:
        ram = protect(rig, counter_image, ca, cb, name)
        accepted = 0
        refused: list[str] = []
        for _ in range(20):
            try:
                rig.a.virsh("shutdown", name)
                accepted += 1
            except RigError as err:
                refused.append(str(err))
            time.sleep(0.15)
        assert all("not running" in r for r in refused), refused
        print(f"virsh shutdown accepted {accepted} of 20 tries under protection")
        assert accepted >= 1
        assert advancing(ram), "the guest must still run (it ignores the ACPI request)"
        ca.wait_domain(name, "protected", timeout=5)
        offset = ca.log_path.stat().st_size
        rig.a.virsh("destroy", name)
        assert_one_info_line_names(ca, offset, "virsh destroy")
    finally:
        cleanup_protected(rig, name)


def assert_one_info_line_names(cujud: Cujud, offset: int, cause: str) -> None:
    """After byte ``offset`` of cujud's log: exactly one INFO line says the VM ended on
    purpose, and it names ``cause`` (QEMU's own last events name it; libvirt's came >2 s late
    under load), and no ERROR."""
    deadline = time.monotonic() + 15
    text = ""
    while "ended (deliberate" not in text and time.monotonic() < deadline:
        time.sleep(0.1)
        text = cujud.log_path.read_bytes()[offset:].decode(errors="replace")
    time.sleep(0.5)  # whatever follows that line
    lines = cujud.log_path.read_bytes()[offset:].decode(errors="replace").splitlines()
    ended = [x for x in lines if "ended (deliberate" in x and " INFO " in x]
    assert len(ended) == 1 and cause in ended[0], lines
    print(ended[0])
    assert not [x for x in lines if " ERROR " in x], lines


@pytest.mark.timeout(300)
def test_virsh_save_then_restore_of_a_protected_domain(
    ft_rig: Rig, counter_image: Path, cujuds: tuple[Cujud, Cujud]
) -> None:
    """On main the restore failed ("Capability x-ignore-shared is off, but received
    capability is on"): the guest's state was lost. Now: save ends protection (logged as
    virsh save), restore brings the VM back where it was and cujud protects it again."""
    rig, (ca, cb) = ft_rig, cujuds
    name = "lc-save"
    image_inside = f"/var/lib/libvirt/{name}.save"
    image = rig.a.outside(image_inside)
    try:
        ram = protect(rig, counter_image, ca, cb, name)
        offset = ca.log_path.stat().st_size
        rig.a.virsh("save", name, image_inside)
        assert not standby_alive(rig, name), "the standby must be dropped"
        assert_one_info_line_names(ca, offset, "virsh save")
        rig.a.virsh("restore", image_inside)
        ram = rig.a.ram_files(name)[0]
        saved = read_counter(ram)
        assert advancing(ram), "the restored VM does not run"
        assert saved > 0, "the restored VM started from scratch"
        ca.wait_domain(name, "protected", timeout=90)
        cb.wait_domain(name, "standby", timeout=30)
    finally:
        cleanup_protected(rig, name)
        image.unlink(missing_ok=True)


def standby_alive(rig: Rig, name: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if rig.b.qemu_pid(name) is None:
            return False
        time.sleep(0.1)
    return True


NIC = f"""<interface type='bridge'>
  <mac address='52:54:00:19:07:99'/>
  <source bridge='{LAN_BRIDGE}'/>
  <model type='virtio'/>
  <driver name='qemu'/>
</interface>
"""


@pytest.mark.timeout(300)
def test_hot_plugged_nic_recreates_the_standby_and_a_failover_then_works(
    ft_rig: Rig, counter_image: Path, cujuds: tuple[Cujud, Cujud]
) -> None:
    """On main cujud kept reporting 'protected' and the failover failed on the new NIC's
    ROM block, losing the VM. Now the next epoch's blob shows the new device: that epoch is
    never shipped, protection ends, and cujud pairs again with a standby of the new
    configuration; a failover after that keeps the VM (and its second NIC)."""
    rig, (ca, cb) = ft_rig, cujuds
    name = "lc-hotplug"
    try:
        ram = protect(rig, counter_image, ca, cb, name)
        old_standby = rig.b.qemu_pid(name)
        nic = rig.root / "lc-nic.xml"
        nic.write_text(NIC)
        rig.a.virsh("attach-device", name, str(nic), "--live")
        deadline = time.monotonic() + 90
        while rig.b.qemu_pid(name) in (None, old_standby) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rig.b.qemu_pid(name) not in (None, old_standby), "no standby of the new configuration"
        ca.wait_domain(name, "protected", timeout=90)
        cb.wait_domain(name, "standby", timeout=30)
        assert rig.b.virsh("dumpxml", name).count("<interface") == 2
        # caught by whichever comes first: libvirt's device-added event or the epoch's blob
        said = ca.log_path.read_text(errors="replace")
        assert "was hot-plugged" in said or "devices changed" in said, said[-2000:]
        committed = ca.committed_checkpoint(name, lambda: read_counter(ram))
        os.kill(rig.a.qemu_pid(name) or 0, signal.SIGKILL)
        deadline = time.monotonic() + 60  # b runs it (and may already be protected again)
        while time.monotonic() < deadline:
            entry = cb.domain(name)
            if entry is not None and entry["role"] == "primary" and entry["failovers"] >= 1:
                break
            time.sleep(0.1)
        assert entry is not None and entry["failovers"] >= 1, entry
        ram_b = rig.b.ram_files(name)[0]
        assert read_counter(ram_b) >= committed, (read_counter(ram_b), committed)
        assert advancing(ram_b), "the VM does not run on host b after the failover"
        assert rig.b.virsh("dumpxml", name).count("<interface") == 2
    finally:
        cleanup_protected(rig, name)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("disk_format", ["raw", "qcow2"])
def test_blockresize_of_a_served_disk(ft_rig: Rig, counter_image: Path, cujuds: tuple[Cujud, Cujud],
                                      disk_format: str) -> None:
    """A served disk is an NBD export of a fixed size. raw: QEMU refuses to grow it and
    nothing changes. qcow2: QEMU grows the virtual size inside the export (the hook leaves
    the file room to grow), the new header reaches the replica like any write, and cujud
    pairs anew: the new standby reads the new size from its replica."""
    rig, (ca, cb) = ft_rig, cujuds
    name = f"lc-resize-{disk_format}"
    try:
        ram = protect(rig, counter_image, ca, cb, name, served=True, disk_format=disk_format)
        standby, offset = rig.b.qemu_pid(name), ca.log_path.stat().st_size
        old = capacity(rig.a, name)
        new = old + (1 << 20)
        try:
            rig.a.virsh("blockresize", name, "hda", f"{new}B")
            refused = ""
        except RigError as err:
            refused = str(err)
        print(f"virsh blockresize of a served {disk_format} disk: {refused or 'done'}")
        if disk_format == "raw":
            assert "Failed to resize" in refused, refused
            assert capacity(rig.a, name) == old
            time.sleep(1.5)
            assert rig.b.qemu_pid(name) == standby, "the standby was replaced"
            assert (ca.domain(name) or {}).get("state") == "protected"
        else:
            assert capacity(rig.a, name) == new
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and (rig.b.qemu_pid(name) in (None, standby) or
                                                   (ca.domain(name) or {}).get("state") != "protected"):
                time.sleep(0.2)
            text = ca.log_path.read_text(errors="replace")[offset:]
            assert "disk hda was resized" in text, text[-3000:]
            cb.wait_domain(name, "standby", timeout=60)
            assert capacity(rig.b, name) == new, "the replica's image kept the old size"
        assert " ERROR " not in ca.log_path.read_text(errors="replace")[offset:]
        assert advancing(ram)
    finally:
        cleanup_protected(rig, name)


@pytest.mark.timeout(300)
def test_suspend_to_ram_ends_protection_and_waking_protects_again(
    ft_rig: Rig, cujuds: tuple[Cujud, Cujud]
) -> None:
    """ACPI S3 (what `virsh dompmsuspend mem` asks a guest agent to do; here the guest does it
    itself). QEMU 7.2 can neither save a suspended VM as it is nor put a standby to sleep, so
    a failover could not give back a sleeping guest. The epoch that finds it suspended is
    dropped and the standby too, one WARNING says why and what wakes it, no standby is asked
    for while it sleeps, and `virsh dompmwakeup` (the guest boots again: no resume vector)
    protects it anew without waiting for a back-off. Before, the engine took S3 for a `virsh
    suspend` and paired again and again while the guest slept."""
    rig, (ca, cb) = ft_rig, cujuds
    name = "lc-s3"
    try:
        ram = protect(rig, boot_image(power=True), ca, cb, name)
        standby, offset = rig.b.qemu_pid(name), ca.log_path.stat().st_size
        assert advancing(ram)
        command_guest(ram, SUSPEND)
        deadline = time.monotonic() + 30
        while "pmsuspended" not in rig.a.virsh("domstate", name) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "pmsuspended" in rig.a.virsh("domstate", name), "the guest did not suspend itself"
        deadline = time.monotonic() + 30
        while rig.b.qemu_pid(name) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rig.b.qemu_pid(name) is None, "host b still holds a standby of a suspended guest"
        time.sleep(4.0)  # longer than the first back-offs
        text = ca.log_path.read_text(errors="replace")[offset:]
        said = [line for line in text.splitlines() if "suspended to RAM" in line and " WARNING " in line]
        assert said and "virsh dompmwakeup" in said[0], text[-3000:]
        # the engine's line and, at most, one refusal to pair while it sleeps (said once)
        assert len(said) <= 2, text[-3000:]
        assert "for a standby" not in text, "cujud asked for a standby while the guest slept"
        assert " ERROR " not in text, text[-3000:]
        assert "pmsuspended" in rig.a.virsh("domstate", name), "cujud woke (or resumed) the guest"
        entry = ca.domain(name)
        assert entry is not None and not entry["protected"], entry

        before = read_counter(ram)
        rig.a.virsh("dompmwakeup", name)
        deadline = time.monotonic() + 30
        while not 0 < read_counter(ram) < before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0 < read_counter(ram) < before, "the guest did not boot again after its wake-up"
        ca.wait_domain(name, "protected", timeout=60)
        cb.wait_domain(name, "standby", timeout=30)
        assert rig.b.qemu_pid(name) not in (None, standby)
        assert advancing(ram)
        text = ca.log_path.read_text(errors="replace")[offset:]
        assert " ERROR " not in text, text[-3000:]
        print("\n".join(line for line in text.splitlines() if " INFO " in line or " WARNING " in line))
    finally:
        cleanup_protected(rig, name)
