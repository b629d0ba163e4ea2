"""The boot-sector guests on a real QEMU (TCG): the counter in the RAM file and on COM1, and the
pages each guest writes, found by a brute-force diff of the RAM file between two pauses."""

from __future__ import annotations

import itertools
import struct
import time

import pytest

from cuju_libvirt.rig.guests import (
    COUNTER_GPA,
    GUEST_OWN_PAGES,
    PAGE_SIZE,
    WriterConfig,
    boot_image,
    read_counter,
    serial_counts,
)
from cuju_libvirt.rig.qemu_direct import DirectGuest

pytestmark = pytest.mark.timeout(60)


def changed_pages(before: bytes, after: bytes) -> list[int]:
    view_a, view_b = memoryview(before), memoryview(after)
    return [
        pfn
        for pfn in range(len(before) // PAGE_SIZE)
        if view_a[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] != view_b[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE]
    ]


def wait_counter_above(guest: DirectGuest, value: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (current := read_counter(guest.ram_path)) <= value:
        assert time.monotonic() < deadline, f"counter stuck at {current}"
        time.sleep(0.01)
    return current


def test_counter_guest_counts_in_the_ram_file_and_on_com1() -> None:
    with DirectGuest(name="guests-counter", memory_mib=16, disk=boot_image()) as guest:
        guest.wait_serial(r"cuju-boot counter\r\n1\r\n", timeout=15)
        first = wait_counter_above(guest, 0)
        second = wait_counter_above(guest, first + 50)
        assert second > first + 50
        guest.stop()
        frozen = read_counter(guest.ram_path)
        time.sleep(0.2)
        assert read_counter(guest.ram_path) == frozen, "the counter moved while the VM was stopped"
        counts = serial_counts(guest.serial_text())
        assert counts == list(range(1, len(counts) + 1)), "COM1 must count 1, 2, 3, ... without gaps"
        # The guest stores the counter before printing it: stopped mid-line, RAM is one ahead.
        assert frozen - counts[-1] in (0, 1)
        guest.cont()
        assert wait_counter_above(guest, frozen) > frozen


def test_counter_guest_writes_only_its_own_pages() -> None:
    with DirectGuest(name="guests-own", memory_mib=16, disk=boot_image()) as guest:
        guest.wait_serial(r"cuju-boot counter\r\n\d+\r\n", timeout=15)
        guest.stop()
        before = guest.read_ram(0, guest.ram_size)
        guest.cont()
        wait_counter_above(guest, struct.unpack_from("<I", before, COUNTER_GPA)[0] + 100)
        guest.stop()
        after = guest.read_ram(0, guest.ram_size)
    dirty = set(changed_pages(before, after))
    assert COUNTER_GPA // PAGE_SIZE in dirty
    assert dirty <= GUEST_OWN_PAGES, f"unexpected pages written: {sorted(dirty - GUEST_OWN_PAGES)}"


def test_writer_guest_spreads_changing_values_over_its_span() -> None:
    cfg = WriterConfig()  # the default the tracker tests use: 64 MiB from 1 MiB
    with DirectGuest(name="guests-writer", memory_mib=cfg.min_memory_mib + 1, disk=boot_image(cfg)) as guest:
        guest.wait_serial(r"cuju-boot writer\r\n\d+\r\n", timeout=15)
        guest.stop()
        before = guest.read_ram(0, guest.ram_size)
        c0 = struct.unpack_from("<I", before, COUNTER_GPA)[0]
        guest.cont()
        wait_counter_above(guest, c0 + 4 * cfg.run_every)
        guest.stop()
        after = guest.read_ram(0, guest.ram_size)
        c1 = struct.unpack_from("<I", after, COUNTER_GPA)[0]
    dirty = changed_pages(before, after)
    span = set(cfg.span_pfns())
    outside = set(dirty) - span - GUEST_OWN_PAGES
    assert not outside, f"writer touched pages outside its span: {sorted(outside)[:10]}"
    in_span = [pfn for pfn in dirty if pfn in span]
    # At least one sequential run of run_pages pages happened (c1 - c0 >= 4 * run_every)...
    longest = run = 1
    for prev, cur in itertools.pairwise(in_span):
        run = run + 1 if cur == prev + 1 else 1
        longest = max(longest, run)
    assert longest >= cfg.run_pages
    # ...and random pages beyond the runs.
    runs_max = ((c1 - c0) // cfg.run_every + 1) * cfg.run_pages
    assert len(in_span) > runs_max
    # Every changed page holds a counter value written in this interval somewhere. The guest
    # increments the counter before it scribbles, so a stop between the two leaves the
    # scribbles of value c0 for after the cont: c0 itself is a value of this interval.
    for pfn in in_span:
        words = struct.unpack_from(f"<{PAGE_SIZE // 4}I", after, pfn * PAGE_SIZE)
        assert any(c0 <= w <= c1 for w in words), f"page {pfn:#x} changed without a new counter value"
