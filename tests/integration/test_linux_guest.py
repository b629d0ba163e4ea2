"""The Linux test guest on real QEMU (TCG): it boots, and every workload shows its output.

Two boots for the whole module: a networked guest (``count,udp,echo``) in a network
namespace of its own with a tap device, talking to an observer bound in that namespace;
and a guest with a virtio-blk disk and a virtio balloon (``stress,balloon,diskread``).
The kernel and initramfs are built by the first test that needs them and cached.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt.ft_engine.devstate import DeviceStateSaver, load_device_state
from cuju_libvirt.rig.guest_net import GuestNetwork, socket_in
from cuju_libvirt.rig.linux_guest import MODULES, LinuxGuest, build_linux_guest, kernel_cmdline, parse_serial
from cuju_libvirt.rig.observer import Observer, Rules, judge_run
from cuju_libvirt.rig.qemu_direct import DirectGuest

log = logging.getLogger(__name__)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, tap devices)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 not installed"),
]

BOOT_TIMEOUT = 90.0  # TCG on a shared 2-core machine; ~6 s when it is quiet
NETNS = f"lg-{os.getpid() % 100000}"
PPS = 300
ECHO_PORT = 7007
DISK_BLOCKS = 2048  # 8 MiB
BAD_BLOCK = 1000


@pytest.fixture(scope="module")
def linux_guest() -> LinuxGuest:
    first = build_linux_guest()
    again = build_linux_guest()  # the second call must come from the cache
    assert again == first
    assert first.modules[: len(MODULES) - 1] == MODULES[:-1]
    return first


def boot(guest: DirectGuest, net: GuestNetwork | None = None) -> float:
    """Start ``guest`` (inside ``net``'s namespace if given); seconds from QEMU's start to
    the guest's /init reporting ready."""
    started = time.monotonic()
    if net is None:
        guest.start()
    else:
        with net.entered():  # QEMU opens the tap inside the namespace
            guest.start()
    guest.wait_serial(r"cuju-init: ready", timeout=BOOT_TIMEOUT)
    seconds = time.monotonic() - started
    ready = parse_serial(guest.serial_text(), "init")[-1]
    log.warning(
        "Linux guest %s: /init ready %.1f s after QEMU start (guest uptime %s s)",
        guest.name,
        seconds,
        ready["uptime"],
    )
    return seconds


def reports(guest: DirectGuest, source: str) -> list[dict[str, str]]:
    return parse_serial(guest.serial_text(), source)


def wait_reports(guest: DirectGuest, source: str, count: int, timeout: float = 30.0) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        found = reports(guest, source)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.fixture(scope="class")
def net() -> Iterator[GuestNetwork]:
    with GuestNetwork(NETNS, subnet=77) as net:
        yield net
    assert not Path("/run/netns", NETNS).exists()


@pytest.fixture(scope="class")
def observer(net: GuestNetwork) -> Iterator[Observer]:
    with Observer((net.host_ip, 0), (net.host_ip, 0), netns=net.name) as obs:
        yield obs


@pytest.fixture(scope="class")
def net_guest(linux_guest: LinuxGuest, net: GuestNetwork, observer: Observer) -> Iterator[DirectGuest]:
    udp_host, udp_port = observer.udp_address
    tcp_host, tcp_port = observer.tcp_address
    append = kernel_cmdline(
        "count,udp,echo",
        **net.cmdline_args(),
        peer=f"{udp_host}:{udp_port}",
        tcp=f"{tcp_host}:{tcp_port}",
        pps=PPS,
        port=ECHO_PORT,
        interval_ms=200,
        report_ms=500,
    )
    guest = DirectGuest(
        name="linuxguest-net",
        memory_mib=256,
        kernel=linux_guest.kernel,
        initrd=linux_guest.initrd,
        append=append,
        extra_args=net.qemu_args(),
    )
    try:
        boot(guest, net)
        yield guest
    finally:
        guest.close()


class TestNetworkedGuest:
    """``count,udp,echo`` over virtio-net on a tap in namespace ``lg-PID``."""

    @pytest.mark.timeout(180)
    def test_boots_and_counts(self, net_guest: DirectGuest, linux_guest: LinuxGuest) -> None:
        ready = reports(net_guest, "init")[-1]
        assert ready["mode"] == "count,udp,echo" and ready["ip"].startswith("198.18.77.2/")
        # every module the image ships is loaded: MODULES and what they depend on (ext4 brings
        # jbd2, mbcache and crc16), as /proc/modules counts them
        assert ready["modules"] == str(len(linux_guest.modules))
        assert "error" not in net_guest.serial_text()
        counts = [int(r["n"]) for r in wait_reports(net_guest, "count", 5)]
        assert counts[:5] == [0, 1, 2, 3, 4]

    @pytest.mark.timeout(120)
    def test_udp_and_tcp_streams_reach_the_observer_intact(
        self, net_guest: DirectGuest, observer: Observer
    ) -> None:
        rec = observer.wait_for(lambda r: len(r.udp) >= 3 * PPS // 2 and len(r.tcp_data) >= 8000, 60.0)
        verdict = judge_run(rec, Rules())
        assert verdict.ok, verdict.problems
        assert verdict.udp_received >= 3 * PPS // 2 and verdict.tcp_counters >= 1000
        # The rate the guest was asked for, within a wide margin (TCG timers on a busy host).
        window = [t for _, t in rec.udp[-PPS:]]
        rate = (len(window) - 1) / (window[-1] - window[0])
        assert PPS / 3 < rate < PPS * 1.5, rate
        start = reports(net_guest, "udp")[0]
        assert start["words"] == "start" and start["pps"] == str(PPS)
        assert start["peer"] == "{}:{}".format(*observer.udp_address)
        assert start["tcp"] == "{}:{}".format(*observer.tcp_address)
        progress = wait_reports(net_guest, "udp", 3)
        assert any(r.get("tcp") == "up" and int(r.get("tcp_bytes", "0")) > 0 for r in progress), progress

    @pytest.mark.timeout(120)
    def test_tcp_connection_survives_a_pause_of_the_vm(
        self, net_guest: DirectGuest, observer: Observer
    ) -> None:
        before = observer.recording()
        net_guest.stop()
        time.sleep(2.0)
        paused = observer.recording()
        net_guest.cont()
        after = observer.wait_for(lambda r: len(r.tcp_data) > len(paused.tcp_data) + 800, 30.0)
        verdict = judge_run(after, Rules())
        assert verdict.ok, verdict.problems
        assert after.tcp_connections == 1
        assert len(after.tcp_data) > len(paused.tcp_data) >= len(before.tcp_data)
        # Nothing was sent while the VM was stopped (bar what was already in flight).
        assert len(paused.udp) - len(before.udp) < PPS // 4

    @pytest.mark.timeout(60)
    def test_echo_answers_from_the_namespace(self, net_guest: DirectGuest, net: GuestNetwork) -> None:
        net_guest.wait_serial(rf"cuju-echo: listening port={ECHO_PORT}", timeout=10)
        sock = socket_in(net.name, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        with sock:
            sock.settimeout(2.0)
            rtts = []
            for n in range(20):
                payload = struct.pack(">Q", n) + os.urandom(24)
                sent = time.monotonic()
                sock.sendto(payload, (net.guest_ip, ECHO_PORT))
                data, peer = sock.recvfrom(2048)
                rtts.append(time.monotonic() - sent)
                assert data == payload and peer == (net.guest_ip, ECHO_PORT)
        rtts.sort()
        log.warning("UDP echo round trip to the TCG guest: median %.2f ms", rtts[len(rtts) // 2] * 1000)
        net_guest.wait_serial(r"cuju-echo: echoed=(?:[2-9]\d|\d{3,})\b", timeout=10)

    @pytest.mark.timeout(180)
    def test_streams_survive_a_move_to_a_second_qemu(
        self,
        net_guest: DirectGuest,
        observer: Observer,
        net: GuestNetwork,
        linux_guest: LinuxGuest,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> None:
        """Checkpoint the running guest (device state; RAM from its shared file), SIGKILL it,
        resume the checkpoint in a fresh QEMU on the same tap: the guest goes on counting,
        its UDP numbers continue and its TCP connection carries on, as after a failover.
        Runs last in the class: it replaces the class's guest."""
        work = tmp_path_factory.mktemp("linuxguest-move")
        state, ram = work / "device-state", work / "ram"
        observer.wait_for(lambda r: len(r.tcp_data) >= 800, 30.0)
        qmp = net_guest.qmp
        net_guest.stop()
        with DeviceStateSaver(qmp) as saver:
            state.write_bytes(saver.save().blob)
        shutil.copyfile(net_guest.ram_path, ram)
        counted = [int(r["n"]) for r in reports(net_guest, "count")]
        os.killpg(net_guest.pid, signal.SIGKILL)  # the "primary" dies
        failover_at = time.monotonic()
        net_guest.close()
        backup = DirectGuest(
            name="linuxguest-backup",
            memory_mib=net_guest.memory_mib,
            kernel=linux_guest.kernel,
            initrd=linux_guest.initrd,
            append=net_guest.append,
            extra_args=net_guest.extra_args,
            incoming=True,
        )
        try:
            with net.entered():
                backup.start()
            with open(ram, "rb") as src, open(backup.ram_path, "r+b") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            load_device_state(backup.qmp, state.read_bytes(), qemu_log=backup.stderr_path)
            backup.cont()
            # The backup's console starts empty: its first count continues the primary's.
            resumed = wait_reports(backup, "count", 3)
            assert resumed and int(resumed[0]["n"]) >= counted[-1], (counted[-3:], resumed[:3])
            assert int(resumed[0]["n"]) <= counted[-1] + 1
            size = len(observer.recording().tcp_data)
            rec = observer.wait_for(lambda r: len(r.tcp_data) >= size + 1600, 60.0)
        finally:
            backup.close()
            state.unlink(missing_ok=True)
            ram.unlink(missing_ok=True)
        verdict = judge_run(rec, Rules(max_gap=PPS // 10, failover_at=failover_at))
        assert verdict.ok, verdict.problems
        assert verdict.udp_after_failover > 0 and verdict.tcp_bytes_after_failover >= 1600
        assert rec.tcp_connections == 1
        log.warning(
            "move to a second QEMU: first datagram %.0f ms after the kill, %d UDP numbers lost",
            verdict.failover_ms or -1,
            sum(g.missing for g in verdict.gaps),
        )


def patterned_disk(path: Path) -> None:
    """DISK_BLOCKS 4 KiB blocks that start with "CUJUBLK\\0" + their index; BAD_BLOCK is off by one."""
    with open(path, "wb") as out:
        for index in range(DISK_BLOCKS):
            stored = index + 1 if index == BAD_BLOCK else index
            out.write((b"CUJUBLK\0" + struct.pack("<Q", stored)).ljust(4096, b"\xa5"))


@pytest.fixture(scope="class")
def mem_guest(linux_guest: LinuxGuest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DirectGuest]:
    disk = tmp_path_factory.mktemp("linuxguest-disk") / "pattern.img"
    patterned_disk(disk)
    append = kernel_cmdline("stress,balloon,diskread", stress_mb=16, report_ms=500, bufs=4, bufsize=65536)
    guest = DirectGuest(
        name="linuxguest-mem",
        memory_mib=256,
        kernel=linux_guest.kernel,
        initrd=linux_guest.initrd,
        append=append,
        extra_args=[
            *("-device", "virtio-balloon-pci,id=balloon0"),
            *("-drive", f"file={disk},if=none,id=lgdisk,format=raw,readonly=on"),
            *("-device", "virtio-blk-pci,drive=lgdisk"),
        ],
    )
    try:
        boot(guest)
        yield guest
    finally:
        guest.close()
        disk.unlink()


class TestMemoryAndDiskGuest:
    """``stress,balloon,diskread`` with a virtio balloon and a patterned virtio-blk disk."""

    @pytest.mark.timeout(120)
    def test_stress_reports_its_rate(self, mem_guest: DirectGuest) -> None:
        found = wait_reports(mem_guest, "stress", 4)
        assert found[0].get("mb") == "16" and found[0].get("pages") == "4096"
        rates = [float(r["pages_per_s"]) for r in found if "pages_per_s" in r]
        assert len(rates) >= 2 and min(rates) > 0, found
        assert int(found[-1]["pass"]) > int(found[1]["pass"])
        log.warning(
            "stress under TCG: %.0f pages/s (median of %d reports)",
            sorted(rates)[len(rates) // 2],
            len(rates),
        )

    @pytest.mark.timeout(120)
    def test_diskread_reads_and_verifies_with_and_without_o_direct(self, mem_guest: DirectGuest) -> None:
        start = reports(mem_guest, "diskread")[0]
        assert start["patterned"] == "1" and start["disk"] == "/dev/vda"
        passes = [r for r in wait_reports(mem_guest, "diskread", 4) if "pass" in r]
        assert {r["direct"] for r in passes} == {"0", "1"}, passes
        for report in passes:
            assert int(report["bytes"]) == DISK_BLOCKS * 4096
            assert int(report["blocks_checked"]) == DISK_BLOCKS
            # The one block written with a wrong index is caught in every pass, and only it.
            assert report["bad_blocks"] == "1", report
        for direct in ("1", "0"):
            rates = [float(r["mb_per_s"]) for r in passes if r["direct"] == direct]
            log.warning("diskread under TCG, O_DIRECT=%s: %.1f MB/s", direct, max(rates))

    @pytest.mark.timeout(120)
    def test_balloon_inflation_shrinks_the_guest(self, mem_guest: DirectGuest) -> None:
        wait_reports(mem_guest, "balloon", 1)
        before = int(reports(mem_guest, "balloon")[-1]["memtotal_kb"])
        assert re.search(r"init_on_alloc=0", mem_guest.append or "")
        target = 160 << 20
        mem_guest.qmp.execute("balloon", {"value": target})
        # Inflation is gradual: wait for both the guest's MemTotal and QEMU's view to get there.
        deadline = time.monotonic() + 60
        while True:
            after = int(reports(mem_guest, "balloon")[-1]["memtotal_kb"])
            actual = mem_guest.qmp.execute("query-balloon")["actual"]
            if (before - after >= 64 * 1024 and actual <= target + (8 << 20)) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert before - after >= 64 * 1024, (before, after, actual)
        assert actual <= target + (8 << 20), (before, after, actual)
