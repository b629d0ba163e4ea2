"""DeviceStateSaver error paths that real QEMU cannot be made to take on demand.

A scripted stand-in for QEMU's monitor writes (part of) a device-state file at
``xen-save-devices-state``, or refuses it. The saver must surface QEMU's reason, never
touch a migration command or capability, and refuse a machine whose guest-writable RAM
would not be replicated. The real-QEMU paths are in tests/integration/test_devstate.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from cuju_libvirt.errors import StateError
from cuju_libvirt.ft_engine.devstate import DeviceStateError, DeviceStateSaver
from cuju_libvirt.qmp import QMPClient, QMPError

GOOD = (
    b"QEVM\x00\x00\x00\x03" + b"\x04\x00\x00\x00\x00\x05timer\x00\x00\x00\x00\x00\x00\x00\x02"
    + b"payload" + b"\x7e\x00\x00\x00\x00" + b"\x00"
)
RAMBLOCKS = """  Block Name    PSize   Offset   Used   Total
      pc.ram    4 KiB  0x0000000000000000 0x0000000001000000 0x0000000001000000
     pc.bios    4 KiB  0x0000000001000000 0x0000000000040000 0x0000000000040000
"""


class FakeMonitor:
    def __init__(self, tmp: Path, *, write: bytes = GOOD, refuse: str | None = None) -> None:
        self.path = str(tmp / "qmp.sock")
        self.status = "paused"
        self.write = write
        self.refuse = refuse
        self.ramblocks = RAMBLOCKS
        self.memdevs = [{"id": "pc.ram", "share": True, "size": 1 << 24}]
        self.calls: list[str] = []
        self.sent: list[tuple[str, dict[str, Any] | None]] = []
        self.ran = 0
        self.answers: dict[int, Any] = {}

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *, fd: int | None = None) -> Any:
        self.calls.append(command)
        if command == "query-memdev":
            return self.memdevs
        if command == "qom-get":
            return "pc-i440fx-7.2-machine"
        if command == "human-monitor-command":
            return self.ramblocks
        if command == "query-status":
            return {"status": self.status}
        if command == "xen-save-devices-state":
            assert arguments is not None and arguments["live"] is False
            if self.refuse:
                raise QMPError(command, "GenericError", self.refuse)
            Path(arguments["filename"]).write_bytes(self.write)
            return {}
        raise QMPError(command, "CommandNotFound", f"fake has no {command}")

    def send(self, command: str, arguments: dict[str, Any] | None = None, *, fd: int | None = None) -> int:
        self.sent.append((command, arguments))  # run in order, as QEMU does
        return len(self.sent) - 1

    def reply(self, req_id: int, *, timeout: float | None = None) -> Any:
        while self.ran <= req_id:
            try:
                self.answers[self.ran] = self.execute(*self.sent[self.ran])
            except QMPError as err:
                self.answers[self.ran] = err
            self.ran += 1
        answer = self.answers.pop(req_id)
        if isinstance(answer, QMPError):
            raise answer
        return answer


def saver_for(fake: FakeMonitor) -> DeviceStateSaver:
    return DeviceStateSaver(cast(QMPClient, fake))


def test_a_good_save_reads_the_file_back_and_close_removes_it(tmp_path: Path) -> None:
    fake = FakeMonitor(tmp_path)
    saver = saver_for(fake)
    assert saver.path == str(tmp_path / "qmp.sock.devstate")
    assert saver.save().blob == GOOD
    assert [s.name for s in saver.sections or ()] == ["timer"]
    fake.write = GOOD.replace(b"payload", b"PAYLOAD!")  # QEMU truncates and rewrites the same file
    assert saver.save().blob == fake.write
    saver.close()
    assert not Path(saver.path).exists()
    assert not [c for c in fake.calls if "migrat" in c], "no migration command, ever"


def test_a_refused_save_keeps_qemus_words(tmp_path: Path) -> None:
    fake = FakeMonitor(tmp_path, refuse="Could not open 'x': Permission denied")
    with pytest.raises(DeviceStateError, match="Permission denied") as caught:
        saver_for(fake).save()
    assert caught.value.qemu_message == "Could not open 'x': Permission denied"
    assert fake.status == "paused"


def test_a_cut_file_is_not_a_blob(tmp_path: Path) -> None:
    fake = FakeMonitor(tmp_path, write=GOOD[:-3])
    with pytest.raises(DeviceStateError, match="incomplete"):
        saver_for(fake).save()


def test_a_running_vm_changes_nothing(tmp_path: Path) -> None:
    fake = FakeMonitor(tmp_path)
    saver = saver_for(fake)
    fake.status = "running"
    with pytest.raises(StateError):
        saver.save()
    assert "xen-save-devices-state" not in fake.calls, "nothing may be saved while the VM runs"


def test_a_pipelined_save_finds_a_vm_resumed_before_it(tmp_path: Path) -> None:
    """begin() goes right behind the engine's stop; another monitor's cont may run between
    them (the save then stops and resumes the VM itself): the query-status behind the save
    says so, and finish() refuses the blob. A refused save leaves no answer behind."""
    fake = FakeMonitor(tmp_path)
    saver = saver_for(fake)
    saver.begin()
    assert saver.finish().blob == GOOD
    assert [c for c, _ in fake.sent] == ["xen-save-devices-state", "query-status"]
    saver.begin()
    fake.status = "running"
    with pytest.raises(StateError):
        saver.finish()
    fake.status, fake.refuse = "paused", "disk full"
    saver.begin()
    with pytest.raises(DeviceStateError, match="disk full"):
        saver.finish()
    assert fake.answers == {}, "the query-status answer was collected too"


def test_unshared_ram_is_refused_up_front(tmp_path: Path) -> None:
    fake = FakeMonitor(tmp_path)
    fake.memdevs = [{"id": "pc.ram", "share": False, "size": 1 << 24}]
    with pytest.raises(DeviceStateError, match="not shared"):
        saver_for(fake)


def test_writable_memory_outside_the_ram_file_is_refused_by_name(tmp_path: Path) -> None:
    fake = FakeMonitor(tmp_path)
    fake.ramblocks = RAMBLOCKS + (
        "  0000:00:02.0/vga.vram    4 KiB  0x0000000001080000 0x0000000001000000 0x0000000001000000\n"
        "          system.flash1    4 KiB  0x0000000002080000 0x0000000000084000 0x0000000000084000\n"
        "  0000:00:02.0/vga.rom    4 KiB  0x0000000003080000 0x0000000000010000 0x0000000000010000\n"
    )
    with pytest.raises(DeviceStateError) as caught:
        saver_for(fake)
    text = str(caught.value)
    assert "vga.vram (16384 KiB of video memory)" in text
    assert "system.flash1" in text
    assert "vga.rom" not in text and "pc.bios" not in text
