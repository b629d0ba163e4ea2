"""The cause of a QEMU exit, named from QEMU's own last events (issue 13 item 5)."""

from __future__ import annotations

from typing import Any

from cuju_libvirt.ft_engine.epoch import qemu_exit_cause


def shutdown(guest: bool, reason: str) -> dict[str, Any]:
    return {"event": "SHUTDOWN", "data": {"guest": guest, "reason": reason}}


def migration(status: str) -> dict[str, Any]:
    return {"event": "MIGRATION", "data": {"status": status}}


def test_sigkill_or_a_crash_leaves_no_words() -> None:
    assert qemu_exit_cause([]) is None
    assert qemu_exit_cause([migration("completed")]) is None


def test_virsh_destroy_is_a_host_signal_without_a_saved_state() -> None:
    assert qemu_exit_cause([shutdown(False, "host-signal")]) == "virsh destroy (or a SIGTERM to QEMU)"
    assert "destroy" in str(qemu_exit_cause([migration("failed"), shutdown(False, "host-signal")]))


def test_virsh_save_is_a_completed_migration_then_a_host_signal() -> None:
    events = [migration("setup"), migration("active"), migration("completed"), shutdown(False, "host-signal")]
    assert qemu_exit_cause(events) == "virsh save / managedsave"


def test_a_guest_poweroff_is_named_even_when_libvirt_then_sends_sigterm() -> None:
    assert qemu_exit_cause([shutdown(True, "guest-shutdown"), shutdown(False, "host-signal")]) \
        == "the guest powered off"
    assert qemu_exit_cause([shutdown(True, "guest-panic")]) == "the guest ended (guest-panic)"


def test_a_quit_on_the_monitor() -> None:
    assert qemu_exit_cause([shutdown(False, "host-qmp-quit")]) == "a 'quit' on QEMU's monitor"
