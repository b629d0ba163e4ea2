"""Rows of docs/failover.md's lifecycle table that need the Linux test guest (issue 13 item 2):
the guest's own answer matters (ACPI memory hot-plug, its numbered UDP stream to the
observer). The Linux guest is protected from host a to host b (hook + both cujud).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from cuju_libvirt.rig.cujud import Cujud, cleanup_protected, protected_linux_xml
from cuju_libvirt.rig.hosts import Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest, build_linux_guest
from cuju_libvirt.rig.nodes import OBSERVER_ADDRESS
from cuju_libvirt.rig.observer import Observer, Rules, judge_run

MAC = "52:54:00:19:08:00"
PPS = 200
EPOCH_MS = 20
GUEST_MIB = 256

DIMM = """<memory model='dimm'>
  <target><size unit='MiB'>128</size><node>0</node></target>
</memory>
"""


@pytest.fixture(scope="module")
def linux_guest() -> LinuxGuest:
    return build_linux_guest()


@pytest.fixture
def observer(ft_rig: Rig) -> Iterator[Observer]:
    with Observer((OBSERVER_ADDRESS, 0), (OBSERVER_ADDRESS, 0), netns=ft_rig.lan.netns_path) as obs:
        yield obs


def numa_with_hotplug(xml: Path) -> None:
    """One NUMA cell holding all of the guest's RAM, room for DIMMs (``<maxMemory slots>``) and
    ACPI (the guest learns of a DIMM through it)."""
    root = etree.parse(str(xml)).getroot()
    kib = GUEST_MIB * 1024
    max_memory = etree.Element("maxMemory", slots="2", unit="KiB")
    max_memory.text = str(kib * 4)
    root.find("memory").addprevious(max_memory)  # type: ignore[union-attr]
    cpu = root.find("cpu")
    if cpu is None:
        cpu = etree.SubElement(root, "cpu")
    numa = etree.SubElement(cpu, "numa")
    etree.SubElement(numa, "cell", id="0", cpus="0", memory=str(kib), unit="KiB")
    if root.find("features") is None:
        etree.SubElement(root, "features").append(etree.Element("acpi"))
    xml.write_bytes(etree.tostring(root))


@pytest.mark.timeout(300)
def test_memory_hot_plug_ends_protection_and_says_what_to_do(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud]
) -> None:
    """A DIMM is a RAM backend (a file) of its own, which the engine does not replicate: a
    standby would resume without the memory the guest onlined. ``virsh attach-device`` of a
    ``<memory model='dimm'>`` therefore ends protection at libvirt's DEVICE_ADDED event, the
    standby of the old configuration is dropped, and cujud pairs no more (no standby is
    started for nothing) until the DIMM is gone, saying why and what to do. The guest's
    stream goes on, every datagram once, in order."""
    rig, (ca, cb) = ft_rig, cujuds
    name = "lc-dimm"
    try:
        xml = protected_linux_xml(rig, linux_guest, name, observer, mac=MAC, pps=PPS, epoch_ms=EPOCH_MS,
                                  memory_mib=GUEST_MIB)
        numa_with_hotplug(xml)
        rig.a.virsh("define", str(xml))
        rig.a.virsh("start", name)
        ca.wait_domain(name, "protected", timeout=120)
        cb.wait_domain(name, "standby", timeout=30)
        observer.wait_for(lambda r: len(r.udp) >= PPS, timeout=90)
        assert len(rig.a.ram_files(name)) == 1  # one cell: one RAM file, protected as usual
        offset_a, offset_b = ca.log_path.stat().st_size, cb.log_path.stat().st_size

        dimm = rig.root / "lc-dimm.xml"
        dimm.write_text(DIMM)
        plugged_at = time.monotonic()
        rig.a.virsh("attach-device", name, str(dimm), "--live")
        assert "<memory model='dimm'" in rig.a.virsh("dumpxml", name)
        # the standby of the old configuration goes, and none of the new one comes
        deadline = time.monotonic() + 60
        while rig.b.qemu_pid(name) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rig.b.qemu_pid(name) is None, "host b still runs a standby without the DIMM"
        said = ca.log_path.read_text(errors="replace")[offset_a:]
        assert "device memdimm0 was hot-plugged" in said, said[-3000:]
        deadline = time.monotonic() + 30
        while "virsh detach-device" not in said and time.monotonic() < deadline:
            time.sleep(0.2)
            said = ca.log_path.read_text(errors="replace")[offset_a:]
        refusal = [line for line in said.splitlines() if "virsh detach-device" in line]
        assert refusal and "DIMM" in refusal[0] and " WARNING " in refusal[0], said[-3000:]
        assert " ERROR " not in said, said[-3000:]
        status = ca.domain(name)
        assert status is not None and status["state"] in ("unprotected", "degraded") \
            and not status["protected"], status

        # the VM runs on, unprotected: its stream goes on, nothing repeated or lost
        rec = observer.wait_for(
            lambda r: sum(1 for _, t in r.udp if t > plugged_at) >= 3 * PPS, timeout=60)
        verdict = judge_run(rec, Rules(tcp=False))
        assert verdict.ok, verdict.as_dict()
        time.sleep(4.0)  # longer than the first back-offs: no standby is asked for meanwhile
        assert rig.b.qemu_pid(name) is None
        assert "standby created" not in cb.log_path.read_text(errors="replace")[offset_b:]
        said = ca.log_path.read_text(errors="replace")[offset_a:]
        assert "for a standby" not in said, said[-3000:]
        # said once while it holds (retried quietly; detaching the DIMM starts an attempt)
        assert len([line for line in said.splitlines() if "virsh detach-device" in line]) == 1, said[-3000:]
        print(f"memory hot-plug: {refusal[0].split(': ', 1)[-1]}")
    finally:
        cleanup_protected(rig, name)
