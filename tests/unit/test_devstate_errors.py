"""DeviceStateSaver error paths that real QEMU cannot be made to take on demand.

A scripted stand-in for QEMU's monitor takes the pipe's write end with ``getfd`` (as QEMU
does, keeping its own copy), writes part of a stream at ``migrate``, then closes it and
reports the migration failed. The saver must surface QEMU's reason, cancel, drop nothing
on the floor and turn x-ignore-shared off again. The real-QEMU paths are in
tests/integration/test_devstate.py.
"""

from __future__ import annotations

import os
from typing import Any, cast

import pytest

from cuju_libvirt.errors import StateError
from cuju_libvirt.ft_engine.devstate import DeviceStateError, DeviceStateSaver
from cuju_libvirt.ft_engine.vmstate import IGNORE_SHARED
from cuju_libvirt.qmp import QMPClient, QMPError


class FakeMonitor:
    def __init__(self, *, migration_end: str = "failed", write: bytes = b"QEVM" * 100) -> None:
        self.status = "paused"
        self.caps = False
        self.migration = "none"
        self.migration_end = migration_end
        self.write = write
        self.qemu_fd: int | None = None
        self.calls: list[str] = []

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *, fd: int | None = None) -> Any:
        self.calls.append(command)
        if command == "query-memdev":
            return [{"id": "pc.ram", "share": True, "size": 1 << 24}]
        if command == "query-migrate":
            return (
                {} if self.migration == "none" else {"status": self.migration, "error-desc": "disk on fire"}
            )
        if command == "query-migrate-capabilities":
            return [{"capability": IGNORE_SHARED, "state": self.caps}]
        if command == "qom-get":
            return False
        if command == "query-status":
            return {"status": self.status}
        if command == "migrate-set-capabilities":
            self.caps = bool(arguments and arguments["capabilities"][0]["state"])
            return {}
        if command == "getfd":
            assert fd is not None
            self.qemu_fd = os.dup(fd)
            return {}
        if command == "migrate":
            assert self.qemu_fd is not None
            os.write(self.qemu_fd, self.write)
            os.close(self.qemu_fd)
            self.qemu_fd = None
            self.migration = self.migration_end
            self.status = "postmigrate"
            return {}
        if command == "migrate_cancel":
            return {}
        raise QMPError(command, "CommandNotFound", f"fake has no {command}")


def saver_for(fake: FakeMonitor) -> DeviceStateSaver:
    return DeviceStateSaver(cast(QMPClient, fake), timeout=2.0)


def test_a_failed_migration_surfaces_qemus_reason_and_restores_the_capability() -> None:
    fake = FakeMonitor(migration_end="failed")
    saver = saver_for(fake)
    with pytest.raises(DeviceStateError, match="disk on fire") as caught:
        saver.save()
    assert caught.value.qemu_message == "disk on fire"
    assert fake.caps is False
    assert "migrate_cancel" in fake.calls
    assert saver.saves == 0


def test_a_completed_migration_with_a_cut_stream_is_not_a_blob() -> None:
    fake = FakeMonitor(migration_end="completed")
    with pytest.raises(DeviceStateError, match="incomplete"):
        saver_for(fake).save()
    assert fake.caps is False


class RefusingMonitor(FakeMonitor):
    def execute(self, command: str, arguments: dict[str, Any] | None = None, *, fd: int | None = None) -> Any:
        if command == "migrate":
            self.calls.append(command)
            raise QMPError(command, "GenericError", "a migration blocker says no")
        if command == "closefd":
            self.calls.append(command)
            assert self.qemu_fd is not None
            os.close(self.qemu_fd)
            self.qemu_fd = None
            return {}
        return super().execute(command, arguments, fd=fd)


def test_a_refused_migrate_keeps_qemus_words_and_releases_the_fd() -> None:
    fake = RefusingMonitor()
    with pytest.raises(DeviceStateError, match="blocker says no") as caught:
        saver_for(fake).save()
    assert caught.value.qemu_message == "a migration blocker says no"
    assert fake.calls[-2:] == ["closefd", "migrate-set-capabilities"]
    assert fake.caps is False and fake.qemu_fd is None
    assert fake.status == "paused"


def test_a_running_vm_changes_nothing() -> None:
    fake = FakeMonitor()
    saver = saver_for(fake)
    fake.status = "running"
    with pytest.raises(StateError):
        saver.save()
    assert "migrate-set-capabilities" not in fake.calls, "nothing may change when the VM runs"


def test_unshared_ram_is_refused_up_front() -> None:
    fake = FakeMonitor()
    fake.execute = (  # type: ignore[method-assign]
        lambda command, arguments=None, *, fd=None: (
            [{"id": "pc.ram", "share": False, "size": 1}]
            if command == "query-memdev"
            else FakeMonitor.execute(fake, command, arguments, fd=fd)
        )
    )
    with pytest.raises(DeviceStateError, match="not shared"):
        saver_for(fake)
