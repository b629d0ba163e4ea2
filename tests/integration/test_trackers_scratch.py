"""Both trackers against a brute-force ground truth on a scratch process of our own.

A child process (plain ``/usr/bin/python3``, optionally running as ``libvirt-qemu`` like
QEMU under libvirt) maps a file on tmpfs shared and, on command, changes pages in the
ways guest RAM changes: CPU stores from its main thread and from a second thread,
kernel writes (``read()`` into the mapping), and discards (``MADV_REMOVE``). The parent
attaches the ``uffd`` tracker to it from outside (ptrace-injected userfaultfd), and for
every round compares the harvest with a byte-wise diff of the file: a changed page that
was not harvested fails the test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cuju_libvirt import _cuju
from cuju_libvirt.errors import StateError, TrackerUnavailableError
from cuju_libvirt.ft_engine import trackers as T
from tests.helpers import proc_status_field

PS = 4096
NPAGES = 512
SHM = Path("/dev/shm")

# The child: reads one command per line: "<op> <page> <page> ...", answers "ok".
CHILD = r"""
import mmap, os, sys, threading
PS = 4096
f = open(sys.argv[1], "r+b")
m = mmap.mmap(f.fileno(), 0)
src = open(sys.argv[2], "rb")
sys.stdout.write("ready\n"); sys.stdout.flush()
n = 0
for line in sys.stdin:
    op, *pages = line.split()
    pages = [int(p) for p in pages]
    n += 1
    if op == "w":
        for p in pages:
            m[p * PS + (n * 13) % PS] = (m[p * PS + (n * 13) % PS] + 1) % 256
    elif op == "t":
        def run():
            for p in pages:
                m[p * PS + 7] = (m[p * PS + 7] + 1) % 256
        th = threading.Thread(target=run); th.start(); th.join()
    elif op == "r":
        for p in pages:
            os.preadv(src.fileno(), [memoryview(m)[p * PS:(p + 1) * PS]], (n % 8) * PS)
    elif op == "d":
        for p in pages:
            m.madvise(mmap.MADV_REMOVE, p * PS, PS)
    elif op == "sleep":
        import time; time.sleep(float(pages[0]) / 1000)
    sys.stdout.write("ok\n"); sys.stdout.flush()
"""


@dataclass
class Child:
    proc: subprocess.Popen[str]
    ram: Path
    idle: bool = True

    def do(self, op: str, pages: list[int] | tuple[int, ...] = ()) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.idle = False
        self.proc.stdin.write(" ".join([op, *map(str, pages)]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        self.idle = True
        assert line == "ok\n", f"child answered {line!r}"

    def stopped(self) -> bool:
        return self.idle


def _spawn(tmp: Path, user: str | None) -> Child:
    ram = tmp / "guest.ram"
    with open(ram, "wb") as f:
        f.write(os.urandom(NPAGES * PS))
    src = tmp / "src"
    src.write_bytes(os.urandom(16 * PS))
    for p in (tmp, ram, src):
        os.chmod(p, 0o777 if p == tmp else 0o666)
    proc = subprocess.Popen(
        ["/usr/bin/python3", "-c", CHILD, str(ram), str(src)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, user=user, start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    return Child(proc, ram)


@pytest.fixture
def tmp_shm() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="trackers-test-", dir=SHM))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["root", "libvirt-qemu"])
def child(request: pytest.FixtureRequest, tmp_shm: Path) -> Iterator[Child]:
    user = None if request.param == "root" else request.param
    if user is not None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            pytest.skip(f"user {user} does not exist (install libvirt-daemon-system)")
    c = _spawn(tmp_shm, user)
    try:
        yield c
    finally:
        if c.proc.stdin is not None:
            c.proc.stdin.close()
        try:
            c.proc.wait(5)
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()


def _uffds_in(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[userfaultfd]"
    return n


def _changed(before: bytes, after: bytes) -> set[int]:
    return {p for p in range(len(before) // PS) if before[p * PS:(p + 1) * PS] != after[p * PS:(p + 1) * PS]}


def _ground_truth_rounds(tracker: T.Tracker, child: Child, rounds: int, seed: int) -> tuple[int, int, int]:
    """Run random rounds; return (changed pages, false positives, rounds). Asserts 0 missed."""
    rng = random.Random(seed)
    out = T.page_buffer(tracker.npages)
    tracker.arm()
    prev = child.ram.read_bytes()
    changed_total = fp_total = 0
    for r in range(rounds):
        for _ in range(rng.randrange(1, 4)):
            op = rng.choice("wwtrd")
            pages = [rng.randrange(NPAGES) for _ in range(rng.randrange(0, 40))]
            if rng.random() < 0.2:  # a run of consecutive pages
                s = rng.randrange(NPAGES - 64)
                pages += list(range(s, s + rng.randrange(1, 64)))
            child.do(op, pages)
        h = tracker.harvest(out)
        if isinstance(tracker, T.Settling):
            tracker.settle()
        now = child.ram.read_bytes()
        truth = _changed(prev, now)
        got = set(out[:h.count])
        assert not h.full_resync, f"round {r}: unexpected full resync"
        missed = truth - got
        assert not missed, f"round {r}: {tracker.name} missed pages {sorted(missed)}"
        changed_total += len(truth)
        fp_total += len(got - truth)
        prev = now
    return changed_total, fp_total, rounds


@pytest.mark.timeout(120)
def test_uffd_attach_ground_truth(child: Child) -> None:
    tracker = T.UffdTracker.attach(child.proc.pid, child.ram, child.stopped)
    try:
        assert proc_status_field(child.proc.pid, "TracerPid") == 0, "the target was left traced"
        assert _uffds_in(child.proc.pid) == 0, "the target kept a userfaultfd"
        changed, fp, rounds = _ground_truth_rounds(tracker, child, 200, seed=1)
        assert changed > 1000
        print(f"uffd: {rounds} rounds, {changed} changed pages, 0 missed, {fp} false positives")
        assert isinstance(tracker, T.UffdTracker)
        assert tracker.stats()["events_remove"] > 0
    finally:
        tracker.close()
    # With our fd closed the registration is gone: the child must not block on events.
    child.do("d", [1, 2, 3])
    child.do("w", [1, 2, 3])


@pytest.mark.timeout(120)
def test_uffd_sync_ground_truth(tmp_shm: Path) -> None:
    """Sync mode: faults resolved by our thread, bitmaps instead of a page-table walk. CPU
    stores from two threads, read() into the mapping (kernel-mode writes, which must wait
    for the fault thread rather than fail), MADV_REMOVE; every round against a byte diff."""
    c = _spawn(tmp_shm, None)
    try:
        tracker = T.UffdTracker.attach(c.proc.pid, c.ram, c.stopped, mode="sync")
        try:
            assert proc_status_field(c.proc.pid, "TracerPid") == 0, "the target was left traced"
            changed, fp, rounds = _ground_truth_rounds(tracker, c, 200, seed=4)
            assert changed > 1000
            stats = tracker.stats()
            print(f"uffd sync: {rounds} rounds, {changed} changed pages, 0 missed, {fp} false positives, "
                  f"{stats['faults']} faults, {stats['reprotected']} re-protected")
            assert stats["mode"] == "sync"
            assert stats["faults"] > 500, "the writes were not seen as faults"
            assert stats["reprotected"] > 0, "written pages were never protected again"
            assert stats["events_remove"] > 0
        finally:
            tracker.close()
        # With our fd closed nothing waits for us: the child writes and discards freely.
        c.do("w", [1, 2, 3])
        c.do("r", [4, 5])
        c.do("d", [1, 2, 3])
    finally:
        assert c.proc.stdin is not None
        c.proc.stdin.close()
        c.proc.wait(5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_removed_page_is_reported_by_the_very_next_harvest(tmp_shm: Path, mode: T.UffdMode) -> None:
    """The kernel lets madvise() return once its REMOVE message is *read*: a harvest right
    after must still see the page (it used to miss it when the event thread had read the
    message but not recorded it yet; about one round in 200 of the ground truth)."""
    c = _spawn(tmp_shm, None)
    rng = random.Random(5)
    try:
        tracker = T.UffdTracker.attach(c.proc.pid, c.ram, c.stopped, mode=mode)
        try:
            out = T.page_buffer(tracker.npages)
            tracker.arm()
            for r in range(1500):
                page = rng.randrange(NPAGES)
                c.do("d", [page])
                h = tracker.harvest(out)
                tracker.settle()
                assert page in set(out[:h.count]), f"round {r}: removed page {page} not reported"
        finally:
            tracker.close()
    finally:
        assert c.proc.stdin is not None
        c.proc.stdin.close()
        c.proc.wait(5)


def test_uffd_sync_refused_when_qemu_is_unprivileged(child: Child) -> None:
    """A user-mode-only userfaultfd in sync mode would fail kernel-mode writes: refused."""
    if proc_status_field(child.proc.pid, "Uid") == 0:
        pytest.skip("the child runs as root here (the libvirt-qemu variant checks the refusal)")
    with pytest.raises(TrackerUnavailableError, match="user-mode-only userfaultfd"):
        T.UffdTracker.attach(child.proc.pid, child.ram, child.stopped, mode="sync")
    assert _uffds_in(child.proc.pid) == 0


@pytest.mark.timeout(120)
def test_uffd_parallel_walkers_ground_truth(tmp_shm: Path) -> None:
    c = _spawn(tmp_shm, None)
    try:
        tracker = T.UffdTracker.attach(c.proc.pid, c.ram, c.stopped, walkers=3)
        try:
            changed, _, _ = _ground_truth_rounds(tracker, c, 100, seed=3)
            assert changed > 500
        finally:
            tracker.close()
    finally:
        assert c.proc.stdin is not None
        c.proc.stdin.close()
        c.proc.wait(5)


@pytest.mark.timeout(120)
def test_scan_ground_truth(child: Child) -> None:
    with T.ScanTracker.open(child.ram, child.stopped, nthreads=2) as tracker:
        changed, fp, _ = _ground_truth_rounds(tracker, child, 200, seed=2)
        assert changed > 1000
        assert fp == 0, "scan reports exactly the pages whose bytes changed"


@pytest.mark.timeout(60)
def test_attach_during_sleep_restarts_the_syscall(tmp_shm: Path) -> None:
    """A thread interrupted in clock_nanosleep (restart_syscall) or read() carries on unharmed."""
    c = _spawn(tmp_shm, None)
    try:
        assert c.proc.stdin is not None and c.proc.stdout is not None
        t0 = time.monotonic()
        c.proc.stdin.write("sleep 700\n")
        c.proc.stdin.flush()
        time.sleep(0.2)
        fd = _cuju.uffd_attach(c.proc.pid, c.proc.pid, True)
        os.close(fd)
        assert c.proc.stdout.readline() == "ok\n"
        elapsed = time.monotonic() - t0
        assert 0.65 < elapsed < 3.0, f"sleep took {elapsed:.2f}s"
        c.do("w", [5])  # blocked in read() at attach time before: still answers
        assert proc_status_field(c.proc.pid, "TracerPid") == 0
    finally:
        assert c.proc.stdin is not None
        c.proc.stdin.close()
        c.proc.wait(5)


def test_run_state_guard_refuses_harvest_while_running(child: Child) -> None:
    running = {"yes": False}
    tracker = T.UffdTracker.attach(child.proc.pid, child.ram, lambda: not running["yes"])
    try:
        tracker.arm()
        running["yes"] = True
        with pytest.raises(StateError, match="while the VM runs"):
            tracker.harvest(T.page_buffer(tracker.npages))
        with pytest.raises(StateError, match="while the VM runs"):
            tracker.arm()
    finally:
        tracker.close()
    with pytest.raises(StateError, match="after close"):
        tracker.harvest(T.page_buffer(NPAGES))


def test_harvest_overflow_means_full_resync(child: Child) -> None:
    tracker = T.UffdTracker.attach(child.proc.pid, child.ram, child.stopped)
    try:
        tracker.arm()
        child.do("w", list(range(100)))
        small = T.page_buffer(10)
        h = tracker.harvest(small)
        assert h.full_resync and h.count == 10
    finally:
        tracker.close()


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_self_test_passes_on_this_kernel(sync: bool) -> None:
    result = T._run_self_test(True, sync)
    assert result.ok, result.reason
    assert "madvise REMOVE/DONTNEED" in result.checks
    assert any("O_DIRECT" in c or "read()" in c for c in result.checks)


def test_select_logs_one_line_and_honours_setting(child: Child, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="cuju-test")
    logger = logging.getLogger("cuju-test")
    for setting, expect in (("scan", "scan"), ("auto", "uffd"), ("uffd", "uffd")):
        caplog.clear()
        t = T.select_tracker(setting, pid=child.proc.pid, ram_path=child.ram, vm_stopped=child.stopped,
                             logger=logger)
        try:
            assert t.name == expect
            lines = [r.getMessage() for r in caplog.records]
            assert len(lines) == 1 and lines[0].startswith(f"dirty tracker: {expect} ("), lines
        finally:
            t.close()


def test_select_auto_falls_back_to_scan_when_self_test_fails(child: Child,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")

    def failing() -> T.SelfTestResult:
        return T.SelfTestResult(False, "self-test mismatch: missed pages [3]", ())

    t = T.select_tracker("auto", pid=child.proc.pid, ram_path=child.ram, vm_stopped=child.stopped,
                         self_test_fn=failing)
    try:
        assert t.name == "scan"
        assert any("uffd unavailable: self-test mismatch" in r.getMessage() for r in caplog.records)
    finally:
        t.close()
    with pytest.raises(TrackerUnavailableError, match="tracker='uffd' cannot be used: self-test mismatch"):
        T.select_tracker("uffd", pid=child.proc.pid, ram_path=child.ram, vm_stopped=child.stopped,
                         self_test_fn=failing)
