"""QMPClient and DirectGuest against a real QEMU (TCG, no disk: the firmware idles)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt.errors import RigError
from cuju_libvirt.qmp import QMPClient, QMPConnectionError, QMPError
from cuju_libvirt.rig.qemu_direct import DirectGuest

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def guest() -> Iterator[DirectGuest]:
    with DirectGuest(name="guests-qmp", memory_mib=16) as g:
        yield g


def test_stop_and_cont_change_run_state_and_emit_events(guest: DirectGuest) -> None:
    guest.qmp.events()
    guest.stop()
    assert guest.status() == "paused"
    assert guest.qmp.wait_event("STOP", timeout=5)["event"] == "STOP"
    guest.cont()
    assert guest.status() == "running"
    assert guest.qmp.wait_event("RESUME", timeout=5)["event"] == "RESUME"


def test_qemu_errors_become_qmperror(guest: DirectGuest) -> None:
    with pytest.raises(QMPError) as info:
        guest.qmp.execute("no-such-command")
    assert info.value.error_class == "CommandNotFound"
    with pytest.raises(QMPError) as info:
        guest.qmp.execute("closefd", {"fdname": "never-passed"})
    assert info.value.error_class == "GenericError"
    assert guest.status() == "running"  # the session survives refused commands


def test_getfd_passes_a_descriptor_by_scm_rights(guest: DirectGuest) -> None:
    read_end, write_end = os.pipe()
    try:
        guest.qmp.execute("getfd", {"fdname": "guests-test"}, fd=write_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    # closefd succeeds only for a name QEMU holds, and only once.
    guest.qmp.execute("closefd", {"fdname": "guests-test"})
    with pytest.raises(QMPError):
        guest.qmp.execute("closefd", {"fdname": "guests-test"})


def test_second_client_on_a_busy_monitor_is_refused(guest: DirectGuest) -> None:
    # QEMU's monitor serves one client at a time: a second connect gets no greeting.
    with pytest.raises(QMPConnectionError) as info:
        QMPClient(guest.qmp_path, connect_timeout=0.3)
    assert "another client" in str(info.value)
    assert guest.status() == "running"


def test_paused_and_incoming_starts() -> None:
    with DirectGuest(name="guests-qmp-paused", memory_mib=16, paused=True) as g:
        assert g.status() == "prelaunch"
        g.cont()
        assert g.status() == "running"
    with DirectGuest(name="guests-qmp-incoming", memory_mib=16, incoming=True) as g:
        assert g.status() == "inmigrate"


def test_killed_qemu_is_a_clear_connection_error_and_cleanup_still_works() -> None:
    g = DirectGuest(name="guests-qmp-kill", memory_mib=16).start()
    directory, pid = g.dir, g.pid
    assert directory is not None and g.ram_path.stat().st_size == 16 << 20
    try:
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(QMPConnectionError, match="did QEMU exit"):
            for _ in range(100):  # the kill is asynchronous; the first commands may still be answered
                g.qmp.execute("query-status")
                time.sleep(0.01)
    finally:
        g.close()
    assert not directory.exists()
    assert not Path(f"/proc/{pid}").exists()


def test_exception_in_with_body_kills_qemu_and_removes_files() -> None:
    seen: dict[str, object] = {}
    with pytest.raises(RuntimeError), DirectGuest(name="guests-qmp-exc", memory_mib=16) as g:
        seen.update(pid=g.pid, dir=g.dir)
        raise RuntimeError("test body failed")
    assert not Path(f"/proc/{seen['pid']}").exists()
    assert isinstance(seen["dir"], Path) and not seen["dir"].exists()


def test_bad_qemu_arguments_give_qemus_message_and_leave_nothing(tmp_path: Path) -> None:
    g = DirectGuest(name="guests-qmp-bad", memory_mib=16, extra_args=["-no-such-option"], run_base=tmp_path)
    with pytest.raises(RigError, match="no-such-option"):
        g.start()
    assert list(tmp_path.iterdir()) == []


def test_stale_directory_of_a_dead_owner_is_swept(tmp_path: Path) -> None:
    stale = tmp_path / "guests-qmp-stale.abc"
    stale.mkdir()
    (stale / ".cuju-direct-guest").write_text("999999999\n")
    (stale / "guest.ram").write_bytes(b"\0" * 4096)
    unrelated = tmp_path / "someone-else"
    unrelated.mkdir()
    with DirectGuest(name="guests-qmp-sweep", memory_mib=16, run_base=tmp_path) as g:
        assert not stale.exists()
        assert unrelated.exists() and g.dir is not None and g.dir.exists()
