"""Output commit on real QEMU (TCG) with the Linux guest sending numbered UDP and a TCP stream.

One guest for the module, in network namespace ``outputcommit`` on a tap, sending ~500
numbered datagrams/s and its TCP counter stream to an observer in that namespace. Each
test drives :class:`OutputCommit` as the epoch engine would (stop, boundary, cont, "ship",
ack, release) and checks what reached the observer.

Ground truth for "which epoch sent this packet": while a test runs, a second
``filter-dump`` (``maxlen=96``) stands at the tail of the netdev's filter list, where the
guest's outgoing packets enter before any buffer. At every boundary, with the VM stopped,
the dump file's size marks the end of the closed epoch, so every UDP sequence number in
the dump maps to the epoch that sent it. A packet of epoch N must not reach the observer
before the release of epoch N began.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cuju_libvirt.errors import StateError
from cuju_libvirt.ft_engine.output import (
    QUEUE_LIMIT,
    Order,
    OutputCommit,
    OutputCommitError,
    discover_netdevs,
)
from cuju_libvirt.qmp import QMPClient
from cuju_libvirt.rig.guest_net import GuestNetwork
from cuju_libvirt.rig.linux_guest import build_linux_guest, kernel_cmdline
from cuju_libvirt.rig.observer import Observer, Recording, Rules, datagrams_in_dump, judge_run
from cuju_libvirt.rig.qemu_direct import DirectGuest

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, tap devices)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 not installed"),
]

NETNS = "outputcommit"
TAP = "outputcommit"
NETDEV = "hostnet0"  # libvirt's name for the first interface's netdev
PPS = 500
BOOT_TIMEOUT = 90.0


@dataclass
class Guest:
    vm: DirectGuest
    net: GuestNetwork
    observer: Observer
    shm: Path


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    linux = build_linux_guest()
    shm = Path(tempfile.mkdtemp(prefix="outputcommit.", dir="/dev/shm"))
    try:
        with (
            GuestNetwork(NETNS, subnet=93, tap=TAP) as net,
            Observer((net.host_ip, 0), (net.host_ip, 0), netns=net.name) as obs,
        ):
            append = kernel_cmdline(
                "udp",
                ip=f"{net.guest_ip}/{net.prefix}",
                mac=net.mac,
                peer="{}:{}".format(*obs.udp_address),
                tcp="{}:{}".format(*obs.tcp_address),
                pps=PPS,
            )
            vm = DirectGuest(
                name="outputcommit",
                memory_mib=256,
                kernel=linux.kernel,
                initrd=linux.initrd,
                append=append,
                extra_args=net.qemu_args(NETDEV),
            )
            try:
                with net.entered():
                    vm.start()
                vm.wait_serial(r"cuju-init: ready", timeout=BOOT_TIMEOUT)
                obs.wait_for(lambda r: len(r.udp) >= 50 and len(r.tcp_data) >= 800, 60.0)
                yield Guest(vm, net, obs, shm)
            finally:
                vm.close()
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def our_objects(qmp: QMPClient) -> list[str]:
    return [o["name"] for o in qmp.execute("qom-list", {"path": "/objects"}) if o["name"].startswith("cuju-")]


def tap_packets(net: GuestNetwork, tap: str) -> int:
    """Packets QEMU wrote into ``tap`` (the host side's rx counter)."""
    argv = ["ip", "-n", net.name, "-j", "-s", "link", "show", "dev", tap]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def stopped_tap_count(guest: Guest) -> int:
    """The tap's packet count, read while the VM is stopped (and resumed afterwards)."""
    guest.vm.stop()
    try:
        time.sleep(0.1)
        return tap_packets(guest.net, guest.net.tap)
    finally:
        guest.vm.cont()


class SentLog:
    """A ``filter-dump`` at the tail of the netdev's filters: every packet the guest sends,
    before any buffer, with the dump's size at each boundary marking the epochs."""

    def __init__(self, qmp: QMPClient, path: Path) -> None:
        self.qmp = qmp
        self.path = path
        self.id = "outputcommit-sentlog"
        qmp.execute(
            "object-add",
            {"qom-type": "filter-dump", "id": self.id, "netdev": NETDEV, "queue": "rx",
             "file": str(path), "maxlen": 96},
        )  # fmt: skip

    def size(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        self.qmp.execute("object-del", {"id": self.id})

    def udp_by_offset(self) -> list[tuple[int, int]]:
        """(sequence number, end offset of its record) of every guest datagram in the dump."""
        return datagrams_in_dump(self.path.read_bytes())


@dataclass
class Run:
    """What the driver loop did: per epoch the dump size at its end and its release time."""

    boundary_sizes: list[int] = field(default_factory=list)
    release_starts: list[float] = field(default_factory=list)
    boundary_ms: list[float] = field(default_factory=list)
    release_ms: list[float] = field(default_factory=list)
    final_release: float = 0.0

    def merge(self, other: Run) -> None:
        self.boundary_sizes += other.boundary_sizes
        self.release_starts += other.release_starts
        self.boundary_ms += other.boundary_ms
        self.release_ms += other.release_ms


def drive(guest: Guest, oc: OutputCommit, sent: SentLog, *, epochs: int, epoch_s: float, ack_s: float) -> Run:
    """Mimic the engine: stop, boundary, cont, ship (``ack_s``), release, run on."""
    vm = guest.vm
    run = Run()
    for _ in range(epochs):
        time.sleep(max(epoch_s - ack_s, 0.0))
        vm.stop()
        run.boundary_sizes.append(sent.size())
        epoch = oc.boundary()
        run.boundary_ms.append(oc.stats.last_boundary_ms)
        vm.cont()
        time.sleep(ack_s)  # the backup receives epoch N and acknowledges it
        run.release_starts.append(time.monotonic())
        assert oc.release(epoch) == epoch
        run.release_ms.append(oc.stats.last_release_ms)
    return run


def early_packets(run: Run, sent: SentLog, rec: Recording) -> list[str]:
    """Every datagram that reached the observer before its epoch's release began."""
    epoch_of: dict[int, int] = {}
    for seq, end in sent.udp_by_offset():
        epoch = next((k for k, size in enumerate(run.boundary_sizes) if end <= size), len(run.boundary_sizes))
        epoch_of[seq] = epoch
    assert len(epoch_of) > 100, "the sent log saw almost nothing: the check would be vacuous"
    early = []
    for seq, arrival in rec.udp:
        sent_in = epoch_of.get(seq)
        if sent_in is None:
            continue  # sent before the test's dump was in place
        allowed = run.release_starts[sent_in] if sent_in < len(run.release_starts) else run.final_release
        if arrival < allowed:
            early.append(f"UDP {seq} of epoch {sent_in} arrived {1e3 * (allowed - arrival):.1f} ms early")
    return early


@contextlib.contextmanager
def sent_log(guest: Guest) -> Iterator[SentLog]:
    """A :class:`SentLog`; add it after the output-commit filters, so it stands at the tail."""
    log = SentLog(guest.vm.qmp, guest.shm / "sent.pcap")
    try:
        yield log
    finally:
        log.close()
        log.path.unlink()


def wait_quiet_then_judge(guest: Guest) -> Recording:
    """Let released packets land, then judge the whole recording (no loss, repeat, reorder)."""
    time.sleep(0.3)
    rec = guest.observer.recording()
    verdict = judge_run(rec, Rules())
    assert verdict.ok, verdict.problems
    return rec


@pytest.mark.timeout(120)
def test_discovery_finds_the_nics_netdev(guest: Guest) -> None:
    assert discover_netdevs(guest.vm.qmp) == [NETDEV]


@pytest.mark.timeout(120)
def test_no_packet_leaves_before_its_epoch_is_acknowledged(guest: Guest) -> None:
    """The engine's loop for ~6 s at ~500 UDP/s plus TCP: none early, lost, repeated or reordered."""
    before = guest.observer.recording()
    stack = contextlib.ExitStack()
    oc = OutputCommit(guest.vm.qmp, tag="loop", counter_dir=guest.shm)
    oc.install([NETDEV])
    try:
        sent = stack.enter_context(sent_log(guest))
        run = drive(guest, oc, sent, epochs=30, epoch_s=0.1, ack_s=0.04)
        # Counter check: with the VM stopped every released packet is out (the running
        # epoch stays in F1), so the tap's counter must grow exactly by the released packets.
        tap_1, released_1 = stopped_tap_count(guest), oc.stats.packets_released
        run2 = drive(guest, oc, sent, epochs=30, epoch_s=0.1, ack_s=0.04)
        tap_2, released_2 = stopped_tap_count(guest), oc.stats.packets_released
        run.merge(run2)
        run.final_release = time.monotonic()
        oc.remove()
        rec = wait_quiet_then_judge(guest)
        early = early_packets(run, sent, rec)
    finally:
        oc.remove()
        stack.close()
    assert our_objects(guest.vm.qmp) == []
    assert not early, early[:10]
    new = [seq for seq, t in rec.udp if t > before.udp[-1][1]] if before.udp else []
    assert len(new) >= 1500, len(new)  # thousands of packets crossed the filters
    assert len(rec.tcp_data) > len(before.tcp_data) + 8 * 1000
    stats = oc.stats
    assert stats.boundaries == stats.releases == 60
    assert stats.packets_closed == stats.packets_released and stats.packets_closed is not None
    assert stats.packets_closed > len(new) * 0.8
    assert released_1 is not None and released_2 is not None
    assert tap_2 - tap_1 == released_2 - released_1 > 0
    boundary = sorted(run.boundary_ms)
    release = sorted(run.release_ms)
    print(
        f"toggle costs: boundary median {boundary[len(boundary) // 2]:.2f} ms, "
        f"release median {release[len(release) // 2]:.2f} ms, max packets/epoch {stats.epoch_packets_max}"
    )


@pytest.mark.timeout(120)
def test_the_naive_filter_order_leaks_packets_early(guest: Guest) -> None:
    """F1 then F2 in the list (as object-add appends them): for queue=rx QEMU walks the list
    tail to head, so the guest's packets enter F2 first, move to F1 at the *release* and
    leave at the next *boundary*, before that epoch was acknowledged. The same check that
    passes above catches it."""
    oc = OutputCommit(guest.vm.qmp, tag="naive", order=Order.NAIVE)
    oc.install([NETDEV])
    try:
        with sent_log(guest) as sent:
            run = drive(guest, oc, sent, epochs=10, epoch_s=0.1, ack_s=0.04)
            run.final_release = time.monotonic()
            oc.remove()
            rec = wait_quiet_then_judge(guest)  # early, but none lost, repeated or reordered
            early = early_packets(run, sent, rec)
    finally:
        oc.remove()
    leaky_epochs = {line.split(" of epoch ")[1].split()[0] for line in early}
    assert len(early) > 20 and len(leaky_epochs) >= 3, early[:5]


@pytest.mark.timeout(120)
def test_a_long_hold_lets_nothing_out_and_remove_lets_everything_out(guest: Guest) -> None:
    """Two epochs held (one shipped in F2, one running in F1) for 2 s: nothing arrives;
    remove() releases both in order, nothing lost, and takes the filters and counter away."""
    oc = OutputCommit(guest.vm.qmp, tag="hold", counter_dir=guest.shm)
    oc.install([NETDEV])
    try:
        time.sleep(0.05)
        start = guest.observer.recording()
        time.sleep(1.0)
        guest.vm.stop()
        assert oc.boundary() == 0
        guest.vm.cont()
        time.sleep(1.0)
        held = guest.observer.recording()
        assert oc.held_epoch == 0
        assert (oc.pending_packets() or 0) > PPS * 0.5
        released_at = time.monotonic()
        oc.remove()
    finally:
        oc.remove()
    assert len(held.udp) == len(start.udp)  # nothing left during the hold
    assert len(held.tcp_data) == len(start.tcp_data)
    rec = guest.observer.wait_for(lambda r: len(r.udp) >= len(start.udp) + PPS * 1.5, 10.0)
    assert len(rec.udp) >= len(start.udp) + PPS * 1.5  # two seconds' worth came out at once
    assert rec.udp[len(start.udp)][1] >= released_at - 0.01
    wait_quiet_then_judge(guest)
    assert our_objects(guest.vm.qmp) == []
    assert not list(guest.shm.glob("cuju-hold-*"))
    assert not oc.installed


@pytest.mark.timeout(120)
def test_a_release_while_stopped_goes_out_at_cont(guest: Guest) -> None:
    oc = OutputCommit(guest.vm.qmp, tag="stopped")
    oc.install([NETDEV])
    try:
        time.sleep(0.5)
        guest.vm.stop()
        oc.release(oc.boundary())
        time.sleep(0.5)
        stopped = guest.observer.recording()
        resumed_at = time.monotonic()
        guest.vm.cont()
        after = guest.observer.wait_for(lambda r: len(r.udp) > len(stopped.udp) + PPS * 0.3, 5.0)
    finally:
        oc.remove()
    assert len(after.udp) > len(stopped.udp) + PPS * 0.3
    assert all(t < resumed_at for _, t in stopped.udp)
    wait_quiet_then_judge(guest)


@pytest.mark.timeout(120)
def test_release_all_stops_holding_and_resume_holding_holds_again(guest: Guest) -> None:
    oc = OutputCommit(guest.vm.qmp, tag="pause")
    oc.install([NETDEV])
    try:
        time.sleep(0.3)
        oc.release_all()
        start = guest.observer.recording()
        time.sleep(0.5)
        passing = guest.observer.recording()
        oc.resume_holding()
        time.sleep(0.1)
        held_from = guest.observer.recording()
        time.sleep(0.5)
        held = guest.observer.recording()
    finally:
        oc.remove()
    assert len(passing.udp) - len(start.udp) > PPS * 0.3  # unfiltered: straight through
    assert len(held.udp) == len(held_from.udp)  # holding again
    wait_quiet_then_judge(guest)


@pytest.mark.timeout(60)
def test_install_is_all_or_nothing(guest: Guest) -> None:
    oc = OutputCommit(guest.vm.qmp, tag="bad", counter_dir=guest.shm)
    with pytest.raises(OutputCommitError, match="netdev nosuch") as info:
        oc.install([NETDEV, "nosuch"])
    assert info.value.netdev == "nosuch" and info.value.qemu_message
    assert our_objects(guest.vm.qmp) == []
    assert not list(guest.shm.glob("cuju-bad-*"))
    assert not oc.installed
    with pytest.raises(OutputCommitError, match="twice"):
        oc.install([NETDEV, NETDEV])
    wait_quiet_then_judge(guest)


@pytest.mark.timeout(60)
def test_calls_out_of_order_are_refused_and_change_nothing(guest: Guest) -> None:
    oc = OutputCommit(guest.vm.qmp, tag="order")
    with pytest.raises(StateError, match="not installed"):
        oc.boundary()
    oc.install([NETDEV])
    try:
        with pytest.raises(StateError, match="already installed"):
            oc.install([NETDEV])
        with pytest.raises(StateError, match="nothing to release"):
            oc.release()
        guest.vm.stop()
        try:
            assert oc.boundary() == 0
            with pytest.raises(StateError, match="epoch 0 is still held"):
                oc.boundary()
            with pytest.raises(StateError, match="epoch 5"):
                oc.release(5)
            assert oc.release(0) == 0 and oc.boundary() == 1
        finally:
            guest.vm.cont()
        assert oc.stats.boundaries == 2 and oc.stats.releases == 1
        assert oc.pending_packets() is None
    finally:
        oc.remove()
    oc.remove()  # idempotent
    wait_quiet_then_judge(guest)


FAST_TAP = "outputcommit1"  # a second tap in the namespace, 198.18.95.0/24


@contextlib.contextmanager
def second_tap(net: GuestNetwork) -> Iterator[str]:
    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", net.name, *args], check=True, capture_output=True)

    ip("tuntap", "add", "dev", FAST_TAP, "mode", "tap")
    try:
        ip("addr", "add", "198.18.95.1/24", "dev", FAST_TAP)
        ip("link", "set", FAST_TAP, "up")
        yield FAST_TAP
    finally:
        subprocess.run(["ip", "-n", net.name, "link", "del", FAST_TAP], check=False, capture_output=True)


@pytest.mark.timeout(180)
def test_a_buffer_drops_beyond_the_cap_and_the_counter_sees_it_coming(guest: Guest) -> None:
    """QEMU's filter-buffer keeps QUEUE_LIMIT packets and silently drops the rest: hold one
    epoch past the cap (a second guest sending as fast as TCG lets it, ~1,800/s here),
    release it: the tap gets exactly QUEUE_LIMIT packets while the counter counted more.
    This is why the engine must end epochs by packet count; pending_packets() tells it when."""
    linux = build_linux_guest()
    with (
        second_tap(guest.net) as tap,
        Observer(("198.18.95.1", 0), None, netns=guest.net.name) as fast_obs,
    ):
        vm = DirectGuest(
            name="outputcommit-fast",
            memory_mib=256,
            kernel=linux.kernel,
            initrd=linux.initrd,
            append=kernel_cmdline(
                "udp", ip="198.18.95.2/24", mac="52:54:00:c5:00:03",
                peer="{}:{}".format(*fast_obs.udp_address), pps=20000,
            ),
            extra_args=[
                "-netdev", f"tap,id=fastnet0,ifname={tap},script=no,downscript=no",
                "-device", "virtio-net-pci,netdev=fastnet0,mac=52:54:00:c5:00:03",
            ],
        )  # fmt: skip
        try:
            with guest.net.entered():
                vm.start()
            vm.wait_serial(r"cuju-init: ready", timeout=BOOT_TIMEOUT)
            fast_obs.wait_for(lambda r: len(r.udp) >= 100, 60.0)
            oc = OutputCommit(vm.qmp, tag="cap", counter_dir=guest.shm)
            oc.install(["fastnet0"])
            try:
                deadline = time.monotonic() + 60
                while (oc.pending_packets() or 0) < QUEUE_LIMIT + 200:
                    assert time.monotonic() < deadline, oc.pending_packets()
                    time.sleep(0.05)
                vm.stop()
                tap_before = tap_packets(guest.net, tap)
                oc.release(oc.boundary())
                counted = oc.stats.packets_closed
                vm.cont()
                time.sleep(0.3)
                vm.stop()  # the released epoch is out; the running one stays in F1
                delivered = tap_packets(guest.net, tap) - tap_before
                vm.cont()
            finally:
                oc.remove()
        finally:
            vm.close()
    assert counted is not None and counted > QUEUE_LIMIT + 100
    assert delivered == QUEUE_LIMIT
