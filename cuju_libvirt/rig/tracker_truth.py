"""Ground truth for dirty trackers on a real, running guest (tests and benchmarks only).

Generic over the guest: anything with ``pid``, ``ram_path``, ``stop()`` and ``cont()``
(:class:`~cuju_libvirt.rig.qemu_direct.DirectGuest`, a libvirt domain with a direct QMP
socket, ...). Per epoch::

    cont -> let the guest run -> stop -> harvest -> brute-force diff of the RAM file
    against the previous epoch's copy -> every changed page must be in the harvest

A changed page missing from the harvest is a *miss* (a correctness failure); a harvested
page whose bytes did not change is a *false positive* (costs bandwidth only).

Two brute-force differs: ``"python"`` (read the file, compare page by page; simple and
slow, ~1 s per 256 MiB on the loaded development machine) and ``"c"`` (the extension's
shadow-copy compare, i.e. the ``scan`` mechanism, ~50x faster). ``"c"`` is an independent
check of ``uffd`` (byte comparison against page-table state), never of ``scan`` itself.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from cuju_libvirt.ft_engine import trackers as T

PAGE = 4096
_CHUNK = 1 << 20


class RunningGuest(Protocol):
    @property
    def pid(self) -> int: ...

    @property
    def ram_path(self) -> Path: ...

    def stop(self) -> None: ...

    def cont(self) -> None: ...


@dataclass
class TruthReport:
    tracker: str
    epochs: int = 0
    changed_pages: int = 0
    harvested_pages: int = 0
    missed_pages: int = 0
    false_positives: int = 0
    full_resyncs: int = 0
    harvest_ms: list[float] = field(default_factory=list)
    first_misses: list[tuple[int, int]] = field(default_factory=list)  # (epoch, page)

    @property
    def false_positive_ratio(self) -> float:
        return self.false_positives / self.harvested_pages if self.harvested_pages else 0.0

    def summary(self) -> str:
        med = statistics.median(self.harvest_ms) if self.harvest_ms else float("nan")
        return (f"{self.tracker}: {self.epochs} epochs, {self.changed_pages} changed pages, "
                f"{self.missed_pages} missed, {self.false_positives} false positives "
                f"({self.false_positive_ratio:.1%}), {self.full_resyncs} full resyncs, "
                f"harvest median {med:.3f} ms")


def read_ram(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        chunks = []
        off = 0
        while off < size:
            b = os.pread(fd, min(64 << 20, size - off), off)
            if not b:
                break
            chunks.append(b)
            off += len(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def changed_pages(before: bytes, after: bytes) -> set[int]:
    """Brute force: every page whose bytes differ (compares 1 MiB chunks first)."""
    if len(before) != len(after):
        raise ValueError("RAM size changed between epochs")
    out: set[int] = set()
    for c in range(0, len(after), _CHUNK):
        if before[c:c + _CHUNK] == after[c:c + _CHUNK]:
            continue
        for off in range(c, min(c + _CHUNK, len(after)), PAGE):
            if before[off:off + PAGE] != after[off:off + PAGE]:
                out.add(off // PAGE)
    return out


class _PythonDiffer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.prev = read_ram(path)

    def changed(self) -> set[int]:
        now = read_ram(self.path)
        truth = changed_pages(self.prev, now)
        self.prev = now
        return truth

    def close(self) -> None:
        self.prev = b""


class _CDiffer:
    def __init__(self, path: Path) -> None:
        self.scan = T.ScanTracker.open(path, lambda: True, nthreads=2)
        self.scan.arm()
        self.out = T.page_buffer(self.scan.npages)

    def changed(self) -> set[int]:
        h = self.scan.harvest(self.out)
        if h.full_resync:
            raise AssertionError("the ground-truth differ overflowed")
        return set(self.out[:h.count])

    def close(self) -> None:
        self.scan.close()


def run_ground_truth(guest: RunningGuest, make_tracker: Callable[[T.VmStopped], T.Tracker], epochs: int,
                     run_s: float = 0.01, *, stop_on_miss: bool = False,
                     differ: Literal["python", "c"] = "python") -> TruthReport:
    """Run ``epochs`` epochs of ``run_s`` seconds each; see the module docstring."""
    stopped = {"v": False}

    def vm_stopped() -> bool:
        return stopped["v"]

    guest.stop()
    stopped["v"] = True
    tracker = make_tracker(vm_stopped)
    if differ == "c" and tracker.name == "scan":
        raise ValueError("the C differ is the scan mechanism: it cannot be the ground truth for scan")
    report = TruthReport(tracker.name)
    diff: _PythonDiffer | _CDiffer | None = None
    try:
        out = T.page_buffer(tracker.npages)
        tracker.arm()
        diff = _PythonDiffer(guest.ram_path) if differ == "python" else _CDiffer(guest.ram_path)
        for epoch in range(epochs):
            stopped["v"] = False
            guest.cont()
            time.sleep(run_s)
            guest.stop()
            stopped["v"] = True
            t0 = time.perf_counter()
            h = tracker.harvest(out)
            report.harvest_ms.append((time.perf_counter() - t0) * 1e3)
            if isinstance(tracker, T.Settling):
                tracker.settle()  # as the engine does before cont: fewer false positives
            truth = diff.changed()
            got = set(out[:h.count])
            report.epochs += 1
            report.changed_pages += len(truth)
            report.harvested_pages += len(got)
            report.false_positives += len(got - truth)
            if h.full_resync:
                report.full_resyncs += 1  # the engine would copy everything: nothing can be missed
            else:
                missed = truth - got
                report.missed_pages += len(missed)
                room = max(0, 5 - len(report.first_misses))
                report.first_misses += [(epoch, p) for p in sorted(missed)[:room]]
                if missed and stop_on_miss:
                    break
    finally:
        if diff is not None:
            diff.close()
        tracker.close()
        if stopped["v"]:
            guest.cont()
    return report
