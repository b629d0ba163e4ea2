"""The path the end-to-end failover test needs: a Linux guest on a rig host, on virtio-net on
the host's LAN bridge, streaming numbered UDP datagrams and a TCP counter stream to an
observer in the rig's LAN namespace."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cuju_libvirt.rig.domains import domain_xml
from cuju_libvirt.rig.hosts import FIRST_GUEST_ADDRESS, LAN_BRIDGE, OBSERVER_ADDRESS, Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest, build_linux_guest, kernel_cmdline, parse_serial
from cuju_libvirt.rig.nodes import LAN_PREFIXLEN
from cuju_libvirt.rig.observer import Observer, Rules, judge_run
from tests.e2e.conftest import ft_element

MAC = "52:54:00:19:01:00"
PPS = 200


@pytest.fixture(scope="session")
def linux_guest() -> LinuxGuest:
    return build_linux_guest()


@pytest.fixture
def observer(rig: Rig) -> Iterator[Observer]:
    with Observer((OBSERVER_ADDRESS, 0), (OBSERVER_ADDRESS, 0), netns=rig.lan.netns_path) as obs:
        yield obs


@pytest.mark.timeout(240)
def test_linux_guest_on_host_a_streams_to_the_lan_observer(
    rig: Rig, linux_guest: LinuxGuest, observer: Observer
) -> None:
    name = "rig-linux"
    cmdline = kernel_cmdline(
        "count,udp", ip=f"{FIRST_GUEST_ADDRESS}/{LAN_PREFIXLEN}", mac=MAC, pps=PPS,
        peer="{}:{}".format(*observer.udp_address), tcp="{}:{}".format(*observer.tcp_address),
    )
    xml = domain_xml(
        name, memory_mib=256,
        kernel=rig.stage_file(linux_guest.kernel, f"{name}-kernel"),
        initrd=rig.stage_file(linux_guest.initrd, f"{name}-initrd"),
        cmdline=cmdline,
        serial_log=f"/var/log/libvirt/qemu/{name}-serial.log",
        bridge=LAN_BRIDGE, mac=MAC, metadata=[ft_element(rig.b.ft_address)],
    )
    xml_file = rig.root / f"{name}.xml"
    xml_file.write_text(xml)
    rig.a.virsh("define", str(xml_file))
    try:
        rig.a.virsh("start", name)
        rec = observer.wait_for(lambda r: len(r.udp) >= 3 * PPS and len(r.tcp_data) >= 800, timeout=120)
        serial = rig.a.outside(f"/var/log/libvirt/qemu/{name}-serial.log")
        reports = parse_serial(serial.read_text(errors="replace"), "init")
        ready = [r for r in reports if "ready" in r.get("words", "").split()]
        assert ready, f"the guest did not finish booting (see {serial})"
        assert len(rec.udp) >= 3 * PPS, f"only {len(rec.udp)} datagrams arrived (see {serial})"
        verdict = judge_run(rec, Rules())  # no failover: no gap, no repeat, intact TCP stream
        assert verdict.ok, verdict.as_dict()
        assert verdict.udp_first == 0 and verdict.tcp_counters >= 100
        assert rec.tcp_connections == 1 and rec.udp_foreign == 0
    finally:
        rig.a.virsh("destroy", name, check=False)
        rig.a.virsh("undefine", name, check=False)
        for suffix in ("kernel", "initrd"):
            (rig.root / "images" / f"{name}-{suffix}").unlink(missing_ok=True)
