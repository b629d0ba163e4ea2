"""Each tracker on a real QEMU TCG guest against a brute-force diff of the RAM file.

Per epoch: stop (QMP) -> harvest -> diff of the RAM file against the previous epoch's
copy -> every changed page must be in the harvest (one miss fails) -> cont. Runs under
libvirt's default QEMU seccomp sandbox and with QEMU running as ``libvirt-qemu``, the way
libvirt starts it. The Linux-guest cases (boot, memory stress, balloon, disk reads) run
once ``cuju_libvirt.rig.linux_guest`` exists and skip with the reason until then.
"""

from __future__ import annotations

import importlib
import logging
import pwd
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from cuju_libvirt.ft_engine import trackers as T
from cuju_libvirt.rig.guests import WriterConfig, boot_image, read_counter
from cuju_libvirt.rig.qemu_direct import DirectGuest
from cuju_libvirt.rig.tracker_truth import TruthReport, run_ground_truth
from tests.helpers import proc_status_field

#: libvirt 9.0's default for QEMU (qemu.conf seccomp_sandbox = 1).
LIBVIRT_SANDBOX = ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
QEMU_USER = "libvirt-qemu"
EPOCHS = 200
SLOW_EPOCHS = 2000

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 not installed (Debian: qemu-system-x86)")

Maker = Callable[[T.VmStopped], T.Tracker]


@pytest.fixture(scope="module")
def qemu_as_libvirt_qemu() -> Iterator[str]:
    """A QEMU 'binary' that runs the real one as libvirt-qemu, as libvirt does."""
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        pytest.skip(f"user {QEMU_USER} does not exist (install libvirt-daemon-system)")
    d = Path(tempfile.mkdtemp(prefix="trackers-wrap-"))
    wrapper = d / "qemu-as-libvirt-qemu"
    wrapper.write_text(
        "#!/bin/sh\n"
        "# hand the guest's private directory to libvirt-qemu, then drop to it\n"
        'for a in "$@"; do case "$a" in *mem-path=*) p=${a#*mem-path=}; p=${p%%,*}; '
        f'chown {QEMU_USER} "$(dirname "$p")";; esac; done\n'
        f"exec setpriv --reuid={QEMU_USER} --regid={QEMU_USER} --clear-groups --pdeathsig KILL "
        'qemu-system-x86_64 "$@"\n'
    )
    wrapper.chmod(0o755)
    try:
        yield str(wrapper)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _uffd(guest: DirectGuest, mode: T.UffdMode = "async") -> Maker:
    return lambda vm_stopped: T.UffdTracker.attach(guest.pid, guest.ram_path, vm_stopped, mode=mode)


def _scan(guest: DirectGuest) -> Maker:
    return lambda vm_stopped: T.ScanTracker.open(guest.ram_path, vm_stopped, nthreads=2)


def _check(report: TruthReport, min_changed: int) -> None:
    print(report.summary())
    assert report.missed_pages == 0, f"{report.summary()}; first misses (epoch, page): {report.first_misses}"
    assert report.full_resyncs == 0, report.summary()
    assert report.changed_pages >= min_changed, f"the guest hardly wrote: {report.summary()}"


# -- boot-sector guests -----------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_uffd_writer_guest_sandboxed_as_libvirt_qemu(qemu_as_libvirt_qemu: str) -> None:
    cfg = WriterConfig()
    with DirectGuest(name="trackers-uffd-sb", memory_mib=cfg.min_memory_mib + 1, disk=boot_image(cfg),
                     extra_args=LIBVIRT_SANDBOX, qemu=qemu_as_libvirt_qemu) as g:
        g.wait_serial(r"cuju-boot writer\r\n\d+\r\n")
        assert proc_status_field(g.pid, "Uid", 1) == pwd.getpwnam(QEMU_USER).pw_uid
        report = run_ground_truth(g, _uffd(g), EPOCHS, run_s=0.01)
        _check(report, min_changed=EPOCHS * 50)
        assert proc_status_field(g.pid, "TracerPid") == 0
        assert g.status() == "running"
        g.wait_serial(r"cuju-boot writer\r\n\d+\r\n")  # still alive and counting


@pytest.mark.timeout(150)
def test_uffd_sync_writer_guest_sandboxed() -> None:
    """Sync mode (root QEMU, libvirt's sandbox): the vCPU thread waits on each first write."""
    cfg = WriterConfig()
    with DirectGuest(name="trackers-uffd-sync", memory_mib=cfg.min_memory_mib + 1, disk=boot_image(cfg),
                     extra_args=LIBVIRT_SANDBOX) as g:
        g.wait_serial(r"cuju-boot writer\r\n\d+\r\n")
        report = run_ground_truth(g, _uffd(g, "sync"), EPOCHS, run_s=0.02, differ="c")
        # Each first write waits for our fault thread (10-40 us here): the guest writes slower.
        _check(report, min_changed=EPOCHS * 20)
        assert g.status() == "running"
        g.wait_serial(r"cuju-boot writer\r\n\d+\r\n")  # still alive and counting


@pytest.mark.timeout(150)
def test_scan_writer_guest() -> None:
    cfg = WriterConfig()
    with DirectGuest(name="trackers-scan", memory_mib=cfg.min_memory_mib + 1, disk=boot_image(cfg),
                     extra_args=LIBVIRT_SANDBOX) as g:
        g.wait_serial(r"cuju-boot writer\r\n\d+\r\n")
        report = run_ground_truth(g, _scan(g), EPOCHS, run_s=0.01)
        _check(report, min_changed=EPOCHS * 50)
        assert report.false_positives == 0


@pytest.mark.timeout(120)
def test_uffd_counter_guest_attached_while_running_as_root() -> None:
    """Attach while the VM runs (FT switched on for a running VM), arm once it is stopped."""
    with DirectGuest(name="trackers-uffd-ctr", memory_mib=16, disk=boot_image()) as g:
        g.wait_serial(r"cuju-boot counter\r\n\d+\r\n")
        guard: dict[str, T.VmStopped] = {"f": lambda: False}
        tracker = T.UffdTracker.attach(g.pid, g.ram_path, lambda: guard["f"]())  # noqa: PLW0108 - late binding
        assert proc_status_field(g.pid, "TracerPid") == 0

        def adopt(vm_stopped: T.VmStopped) -> T.Tracker:
            guard["f"] = vm_stopped  # from now on the harness says when the VM is stopped
            return tracker

        before = read_counter(g.ram_path)
        report = run_ground_truth(g, adopt, EPOCHS, run_s=0.005)
        _check(report, min_changed=EPOCHS)  # counter + stack page change every epoch
        assert read_counter(g.ram_path) > before


@pytest.mark.timeout(60)
def test_harness_catches_a_lossy_tracker() -> None:
    """The ground truth can fail: a tracker that forgets one page per epoch is caught."""

    class Lossy:
        def __init__(self, inner: T.Tracker) -> None:
            self.inner = inner
            self.name = "lossy"

        def __getattr__(self, item: str) -> Any:
            return getattr(self.inner, item)

        def harvest(self, out: Any) -> T.Harvest:
            h = self.inner.harvest(out)
            return T.Harvest(max(h.count - 1, 0), h.full_resync)

    with DirectGuest(name="trackers-lossy", memory_mib=16, disk=boot_image()) as g:
        g.wait_serial(r"cuju-boot counter\r\n\d+\r\n")
        report = run_ground_truth(g, lambda vs: Lossy(T.UffdTracker.attach(g.pid, g.ram_path, vs)), 10,
                                  run_s=0.005)
        assert report.missed_pages > 0


@pytest.mark.timeout(60)
def test_select_auto_picks_uffd_on_qemu(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trackers-test")
    with DirectGuest(name="trackers-select", memory_mib=16, disk=boot_image(),
                     extra_args=LIBVIRT_SANDBOX) as g:
        t = T.select_tracker("auto", pid=g.pid, ram_path=g.ram_path, vm_stopped=lambda: True,
                             logger=logging.getLogger("trackers-test"))
        try:
            assert t.name == "uffd"
        finally:
            t.close()
        msgs = [r.getMessage() for r in caplog.records]
        assert msgs == ["dirty tracker: uffd (tracker='auto', async mode: guest RAM below 2048 MiB, the walk "
                        "costs less than faults, self-test passed (5 checks))"], msgs


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("which", ["uffd", "scan"])
def test_long_writer_soak(which: str, qemu_as_libvirt_qemu: str) -> None:
    cfg = WriterConfig(writes=64, run_pages=256)
    with DirectGuest(name=f"trackers-soak-{which}", memory_mib=cfg.min_memory_mib + 1, disk=boot_image(cfg),
                     extra_args=LIBVIRT_SANDBOX, qemu=qemu_as_libvirt_qemu) as g:
        g.wait_serial(r"cuju-boot writer\r\n\d+\r\n")
        maker = _uffd(g) if which == "uffd" else _scan(g)
        differ = "c" if which == "uffd" else "python"
        _check(run_ground_truth(g, maker, SLOW_EPOCHS, run_s=0.003, differ=differ),
               min_changed=SLOW_EPOCHS * 50)


# -- Linux guest cases -------------------------------------------------------------------------


def _linux_guest_module() -> ModuleType:
    try:
        return importlib.import_module("cuju_libvirt.rig.linux_guest")
    except ImportError:
        pytest.skip("the Linux test guest (cuju_libvirt.rig.linux_guest, helper `linuxguest`) is not "
                    "merged yet: Linux boot / stress / balloon / disk-read ground truth cannot run")


def _linux(mode: str, extra: list[str], **params: str | int) -> DirectGuest:
    lg = _linux_guest_module()
    built = lg.build_linux_guest()
    return DirectGuest(name=f"trackers-linux-{mode}", memory_mib=128, kernel=built.kernel,
                       initrd=built.initrd, append=lg.kernel_cmdline(mode, **params),
                       extra_args=LIBVIRT_SANDBOX + extra)


_WORKLOAD_PROOF = {
    "stress": r"cuju-stress: pass=\d+ pages_per_s=",
    "balloon": r"cuju-balloon: memtotal_kb=\d+",
    "diskread": r"cuju-diskread: pass=\d+ direct=",
}


def _run_linux_case(which: str, mode: str, extra: list[str], epochs: int,
                    setup: Callable[[DirectGuest], None] | None = None, **params: str | int) -> None:
    """Boot the Linux guest paused, arm before its first instruction, run the epochs.
    ``which``: ``uffd`` (async mode), ``uffd_sync`` or ``scan``."""
    g = _linux(mode, extra, **params)
    g.paused = True
    with g:
        maker = _scan(g) if which == "scan" else _uffd(g, "sync" if which == "uffd_sync" else "async")
        if setup is not None:
            setup(g)
        # The C differ keeps 200 epochs of 128 MiB affordable; scan needs the Python one.
        report = run_ground_truth(g, maker, epochs, run_s=0.05, differ="python" if which == "scan" else "c")
        _check(report, min_changed=epochs)
        g.wait_serial(r"cuju-init: ready", timeout=60)
        g.wait_serial(_WORKLOAD_PROOF[mode], timeout=60)  # the workload really ran
        errors = [line for line in g.serial_text().splitlines() if f"cuju-{mode}: error=" in line]
        assert not errors, f"the workload failed in the guest: {errors[:3]}"
        g.stop()
        if mode == "balloon":
            actual = int(g.qmp.execute("query-balloon")["actual"])
            assert actual < 128 << 20, f"the balloon did not inflate (actual {actual} bytes)"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("which", ["uffd", "uffd_sync"])
def test_linux_boot_and_stress_uffd(which: str) -> None:
    _run_linux_case(which, "stress", [], EPOCHS, stress_mb=32)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_linux_boot_and_stress_scan() -> None:
    _run_linux_case("scan", "stress", [], EPOCHS, stress_mb=32)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("which", ["uffd", "uffd_sync"])
def test_linux_balloon_uffd(which: str) -> None:
    """Inflating the balloon discards guest pages without writing them (UFFD_EVENT_REMOVE)."""

    def inflate(g: DirectGuest) -> None:
        g.qmp.execute("balloon", {"value": 64 << 20})

    _run_linux_case(which, "balloon", ["-device", "virtio-balloon-pci,id=balloon0"], EPOCHS, setup=inflate,
                    report_ms=200)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("which", ["uffd", "uffd_sync"])
def test_linux_disk_reads_uffd(tmp_path: Path, which: str) -> None:
    """virtio-blk DMA (QEMU's threads writing guest RAM), O_DIRECT and buffered. In sync mode
    the O_DIRECT reads are kernel-mode writes into protected pages: they must wait, not fail."""
    disk = tmp_path / "trackers-disk.img"
    with open(disk, "wb") as f:
        for blk in range(4096):  # 16 MiB carrying the agent's test pattern
            f.write((b"CUJUBLK\0" + blk.to_bytes(8, "little")).ljust(4096, b"\xa5"))
    extra = ["-drive", f"file={disk},if=none,id=trackers-d0,format=raw,cache=none",
             "-device", "virtio-blk-pci,drive=trackers-d0"]
    _run_linux_case(which, "diskread", extra, EPOCHS, diskmode="both")
