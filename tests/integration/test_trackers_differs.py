"""The ground truth itself: both brute-force differs find exactly the pages whose bytes changed.

The ground-truth tests are only as good as their differ, so the Python differ and the C
shadow compare (the scan tracker's mechanism, used as ground truth for uffd) are checked
here against modifications whose effect is known by construction: single-byte flips at
any offset of a page (first, last, middle bytes, which vector compares must not skip).
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuju_libvirt.ft_engine import trackers as T
from cuju_libvirt.rig.tracker_truth import _CDiffer, _PythonDiffer, changed_pages

PS = 4096
NPAGES = 64

flips = st.lists(st.tuples(st.integers(0, NPAGES - 1), st.integers(0, PS - 1)), max_size=40)


def test_python_differ_exact_on_edges() -> None:
    before = bytes(NPAGES * PS)
    after = bytearray(before)
    for page, off in ((0, 0), (5, PS - 1), (63, PS // 2), (7, 63), (8, 64)):
        after[page * PS + off] ^= 0x80
    assert changed_pages(before, bytes(after)) == {0, 5, 63, 7, 8}
    assert changed_pages(before, before) == set()


@given(flips)
@settings(max_examples=60, deadline=None)
def test_python_differ_matches_construction(changes: list[tuple[int, int]]) -> None:
    before = os.urandom(NPAGES * PS)
    after = bytearray(before)
    for page, off in changes:
        after[page * PS + off] ^= 0x01
    # Flipping the same byte twice restores it: the truth is computed per byte.
    truth = {p for p in range(NPAGES) if after[p * PS:(p + 1) * PS] != before[p * PS:(p + 1) * PS]}
    assert changed_pages(before, bytes(after)) == truth


@pytest.fixture(scope="module")
def ram_file() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="trackers-differ-", dir="/dev/shm"))
    try:
        f = d / "ram"
        f.write_bytes(os.urandom(NPAGES * PS))
        yield f
    finally:
        shutil.rmtree(d, ignore_errors=True)


@given(flips)
@settings(max_examples=60, deadline=None)
def test_c_and_python_differs_agree(ram_file: Path, changes: list[tuple[int, int]]) -> None:
    py, c = _PythonDiffer(ram_file), _CDiffer(ram_file)
    try:
        with open(ram_file, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            for page, off in changes:
                m[page * PS + off] ^= 0x01
        got_c = c.changed()
        got_py = py.changed()
        assert got_c == got_py
        assert c.changed() == set() == py.changed()
    finally:
        c.close()
        py.close()


def test_scan_tracker_threads_split_exactly(ram_file: Path) -> None:
    """Pages at every worker boundary are seen, whatever the thread count."""
    with open(ram_file, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        for n in (1, 2, 3, 7, 16):
            t = T.ScanTracker.open(ram_file, lambda: True, nthreads=n)
            try:
                t.arm()
                edges = {NPAGES * i // n for i in range(n)} | {NPAGES * i // n - 1 for i in range(1, n)}
                want = {0, NPAGES - 1} | edges
                for p in want:
                    m[p * PS + PS - 1] ^= 0xFF
                out = T.page_buffer(NPAGES)
                h = t.harvest(out)
                assert set(out[:h.count]) == want and not h.full_resync
            finally:
                t.close()
