"""The fsync'd-records guest on a served disk, and how its run is judged (issue 8 item 3).

The Linux test guest in mode ``fsrec`` (``guest_src/agent.c``) mounts an ext4 disk, appends
numbered records to ``/records`` with ``fsync`` and reports each record's number to the
observer only after its ``fsync`` returned; with each record it overwrites one block of
``/blocks`` with O_DIRECT and keeps that block's checksum in RAM. After a failover:

* ``verify`` (a UDP command to the guest) reads both files back from the disk with O_DIRECT:
  the records are the guest's own, the blocks match the checksums in the guest's RAM, so
  the disk and the memory the VM resumed from belong to the same epoch;
* ``halt`` unmounts and powers the guest off; then the image is checked from outside:
  ``e2fsck -fn`` is clean, and ``/records`` (read with ``debugfs``) is a clean prefix
  0, 1, ..., K-1 holding every number the observer saw.

Used by ``tests/e2e/test_disk_failover.py`` and the ``disk_failover`` benchmark.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cuju_libvirt.errors import RigError
from cuju_libvirt.rig.cujud import Cujud, protected_linux_xml
from cuju_libvirt.rig.guest_net import socket_in
from cuju_libvirt.rig.hosts import FIRST_GUEST_ADDRESS, OBSERVER_ADDRESS, Rig
from cuju_libvirt.rig.linux_guest import LinuxGuest
from cuju_libvirt.rig.observer import Observer, resume_arrival
from cuju_libvirt.rig.sandbox import tool

#: The guest's command port (``cuju.port`` of mode fsrec).
COMMAND_PORT = 7001
RECORD_LEN = 64
#: What the guest's agent is told: a record every 5 ms, 64 checksummed blocks.
PARAMS = {"rec_ms": "5", "blocks": "64", "port": str(COMMAND_PORT)}


def make_ext4_image(path: Path, size_mib: int = 64) -> Path:
    """A sparse raw image of ``size_mib`` with an empty ext4 file system on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run([tool("mkfs.ext4"), "-F", "-q", str(path)], check=True, capture_output=True, timeout=60)
    return path


def record(n: int) -> bytes:
    """Record ``n`` as the guest writes it."""
    text = f"rec {n:012d} {_mix64(n):016x}".encode()
    return text + b" " * (RECORD_LEN - 1 - len(text)) + b"\n"


def _mix64(x: int) -> int:
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def command(rig: Rig, word: str, timeout: float = 30.0) -> dict[str, str]:
    """Send ``word`` to the guest's agent from the LAN namespace; its one-line answer as KEY=VALUE."""
    sock = socket_in(rig.lan.netns_path, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        sock.bind((OBSERVER_ADDRESS, 0))
        sock.settimeout(1.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.sendto(word.encode(), (FIRST_GUEST_ADDRESS, COMMAND_PORT))
            try:
                answer = sock.recv(512).decode(errors="replace")
            except TimeoutError:
                continue  # held by the output commit, or lost: ask again (both commands are idempotent)
            words = answer.split()
            if not words or words[0] != "cuju-fsrec:":
                raise RigError(f"the guest answered {answer!r} to {word!r}")
            return {"what": words[1], **dict(w.split("=", 1) for w in words[2:] if "=" in w)}
        raise RigError(f"the guest did not answer {word!r} within {timeout:.0f} s")
    finally:
        sock.close()


@dataclass(frozen=True)
class DiskVerdict:
    """The image checked from outside after a clean guest shutdown."""

    fsck_clean: bool
    fsck_output: str
    records_on_disk: int
    clean_prefix: bool  # every record on disk is record 0, 1, ... in order, nothing torn
    records_lost: int  # numbers the observer saw that the disk lacks

    @property
    def ok(self) -> bool:
        return self.fsck_clean and self.clean_prefix and self.records_lost == 0


def judge_image(image: Path, seen: set[int], fmt: str = "raw") -> DiskVerdict:
    """``e2fsck -fn`` of ``image`` and its ``/records`` against the numbers the observer saw.
    A qcow2 image must first pass ``qemu-img check``; its guest-visible bytes are judged."""
    if fmt != "raw":
        check = subprocess.run([tool("qemu-img"), "check", "-f", fmt, str(image)], capture_output=True,
                               text=True, timeout=120, check=False)
        if check.returncode != 0:
            return DiskVerdict(fsck_clean=False, fsck_output=f"qemu-img check: {check.stdout}{check.stderr}",
                               records_on_disk=0, clean_prefix=False, records_lost=len(seen))
        with tempfile.TemporaryDirectory(prefix="cuju-judge.") as tmp:
            raw = Path(tmp) / "disk.raw"
            subprocess.run([tool("qemu-img"), "convert", "-f", fmt, "-O", "raw", str(image), str(raw)],
                           check=True, capture_output=True, timeout=300)
            return judge_image(raw, seen)
    fsck = subprocess.run([tool("e2fsck"), "-fn", str(image)], capture_output=True, text=True, timeout=120,
                          check=False)
    with tempfile.TemporaryDirectory(prefix="cuju-records.") as tmp:
        out = Path(tmp) / "records"
        subprocess.run([tool("debugfs"), "-R", f"dump /records {out}", str(image)], capture_output=True,
                       timeout=60, check=False)
        data = out.read_bytes() if out.exists() else b""
    whole = len(data) // RECORD_LEN
    prefix = len(data) % RECORD_LEN == 0 and all(
        data[i * RECORD_LEN:(i + 1) * RECORD_LEN] == record(i) for i in range(whole))
    lost = sum(1 for n in seen if n >= whole) if prefix else len(seen)
    return DiskVerdict(fsck_clean=fsck.returncode == 0, fsck_output=(fsck.stdout + fsck.stderr)[-2000:],
                       records_on_disk=whole, clean_prefix=prefix, records_lost=lost)


@dataclass(frozen=True)
class DiskRun:
    """One judged run: the image verdict, the guest's own ``verify`` answer, the failover time."""

    verdict: DiskVerdict
    answer: dict[str, str]
    failover_ms: float

    @property
    def memory_and_disk_agree(self) -> bool:
        a = self.answer
        return (a.get("what") == "verify" and a.get("bad_blocks") == "0" and a.get("bad_records") == "0"
                and a.get("on_disk") == a.get("records"))

    @property
    def ok(self) -> bool:
        return (self.verdict.ok and self.memory_and_disk_agree
                and self.verdict.records_on_disk == int(self.answer.get("records", -1)))


def data_image(rig: Rig, name: str) -> Path:
    """Where the run ``name`` keeps its disk image (on the rig's tmpfs, seen by both hosts)."""
    return rig.root / "images" / f"{name}-data.img"


def run_with_sigkill(rig: Rig, guest: LinuxGuest, observer: Observer, cujuds: tuple[Cujud, Cujud], name: str,
                     *, mac: str, rng: random.Random | None = None,
                     before_kill: Callable[[], None] | None = None,
                     fail: Callable[[], None] | None = None, disk_format: str = "raw") -> DiskRun:
    """Define and start ``name`` (the fsrec guest on a fresh ext4 disk, every disk served) on
    host a, SIGKILL its QEMU at a random moment of FT mode, verify from inside the guest on
    host b, halt it there and judge host b's replica. ``before_kill`` runs once the VM is
    protected and writing (e.g. a backup loss and the re-protection after it); ``fail``
    replaces the SIGKILL (e.g. a crash of host a). ``disk_format`` qcow2: the ext4 image is
    converted to qcow2 first (the replica is then a copy of the qcow2 file)."""
    ca, cb = cujuds
    rng = rng or random.Random()
    image = make_ext4_image(data_image(rig, name))
    if disk_format != "raw":
        converted = image.with_suffix("." + disk_format)
        subprocess.run([tool("qemu-img"), "convert", "-f", "raw", "-O", disk_format, str(image),
                        str(converted)], check=True, capture_output=True, timeout=120)
        os.replace(converted, image)
    xml = protected_linux_xml(rig, guest, name, observer, mac=mac, pps=1, mode="fsrec", data_disk=image,
                              params=PARAMS, data_disk_format=disk_format)
    rig.a.virsh("define", str(xml))
    rig.a.virsh("start", name)
    ca.wait_domain(name, "protected", timeout=180)
    cb.wait_domain(name, "standby", timeout=60)
    observer.wait_for(lambda r: len(r.udp) >= 100, timeout=90)
    if before_kill is not None:
        before_kill()
    time.sleep(rng.uniform(0.5, 3.0))  # a random moment of FT mode
    pid = rig.a.qemu_pid(name)
    if pid is None:
        raise RigError(f"{name}: the primary QEMU is gone before the kill")
    killed_at = time.monotonic()
    if fail is None:
        os.kill(pid, signal.SIGKILL)
    else:
        fail()
    cb.wait_failed_over(name, timeout=60)
    rec = observer.wait_for(lambda r: sum(1 for _, t in r.udp if t > killed_at) >= 100, timeout=90)
    # measured as failover_product measures it: the record that ends the failover's silence
    first_after = resume_arrival(rec.udp, killed_at) or killed_at
    answer = command(rig, "verify")
    seen = {seq for seq, _ in observer.recording().udp}
    halted = command(rig, "halt")
    if halted["what"] != "halted" or halted.get("umount") != "0":
        raise RigError(f"{name}: the guest could not unmount its file system: {halted}")
    _wait_halted(rig, name)
    uuid = rig.b.virsh("domuuid", name).strip()
    replica = rig.b.outside(f"/var/lib/cuju-libvirt/replicas/{uuid}/vda.{disk_format}")
    return DiskRun(judge_image(replica, seen, disk_format), answer, (first_after - killed_at) * 1e3)


def _wait_halted(rig: Rig, name: str, timeout: float = 60.0) -> None:
    """Until the guest on host b halted (the rig's guests have no ACPI: the kernel halts
    instead of powering off), then destroy it: its file system was unmounted already."""
    serial = rig.b.outside(f"/var/log/libvirt/qemu/{name}-serial.log")
    deadline = time.monotonic() + timeout
    while "System halted" not in serial.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RigError(f"{name}: the guest did not halt on host b (see {serial})")
        time.sleep(0.2)
    rig.b.virsh("destroy", name)
