"""Serial output across a failover (issue 13 item 10): no COM1 line twice, none missing.

The boot-sector counter guest prints 1, 2, 3, ... on COM1, a ``<serial type='file'>`` that
``xml enable --prepare`` made a held port. Its primary QEMU on host a is SIGKILLed at a
random moment in FT mode; host b's standby resumes from the last committed epoch and
prints on into host b's copy of the file. What the user sees is host a's file followed by
host b's: it must be the counter's own stream, every number once and in order. Before the
hold, the lines of the epoch the failover lost were in both files.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from cuju_libvirt.chardev_xml import CHARDEV_SOCKET_DIR
from cuju_libvirt.rig.cujud import Cujud, cleanup_protected, protected_counter_xml
from cuju_libvirt.rig.guests import serial_counts
from cuju_libvirt.rig.hosts import Rig
from tests.e2e.test_failover import runs

NAME = "serial-fo"
MAC = "52:54:00:19:0d:0a"
LOG = f"/var/log/libvirt/qemu/{NAME}-serial.log"


def _text(path: Path) -> str:
    return path.read_bytes().decode("ascii", errors="replace") if path.exists() else ""


def _wait(predicate: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out ({timeout:.0f} s) waiting for {what}")
        time.sleep(0.05)


@pytest.mark.timeout(300)
def test_sigkill_of_the_primary_neither_repeats_nor_skips_a_com1_line(
    ft_rig: Rig, counter_image: Path, cujuds: tuple[Cujud, Cujud]
) -> None:
    rig, (ca, cb) = ft_rig, cujuds
    a_log, b_log = rig.a.outside(LOG), rig.b.outside(LOG)
    try:
        xml = protected_counter_xml(rig, counter_image, NAME, mac=MAC, epoch_ms=20)
        assert CHARDEV_SOCKET_DIR in xml.read_text(), "prepare did not hold COM1"
        rig.a.virsh("define", str(xml))
        rig.a.virsh("start", NAME)
        ca.wait_domain(NAME, "protected", timeout=60)
        cb.wait_domain(NAME, "standby", timeout=30)
        assert "serial-commit" not in xml.read_text()  # the default holds
        _wait(lambda: len(serial_counts(_text(a_log))) > 20, "COM1 lines on host a", 60)
        time.sleep(random.uniform(1.0, 3.0))  # a random moment in FT mode
        assert ca.domain(NAME)["state"] == "protected"  # type: ignore[index]
        pid = rig.a.qemu_pid(NAME)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        at_kill = len(serial_counts(_text(a_log)))
        _wait(lambda: runs(rig.b, NAME, tries=1), "the VM running on host b", 60)
        # host a's chardev server settles with the epoch host b resumed from, then exits
        uuid = rig.a.virsh("domuuid", NAME).strip()
        a_server = rig.a.outside(f"{CHARDEV_SOCKET_DIR}/{uuid}/server.pid")
        _wait(lambda: not a_server.exists(), "host a's chardev server to settle and exit", 60)
        _wait(lambda: len(serial_counts(_text(a_log) + _text(b_log))) > at_kill + 50,
              "COM1 lines from host b", 60)
        a_text, b_text = _text(a_log), _text(b_log)
        combined = serial_counts(a_text + b_text)
        assert combined == list(range(1, len(combined) + 1)), (
            f"COM1 as the user sees it repeats or skips a line around the failover: host a ends "
            f"{a_text[-40:]!r}, host b starts {b_text[:40]!r}")
        assert b_text and "cuju-boot" not in b_text  # host b went on from the checkpoint: no reboot
        print(f"COM1: {len(serial_counts(a_text))} lines on host a, then host b went on "
              f"from {b_text[:12]!r}: {len(combined)} lines, none repeated or missing")
        said = ca.log_path.read_text(errors="replace")
        assert "held serial output settled" in said, said[-2000:]
    finally:
        cleanup_protected(rig, NAME)
