"""Polling helpers that more than one test module needs."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from cuju_libvirt.rig.guests import read_counter
from cuju_libvirt.rig.qemu_direct import DirectGuest


def wait_for(cond: Callable[[], object], timeout: float) -> bool:
    """Poll ``cond`` every 10 ms: True as soon as it is truthy, False once ``timeout`` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def wait_counter_above(guest: DirectGuest, value: int, timeout: float = 10.0) -> int:
    """The boot-sector guest's counter (read from its RAM file) once it exceeds ``value``."""
    deadline = time.monotonic() + timeout
    while (current := read_counter(guest.ram_path)) <= value:
        assert time.monotonic() < deadline, f"counter stuck at {current}"
        time.sleep(0.01)
    return current


def proc_status_field(pid: int, key: str, index: int = 0) -> int:
    """The ``index``-th number on the ``key:`` line of /proc/PID/status (e.g. TracerPid, Uid)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1 + index])
    raise AssertionError(f"no {key} line")
