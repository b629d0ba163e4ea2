"""The two-host rig: real libvirtd hosts, isolated from each other, with guests that count,
networks that carry traffic, and a teardown that leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree

from cuju_libvirt import FT_NAMESPACE
from cuju_libvirt.rig.hosts import FT_IFACE, LAN_BRIDGE, OBSERVER_ADDRESS, Host, Rig
from cuju_libvirt.rig.sandbox import cgroup2_mount, pid_alive
from cuju_libvirt.rig.teardown import PREFIX, default_base, discover, down_all, sweep_stale
from tests.e2e.conftest import RigGuest, skip_unless_rig_possible

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024


def _virsh_fails(uri: str, *args: str) -> bool:
    proc = subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, text=True, check=False)
    return proc.returncode != 0


def test_protected_domain_defines_reads_back_and_counts(
    rig: Rig, counter_guest: Callable[..., RigGuest]
) -> None:
    guest = counter_guest(rig.a, "rig-protected", ft_peer=rig.b.ft_address)

    # virsh metadata gives back exactly the element we defined, in our namespace.
    element = etree.fromstring(rig.a.virsh("metadata", guest.name, "--uri", FT_NAMESPACE).encode())
    assert etree.QName(element).localname == "ft"
    assert dict(element.attrib) == {"peer": rig.b.ft_address}
    dumped = etree.fromstring(rig.a.virsh("dumpxml", guest.name).encode())
    assert [e.get("peer") for e in dumped.findall(f"metadata/{{{FT_NAMESPACE}}}ft")] == [rig.b.ft_address]

    guest.start()
    assert rig.a.virsh("domstate", guest.name).strip() == "running"
    qemu = rig.a.qemu_pid(guest.name)
    assert qemu is not None
    cmdline = Path(f"/proc/{qemu}/cmdline").read_bytes().split(b"\0")
    assert b"tcg" in cmdline[cmdline.index(b"-accel") + 1]

    # The RAM file lives on the rig's tmpfs, under host a's memory_backing_dir, readable from outside.
    ram = guest.ram_file()
    assert ram.is_relative_to(rig.a.root / "lib" / "qemu" / "ram")
    assert ram.stat().st_size == 64 * MIB

    # The guest counts: in its RAM and on COM1, consecutively.
    first = guest.wait_counter_above(0)
    later = guest.wait_counter_above(first + 200)
    assert later > first + 200
    counts = guest.serial_counts()
    assert len(counts) >= 100, counts[-5:]
    assert counts == list(range(counts[0], counts[0] + len(counts)))
    assert counts[-1] >= first


def test_hosts_are_isolated(rig: Rig, counter_guest: Callable[..., RigGuest]) -> None:
    # Own hostnames (UTS namespaces) and own host UUIDs (from each host's libvirtd.conf).
    for host in rig.hosts.values():
        assert rig_hostname(host.uri) == host.hostname
        caps = etree.fromstring(host.virsh("capabilities").encode())
        conf = (host.root / "etc" / "libvirtd.conf").read_text()
        configured = re.search(r'^host_uuid = "([0-9a-f-]+)"$', conf, re.MULTILINE)
        assert configured is not None
        assert caps.findtext("host/uuid") == configured.group(1)
    assert rig.a.hostname != rig.b.hostname
    uuids = {etree.fromstring(h.virsh("capabilities").encode()).findtext("host/uuid")
             for h in rig.hosts.values()}
    assert len(uuids) == 2

    # Own domain lists.
    counter_guest(rig.a, "rig-only-on-a")
    assert "rig-only-on-a" in rig.a.virsh("list", "--all", "--name").split()
    assert "rig-only-on-a" not in rig.b.virsh("list", "--all", "--name").split()

    # Own /etc, /var/lib, /var/log: what host a writes there, host b and the real tree do not see.
    for path in ("/etc/cuju-libvirt/rig-test.yaml", "/etc/rig-test-file", "/var/lib/cuju-libvirt/rig-test"):
        rig.a.run(["sh", "-c", f"echo {rig.id} > {path}"])
        assert rig.a.outside(path).read_text().strip() == rig.id
        assert rig.b.run(["cat", path], check=False).returncode != 0
        assert not Path(path).exists()
        rig.a.run(["rm", path])

    # Own daemons, all inside the rig's cgroup; the system's libvirt paths are not used.
    pids = set(rig.cgroup.pids())
    libvirtds = {h.daemon_pid("libvirtd") for h in rig.hosts.values()}
    virtlogds = {h.daemon_pid("virtlogd") for h in rig.hosts.values()}
    assert None not in libvirtds and len(libvirtds) == 2 and libvirtds <= pids
    assert None not in virtlogds and len(virtlogds) == 2 and virtlogds <= pids
    for host in rig.hosts.values():
        assert host.uri.endswith(f"socket={host.root}/run/libvirt/libvirt-sock")
        assert host.hostname not in Path("/etc/hostname").read_text()
        host_uuid = etree.fromstring(host.virsh("capabilities").encode()).findtext("host/uuid")
        assert host_uuid is not None and host_uuid not in Path("/etc/libvirt/libvirtd.conf").read_text()


def rig_hostname(uri: str) -> str:
    return subprocess.run(
        ["virsh", "-q", "-c", uri, "hostname"], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_domain_started_on_b_is_invisible_on_a(rig: Rig, counter_guest: Callable[..., RigGuest]) -> None:
    guest = counter_guest(rig.b, "rig-on-b")
    guest.start()
    guest.wait_counter_above(0)

    assert "rig-on-b" in rig.b.virsh("list", "--name").split()
    assert "rig-on-b" not in rig.a.virsh("list", "--all", "--name").split()
    assert _virsh_fails(rig.a.uri, "dominfo", "rig-on-b")
    assert not list((rig.a.root / "lib" / "qemu" / "ram").rglob("*rig-on-b*"))
    assert guest.ram_file().is_relative_to(rig.b.root)

    # At the kernel level: B's QEMU runs in B's network and UTS namespaces, not A's (its mount
    # namespace is libvirt's private one for QEMU, cloned from B's).
    qemu = rig.b.qemu_pid("rig-on-b")
    assert qemu is not None and rig.a.qemu_pid("rig-on-b") is None
    ns_b, ns_a = rig.b._keeper().ns_ids(), rig.a._keeper().ns_ids()
    for kind in ("net", "uts"):
        assert os.readlink(f"/proc/{qemu}/ns/{kind}") == ns_b[kind] != ns_a[kind]
    assert os.readlink(f"/proc/{qemu}/ns/mnt") != ns_a["mnt"]
    # Its tap device is on B's LAN bridge, and A has none.
    links_b = rig.b.run(["ip", "-o", "link", "show", "master", LAN_BRIDGE]).stdout
    links_a = rig.a.run(["ip", "-o", "link", "show", "master", LAN_BRIDGE]).stdout
    assert "vnet" in links_b
    assert "vnet" not in links_a


RECEIVER = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(20)
print("ready", flush=True)
for _ in range(int(sys.argv[3])):
    data, (addr, _port) = s.recvfrom(100)
    print(json.dumps([data.decode(), addr]), flush=True)
"""

SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"""


def test_ft_link_and_lan_carry_traffic(rig: Rig) -> None:
    # Both hosts reach the observer on the LAN, each from its own LAN address.
    observer = rig.lan.popen([sys.executable, "-c", RECEIVER, OBSERVER_ADDRESS, "5000", "2"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert observer.stdout is not None
        assert observer.stdout.readline().strip() == "ready"
        for host in rig.hosts.values():
            host.run([sys.executable, "-c", SENDER, OBSERVER_ADDRESS, "5000", f"hello from {host.name}"])
        received = [json.loads(observer.stdout.readline()) for _ in range(2)]
    finally:
        observer.kill()
        observer.wait()
    assert sorted(received) == [["hello from a", rig.a.lan_address], ["hello from b", rig.b.lan_address]]

    # Host b hears host a over the FT link, from a's FT address.
    listener = rig.b.popen([sys.executable, "-c", RECEIVER, rig.b.ft_address, "5001", "1"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "ready"
        rig.a.run([sys.executable, "-c", SENDER, rig.b.ft_address, "5001", "epoch"])
        assert json.loads(listener.stdout.readline()) == ["epoch", rig.a.ft_address]
    finally:
        listener.kill()
        listener.wait()
    assert FT_IFACE in rig.a.run(["ip", "-o", "addr", "show", "to", rig.a.ft_address]).stdout


def test_a_guest_tap_never_becomes_the_lan_bridges_address(rig: Rig) -> None:
    """A Linux bridge whose address was never set takes the lowest address of its ports, and
    libvirt gives a guest's tap fe:54:... of the guest's MAC, the same on the primary's host
    and the standby's. When a random uplink address lay above it, host a's br-lan took the
    primary's tap address; once host b's standby had its tap (the same address, a local
    entry of b's bridge), b delivered every frame for host a to itself: the peer channel
    was cut for a minute and more. Each host's br-lan keeps the address the rig gave it."""
    ip = ["ip", "-o", "link", "show", LAN_BRIDGE]
    for host in rig.hosts.values():
        before = host.run(ip).stdout.split("link/ether ")[1].split()[0]
        host.run(["ip", "link", "add", "tap-probe", "address", "00:00:5e:00:53:01", "type", "veth",
                  "peer", "name", "tap-probe-peer"])
        try:
            host.run(["ip", "link", "set", "tap-probe", "master", LAN_BRIDGE])
            after = host.run(ip).stdout.split("link/ether ")[1].split()[0]
        finally:
            host.run(["ip", "link", "del", "tap-probe"])
        assert after == before, f"host {host.name}: br-lan took its new port's address ({before} -> {after})"


def _snapshot(name: str) -> dict[str, list[str]]:
    """What a rig called ``name`` could leave in the root namespaces."""
    cg = cgroup2_mount()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {
        "mounts": [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if name in line],
        "cgroups": sorted(p.name for p in cg.glob(name + "*")) if cg else [],
        "dirs": sorted(str(p) for p in default_base().glob(name + "*")),
        "dev_shm": sorted(p.name for p in Path("/dev/shm").iterdir() if "cuju-rig" in p.name),
        "links": sorted(
            n for n in re.findall(r"^\d+: ([^:@]+)", links, re.MULTILINE)
            if n in (FT_IFACE, "uplink", "port-a", "port-b", LAN_BRIDGE, "br0") or name in n
        ),
        "processes": _processes_mentioning(name),
    }


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or not pid_alive(int(proc.name)):
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(proc.name) != os.getpid():
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def _pids_in_namespaces(ns_ids: dict[str, dict[str, str]]) -> list[int]:
    wanted = {v for ids in ns_ids.values() for v in ids.values()}
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        for kind in ("mnt", "uts", "net"):
            try:
                if os.readlink(proc / "ns" / kind) in wanted and pid_alive(int(proc.name)):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.mark.timeout(150)
def test_down_leaves_nothing(counter_image: Path, tmp_path: Path) -> None:
    skip_unless_rig_possible()
    rig = Rig()
    before = _snapshot(rig.name)
    assert not any(before.values()), before
    rig.up()
    try:
        xml = tmp_path / "leak.xml"
        from cuju_libvirt.rig.domains import domain_xml  # noqa: PLC0415

        xml.write_text(domain_xml("rig-leak", disk=rig.stage_file(counter_image), bridge=LAN_BRIDGE,
                                  serial_log="/var/log/libvirt/qemu/rig-leak-serial.log"))
        rig.a.virsh("define", str(xml))
        rig.a.virsh("start", "rig-leak")
        rig.b.popen(["sleep", "600"])  # something a test started inside and forgot
        during = _snapshot(rig.name)
        pids = rig.cgroup.pids()
        ns_ids = rig.namespace_ids()
        qemu = rig.a.qemu_pid("rig-leak")
    except BaseException:
        rig.down()
        raise
    # Sanity: while up, the rig is visible in every place the teardown must clean.
    assert during["mounts"] and during["cgroups"] and during["dirs"] and during["processes"]
    assert qemu is not None and qemu in pids and len(pids) >= 8
    assert len(ns_ids) == 3 and _pids_in_namespaces(ns_ids)

    rig.down()

    assert _snapshot(rig.name) == before
    assert [p for p in pids if pid_alive(p)] == []
    assert _pids_in_namespaces(ns_ids) == []
    assert rig.id not in discover()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("cleaner", ["reaper", "down-all", "sweep"])
def test_rig_of_a_killed_owner_is_removed(rig: Rig, cleaner: str) -> None:
    """SIGKILL the process that owns a rig: its reaper removes the rig; if the reaper is killed
    too, ``down --all`` (or the e2e fixtures' sweep) finds the stale rig by its name and
    removes it, and keeps live rigs."""
    reaper_survives = cleaner == "reaper"
    owner = subprocess.Popen(
        [sys.executable, "-c", "from cuju_libvirt.rig.hosts import Rig; import time\n"
         "r = Rig().up(); print(r.id, flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    try:
        assert owner.stdout is not None
        rig_id = owner.stdout.readline().strip()
        assert rig_id, "the owner process did not bring its rig up"
        traces = discover()[rig_id]
        state = traces.state or {}
        reaper = state["reaper"]["pid"]
        keepers = [h["keeper"] for h in state["hosts"].values()]
        assert pid_alive(reaper) and all(pid_alive(k) for k in keepers)
        if not reaper_survives:
            os.kill(reaper, signal.SIGKILL)
    finally:
        os.killpg(owner.pid, signal.SIGKILL)
        owner.wait()

    if reaper_survives:
        deadline = time.monotonic() + 60
        while rig_id in discover():
            assert time.monotonic() < deadline, f"the reaper did not remove rig {rig_id}"
            time.sleep(0.2)
    else:
        time.sleep(0.3)
        stale = discover()[rig_id]
        assert not stale.owner_alive and stale.pids  # left behind, still running
        if cleaner == "down-all":
            results = dict(down_all(only={rig_id, rig.id}))
            assert results[rig_id] == "removed"
            assert results[rig.id].startswith("kept: in use by pid")
        else:
            assert rig_id in sweep_stale() and rig.id in discover()
        assert rig.a.virsh("hostname").strip() == rig.a.hostname  # the live rig still works
    assert rig_id not in discover()
    assert not any(pid_alive(k) for k in keepers)
    assert not (default_base() / (PREFIX + rig_id)).exists()


HOOK = """#!/bin/sh
# $1 domain, $2 operation, $3 sub-operation; libvirt passes the domain XML on stdin.
cat >/dev/null
echo "$(basename "$0") $1 $2 $3" >> /run/cuju-libvirt/hooks.log
"""


@pytest.mark.timeout(150)
def test_hooks_installed_before_start_and_after_restart(counter_image: Path, tmp_path: Path) -> None:
    skip_unless_rig_possible()
    hook = tmp_path / "hook"
    hook.write_text(HOOK)
    with Rig(hooks={"10-first": hook}) as rig:
        from cuju_libvirt.rig.domains import domain_xml  # noqa: PLC0415

        xml = tmp_path / "hooked.xml"
        xml.write_text(domain_xml("rig-hooked", disk=rig.stage_file(counter_image)))
        rig.a.virsh("define", str(xml))
        rig.a.virsh("start", "rig-hooked")
        log_file = rig.a.run_dir / "hooks.log"
        calls = log_file.read_text().splitlines()
        assert calls[:3] == [
            "10-first rig-hooked prepare begin", "10-first rig-hooked start begin",
            "10-first rig-hooked started begin",
        ]
        assert not (rig.b.run_dir / "hooks.log").exists()  # host b ran no domain

        # A hook added later is read when libvirtd restarts; the guest keeps running.
        qemu = rig.a.qemu_pid("rig-hooked")
        old_libvirtd = rig.a.daemon_pid("libvirtd")
        rig.a.install_hook("20-second", hook, restart=True)
        assert rig.a.daemon_pid("libvirtd") not in (None, old_libvirtd)
        assert rig.a.virsh("domstate", "rig-hooked").strip() == "running"
        assert rig.a.qemu_pid("rig-hooked") == qemu
        deadline = time.monotonic() + 20
        while "20-second rig-hooked reconnect begin" not in log_file.read_text():
            assert time.monotonic() < deadline, log_file.read_text()
            time.sleep(0.1)
        assert "10-first rig-hooked reconnect begin" in log_file.read_text()


def test_announce_self_moves_the_guest_mac_across_the_lan(
    rig: Rig, counter_guest: Callable[..., RigGuest]
) -> None:
    """What failover relies on: the same MAC announced from host b is learned on b's port."""
    mac = "52:54:00:19:00:77"
    announce = '{"execute":"announce-self","arguments":{"initial":50,"max":100,"rounds":3,"step":50}}'

    def port_of(mac: str) -> str | None:
        fdb = rig.lan.run(["bridge", "fdb", "show", "br", "br0"]).stdout
        ports = re.findall(rf"^{mac} dev (\S+)", fdb, re.MULTILINE)
        return ports[0] if ports else None

    def announce_until(host_guest: RigGuest, port: str) -> None:
        deadline = time.monotonic() + 20
        while port_of(mac) != port:
            assert time.monotonic() < deadline, f"{mac} not learned on {port}: {port_of(mac)}"
            host_guest.host.virsh("qemu-monitor-command", host_guest.name, announce)
            time.sleep(0.3)

    on_a = counter_guest(rig.a, "rig-mover-a", mac=mac)
    on_a.start()
    announce_until(on_a, "port-a")
    rig.a.virsh("destroy", on_a.name)
    on_b = counter_guest(rig.b, "rig-mover-b", mac=mac)
    on_b.start()
    announce_until(on_b, "port-b")


def test_cli_up_status_down() -> None:
    skip_unless_rig_possible()
    rig_id = "clitest" + os.urandom(2).hex()
    cli = [sys.executable, "-m", "cuju_libvirt.rig"]
    up = subprocess.run([*cli, "up", "--id", rig_id], capture_output=True, text=True, timeout=120,
                        check=False)
    try:
        assert up.returncode == 0, up.stderr
        assert f"rig {rig_id} is up" in up.stdout
        uri_a = re.search(r"virsh -c '(qemu\+unix:///system\?socket=\S+/a/run/libvirt/libvirt-sock)'",
                          up.stdout)
        assert uri_a is not None, up.stdout
        assert rig_hostname(uri_a.group(1)) == "cuju-a"
        assert "bringing up" in up.stderr  # progress lines
        status = json.loads(subprocess.run([*cli, "status", "--json"], capture_output=True, text=True,
                                           check=True).stdout)
        assert status[rig_id]["owner"] == "none (started by 'up')"
        assert status[rig_id]["hosts"]["b"]["libvirtd_listening"] is True
        # Another process can attach to it and work inside its hosts.
        attached = Rig.attach(Path(status[rig_id]["root"]))
        assert attached.b.run(["hostname"]).stdout.strip() == "cuju-b"
        assert attached.a.virsh("hostname").strip() == "cuju-a"
        assert attached.lan.run(["ip", "-o", "addr", "show", "br0"]).stdout.count(OBSERVER_ADDRESS) == 1
        # A second 'up' with the same id is refused and leaves the running rig alone.
        twice = subprocess.run([*cli, "up", "--id", rig_id], capture_output=True, text=True, timeout=60,
                               check=False)
        assert twice.returncode == 1 and "exists already" in twice.stderr
        assert rig_hostname(uri_a.group(1)) == "cuju-a"
    finally:
        down = subprocess.run([*cli, "down", rig_id], capture_output=True, text=True, timeout=120,
                              check=False)
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == f"rig {rig_id}: removed"
    assert rig_id not in discover()
    again = subprocess.run([*cli, "down", rig_id], capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 1 and "not found" in again.stderr


def test_host_crash_kills_only_that_host_and_it_reboots(
    rig: Rig, counter_guest: Callable[..., RigGuest]
) -> None:
    on_a = counter_guest(rig.a, "rig-survivor")
    on_b = counter_guest(rig.b, "rig-victim")
    on_a.start()
    on_b.start()
    on_b.wait_counter_above(0)
    qemu_b, qemu_a = rig.b.qemu_pid(on_b.name), rig.a.qemu_pid(on_a.name)
    libvirtd_a = rig.a.daemon_pid("libvirtd")
    assert qemu_b in rig.b.processes() and qemu_a not in rig.b.processes()

    try:
        killed = rig.b.crash()
        assert qemu_b in killed and rig.b.daemon_pid("libvirtd") is None and rig.b.processes() == []
        assert _virsh_fails(rig.b.uri, "list")
        # Host a did not notice.
        assert rig.a.daemon_pid("libvirtd") == libvirtd_a and rig.a.qemu_pid(on_a.name) == qemu_a
        count = on_a.counter()
        on_a.wait_counter_above(count)
    finally:
        rig.b.reboot()
    assert rig.b.virsh("domstate", on_b.name).strip() == "shut off"
    on_b.start()
    on_b.wait_counter_above(0)


def test_partition_cuts_both_paths_and_heals(rig: Rig) -> None:
    def delivered(sender: Host, dest: str, attempts: int = 10) -> bool:
        """Send up to ``attempts`` datagrams, 0.3 s apart; True once one arrives. (Right after
        a partition heals, packets queued behind a failing ARP resolution are dropped, as on a
        real LAN, so one datagram is not enough.)"""
        receiver_node = rig.lan if dest == OBSERVER_ADDRESS else rig.b
        listener = receiver_node.popen([sys.executable, "-c", RECEIVER, dest, "5002", "1"],
                                       stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
            for _ in range(attempts):
                sender.run([sys.executable, "-c", SENDER, dest, "5002", "ping"], check=False)
                ready, _, _ = select.select([listener.stdout], [], [], 0.3)
                if ready:
                    return "ping" in listener.stdout.readline()
            return False
        finally:
            listener.kill()
            listener.wait()

    assert delivered(rig.a, rig.b.ft_address) and delivered(rig.a, OBSERVER_ADDRESS)
    rig.a.set_links(up=False)
    try:
        assert not delivered(rig.a, rig.b.ft_address, attempts=3)
        assert not delivered(rig.a, OBSERVER_ADDRESS, attempts=3)
        assert delivered(rig.b, OBSERVER_ADDRESS)  # only host a is cut off
    finally:
        rig.a.set_links(up=True)
    assert delivered(rig.a, rig.b.ft_address) and delivered(rig.a, OBSERVER_ADDRESS)


@pytest.mark.timeout(300)
def test_demo_runs_and_cleans_up() -> None:
    """The README's first command (after setup): every step passes, the guest counts, is
    protected, fails over to host b when its QEMU is killed and counts on there, its served ext4
    data disk clean with its file intact on host b's copy; nothing stays."""
    skip_unless_rig_possible()
    proc = subprocess.run([sys.executable, "-m", "cuju_libvirt.rig", "demo"], capture_output=True, text=True,
                          timeout=290, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    expected = ("== 1/11", "== 11/11", "can be protected", "protected by <cuju:ft>",
                "Domain 'demo-vm' started", "host b took over", "the counter continued on host b",
                "protected again", "ceded record",
                "is intact on host b's copy, and its file system is clean")
    for step in expected:
        assert step in out, step
    counters = [int(m) for m in re.findall(r"counter in guest RAM:\s+(\d+)", out)]
    assert len(counters) == 10 and counters == sorted(counters) and counters[-1] > counters[0]
    rig_id = re.search(r"rig (\w+) removed", out)
    assert rig_id is not None and rig_id.group(1) not in discover()
