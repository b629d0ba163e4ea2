"""A protected VM with a writable, served disk fails over on the two-host rig (issue 8 item 3).

The Linux guest (mode ``fsrec``, :mod:`cuju_libvirt.rig.disk_records`) appends fsync'd
records to a file on ext4 on its virtio disk, which ``xml enable --prepare`` serves through
the journaling block server; cujud on host b keeps and serves the replica. SIGKILL of the
primary's QEMU at a random moment; after the failover the guest checks from inside that
the disk holds what its RAM says it wrote (records and checksummed O_DIRECT blocks: disk
and memory of the same epoch), then shuts down cleanly; the replica on host b is
``e2fsck -fn`` clean and holds every record the observer saw, as a clean prefix.
Default suite: a few runs; ``CUJU_SLOW=1`` adds the 20-run soak.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt.rig.cujud import Cujud, protected_linux_xml
from cuju_libvirt.rig.disk_records import PARAMS, DiskVerdict, command, judge_image, make_ext4_image
from cuju_libvirt.rig.hosts import OBSERVER_ADDRESS, Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest, build_linux_guest
from cuju_libvirt.rig.observer import Observer
from tests.e2e.conftest import cleanup_protected

MAC = "52:54:00:19:08:00"


@pytest.fixture(scope="module")
def linux_guest() -> LinuxGuest:
    return build_linux_guest()


@pytest.fixture
def observer(ft_rig: Rig) -> Iterator[Observer]:
    with Observer((OBSERVER_ADDRESS, 0), (OBSERVER_ADDRESS, 0), netns=ft_rig.lan.netns_path) as obs:
        yield obs


def seen_records(observer: Observer) -> set[int]:
    """The record numbers the observer has seen (each sent only after its fsync returned)."""
    return {seq for seq, _ in observer.recording().udp}


def run_once(rig: Rig, guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud],
             name: str) -> tuple[DiskVerdict, dict[str, str], float]:
    """One protected run with a SIGKILL of the primary's QEMU; the verdict on host b's replica,
    the guest's own verify answer, and the failover time (kill to the first record from b)."""
    ca, cb = cujuds
    image = make_ext4_image(rig.root / "images" / f"{name}-data.img")
    xml = protected_linux_xml(rig, guest, name, observer, mac=MAC, pps=1, mode="fsrec", data_disk=image,
                              params=PARAMS, extra=("--serve-disks",))
    rig.a.virsh("define", str(xml))
    rig.a.virsh("start", name)
    ca.wait_domain(name, "protected", timeout=180)
    cb.wait_domain(name, "standby", timeout=60)
    observer.wait_for(lambda r: len(r.udp) >= 100, timeout=90)
    time.sleep(random.uniform(0.5, 3.0))  # a random moment of FT mode
    pid = rig.a.qemu_pid(name)
    assert pid is not None
    before = max(seen_records(observer))
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    cb.wait_failed_over(name, timeout=60)
    rec = observer.wait_for(lambda r: sum(1 for _, t in r.udp if t > killed_at) >= 100, timeout=90)
    first_after = min(t for _, t in rec.udp if t > killed_at)
    answer = command(rig, "verify")
    seen = seen_records(observer)
    assert max(seen) > before, "no record came from host b after the failover"
    halted = command(rig, "halt")
    assert halted["what"] == "halted" and halted["umount"] == "0", halted
    wait_halted(rig, name)
    uuid = rig.b.virsh("domuuid", name).strip()
    replica = rig.b.outside(f"/var/lib/cuju-libvirt/replicas/{uuid}/vda.raw")
    return judge_image(replica, seen), answer, (first_after - killed_at) * 1e3


def wait_halted(rig: Rig, name: str, timeout: float = 60.0) -> None:
    """Until the guest on host b halted (the rig's guests have no ACPI: the kernel halts
    instead of powering off), then destroy it: its file system was unmounted already."""
    serial = rig.b.outside(f"/var/log/libvirt/qemu/{name}-serial.log")
    deadline = time.monotonic() + timeout
    while "System halted" not in serial.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"the guest did not halt on host b (see {serial})"
        time.sleep(0.2)
    rig.b.virsh("destroy", name)


def _judge(verdict: DiskVerdict, answer: dict[str, str]) -> None:
    assert answer["what"] == "verify", answer
    assert answer["bad_blocks"] == "0" and answer["bad_records"] == "0", answer  # memory and disk agree
    assert answer["on_disk"] == answer["records"], answer
    assert verdict.fsck_clean, verdict.fsck_output
    assert verdict.clean_prefix and verdict.records_lost == 0, verdict
    assert verdict.records_on_disk == int(answer["records"]), (verdict, answer)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("run", range(2))
def test_sigkill_with_a_served_disk_keeps_every_fsynced_record_and_a_clean_file_system(
    ft_rig: Rig, linux_guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud], run: int
) -> None:
    name = f"disk-kill{run}"
    try:
        verdict, answer, failover_ms = run_once(ft_rig, linux_guest, observer, cujuds, name)
        _judge(verdict, answer)
        print(f"run {run}: {verdict.records_on_disk} records on host b's replica, fsck clean, "
              f"failover {failover_ms:.0f} ms")
    finally:
        cleanup_protected(ft_rig, name)
        Path(ft_rig.root / "images" / f"{name}-data.img").unlink(missing_ok=True)
