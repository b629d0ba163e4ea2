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
from cuju_libvirt.rig.hosts import Host, Rig
from tests.e2e.test_cujud_restarts import wait_primary
from tests.e2e.test_failover import runs

NAME = "serial-fo"
MAC = "52:54:00:19:0d:0a"
LOG = f"/var/log/libvirt/qemu/{NAME}-serial.log"


def _text(path: Path) -> str:
    return path.read_bytes().decode("ascii", errors="replace") if path.exists() else ""


def _server_dir(host: Host, name: str) -> Path:
    uuid = host.virsh("domuuid", name).strip()
    return host.outside(f"{CHARDEV_SOCKET_DIR}/{uuid}")


def _protect(rig: Rig, image: Path, cujuds: tuple[Cujud, Cujud], name: str, mac: str) -> None:
    ca, cb = cujuds
    xml = protected_counter_xml(rig, image, name, mac=mac, epoch_ms=20)
    assert CHARDEV_SOCKET_DIR in xml.read_text(), "prepare did not hold COM1"
    rig.a.virsh("define", str(xml))
    rig.a.virsh("start", name)
    ca.wait_domain(name, "protected", timeout=60)
    cb.wait_domain(name, "standby", timeout=30)


def _assert_one_stream(a_text: str, b_text: str) -> list[int]:
    combined = serial_counts(a_text + b_text)
    assert combined == list(range(1, len(combined) + 1)), (
        f"COM1 as the user sees it repeats or skips a line around the failover: host a ends "
        f"{a_text[-40:]!r}, host b starts {b_text[:40]!r}")
    assert b_text and "cuju-boot" not in b_text  # host b went on from the checkpoint: no reboot
    return combined


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
    rig, ca = ft_rig, cujuds[0]
    a_log, b_log = rig.a.outside(LOG), rig.b.outside(LOG)
    try:
        _protect(rig, counter_image, cujuds, NAME, MAC)
        server = _server_dir(rig.a, NAME)
        assert "serial-commit" not in (rig.root / f"{NAME}.xml").read_text()  # the default holds a file
        _wait(lambda: len(serial_counts(_text(a_log))) > 20, "COM1 lines on host a", 60)
        time.sleep(random.uniform(1.0, 3.0))  # a random moment in FT mode
        assert ca.domain(NAME)["state"] == "protected"  # type: ignore[index]
        pid = rig.a.qemu_pid(NAME)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        at_kill = len(serial_counts(_text(a_log)))
        _wait(lambda: runs(rig.b, NAME, tries=1), "the VM running on host b", 60)
        # host a's chardev server settles with the epoch host b resumed from, then exits
        _wait(lambda: not server.exists(), "host a's chardev server to settle, exit and clean up", 60)
        _wait(lambda: len(serial_counts(_text(a_log) + _text(b_log))) > at_kill + 50,
              "COM1 lines from host b", 60)
        a_text, b_text = _text(a_log), _text(b_log)
        combined = _assert_one_stream(a_text, b_text)
        print(f"COM1: {len(serial_counts(a_text))} lines on host a, then host b went on "
              f"from {b_text[:12]!r}: {len(combined)} lines, none repeated or missing")
        said = ca.log_path.read_text(errors="replace")
        assert "held serial output settled" in said, said[-2000:]
    finally:
        cleanup_protected(rig, NAME)


@pytest.mark.timeout(300)
def test_a_restarted_cujud_that_cedes_settles_the_chardev_server(
    ft_rig: Rig, counter_image: Path, cujuds: tuple[Cujud, Cujud]
) -> None:
    """Review finding: SIGKILL of the primary's cujud, the backup takes over, the restarted
    cujud cedes its stale copy; it had no engine, so nobody settled the chardev server,
    which held the copy's unacknowledged tail and waited for a word that never came (it
    never exited). Now the restarted cujud settles it with the epoch host b resumed from:
    the server exits and COM1 (host a's file, then host b's) is the counter's one stream."""
    rig, (ca, cb) = ft_rig, cujuds
    name, a_log, b_log = "serial-cede", rig.a.outside(LOG.replace(NAME, "serial-cede")), \
        rig.b.outside(LOG.replace(NAME, "serial-cede"))
    try:
        _protect(rig, counter_image, cujuds, name, "52:54:00:19:0d:0b")
        server = _server_dir(rig.a, name)
        _wait(lambda: len(serial_counts(_text(a_log))) > 20, "COM1 lines on host a", 60)
        time.sleep(random.uniform(0.5, 2.0))
        ca.kill()
        wait_primary(cb, name, 30)
        stale = rig.a.qemu_pid(name)
        assert stale is not None and (server / "server.pid").exists()  # the stale copy and its server
        ca.start()
        _wait(lambda: rig.a.qemu_pid(name) is None, "the restarted cujud destroying the taken-over copy", 60)
        _wait(lambda: not server.exists(), "host a's chardev server to settle, exit and clean up", 60)
        at_settle = len(serial_counts(_text(a_log)))
        _wait(lambda: len(serial_counts(_text(a_log) + _text(b_log))) > at_settle + 50,
              "COM1 lines from host b", 60)
        _assert_one_stream(_text(a_log), _text(b_log))
        said = ca.log_path.read_text(errors="replace")[ca.log_start:]
        assert "held serial output settled" in said, said[-2000:]
    finally:
        cleanup_protected(rig, name)
