"""The rig with three hosts (issue 9): every host a libvirt host of its own, one FT bridge and
the LAN joining them all, a partition that cuts one host only, and a teardown that leaves
nothing. The two-host rig (the default) is covered by test_rig.py."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from itertools import permutations
from pathlib import Path

import pytest

from cuju_libvirt.rig.domains import domain_xml
from cuju_libvirt.rig.guests import read_counter
from cuju_libvirt.rig.hosts import FT_IFACE, LAN_BRIDGE, Host, Rig
from cuju_libvirt.rig.sandbox import pid_alive
from cuju_libvirt.rig.teardown import discover
from tests.e2e.conftest import skip_unless_rig_possible
from tests.e2e.test_rig import RECEIVER, SENDER, _pids_in_namespaces, _snapshot

pytestmark = pytest.mark.timeout(240)


def reaches(sender: Host, receiver: Host, address: str, port: int) -> bool:
    """One datagram from ``sender`` to ``address`` on ``receiver``, seen from the sender's address."""
    listener = receiver.popen([sys.executable, "-c", RECEIVER, address, str(port), "1"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        for _ in range(5):
            sender.run([sys.executable, "-c", SENDER, address, str(port), sender.name], check=False)
            if select.select([listener.stdout], [], [], 0.3)[0]:
                got = json.loads(listener.stdout.readline())
                return got[0] == sender.name and got[1] in (sender.ft_address, sender.lan_address)
        return False
    finally:
        listener.kill()
        listener.wait()


def test_three_hosts_each_their_own_libvirt_all_joined_and_nothing_left(
    counter_image: Path, tmp_path: Path
) -> None:
    skip_unless_rig_possible()
    rig = Rig(host_count=3)
    before = _snapshot(rig.name)
    rig.up()
    try:
        assert list(rig.hosts) == ["a", "b", "c"] and rig.host("c") is rig.hosts["c"]
        hostnames = {h.run(["hostname"]).stdout.strip() for h in rig.hosts.values()}
        assert hostnames == {"cuju-a", "cuju-b", "cuju-c"}
        uuids = {h.run(["cat", "/etc/libvirt/libvirtd.conf"]).stdout for h in rig.hosts.values()}
        assert len(uuids) == 3  # each libvirtd has a host_uuid of its own
        # every host reaches every other one over the FT bridge and over the LAN
        for port, (x, y) in enumerate(permutations(rig.hosts.values(), 2), 6000):
            assert reaches(x, y, y.ft_address, port), f"FT {x.name} -> {y.name}"
        for port, (x, y) in enumerate(permutations(rig.hosts.values(), 2), 6100):
            assert reaches(x, y, y.lan_address, port), f"LAN {x.name} -> {y.name}"
        c = rig.host("c")
        assert FT_IFACE in c.run(["ip", "-o", "addr", "show", "to", c.ft_address]).stdout

        # a guest on host c counts, and only host c knows it
        xml = tmp_path / "nh.xml"
        xml.write_text(domain_xml("nh-vm", memory_mib=64, disk=rig.stage_file(counter_image, "nh-vm.img"),
                                  bridge=LAN_BRIDGE, serial_log="/var/log/libvirt/qemu/nh-vm-serial.log"))
        c.virsh("define", str(xml))
        c.virsh("start", "nh-vm")
        assert "nh-vm" not in rig.a.virsh("list", "--all", "--name").split()
        assert "nh-vm" not in rig.b.virsh("list", "--all", "--name").split()
        ram = c.ram_files("nh-vm")[0]
        first = read_counter(ram)
        deadline = time.monotonic() + 30
        while read_counter(ram) <= first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert read_counter(ram) > first

        # cutting host c's links cuts host c alone: a and b still talk over the FT bridge
        c.set_links(up=False)
        assert not reaches(rig.a, c, c.ft_address, 6200)
        assert reaches(rig.a, rig.b, rig.b.ft_address, 6201)
        assert reaches(rig.b, rig.a, rig.a.lan_address, 6202)
        c.set_links(up=True)
        assert reaches(rig.a, c, c.ft_address, 6203)

        attached = Rig.attach(rig.root)
        assert [(h.name, h.ft_address, h.spec.ft_prefixlen) for h in attached.hosts.values()] == [
            (h.name, h.ft_address, h.spec.ft_prefixlen) for h in rig.hosts.values()]
        pids, ns_ids = rig.cgroup.pids(), rig.namespace_ids()
    except BaseException:
        rig.down()
        raise
    assert len(ns_ids) == 4 and _pids_in_namespaces(ns_ids)
    rig.down()
    assert _snapshot(rig.name) == before
    assert [p for p in pids if pid_alive(p)] == []
    assert _pids_in_namespaces(ns_ids) == []
    assert rig.id not in discover()
