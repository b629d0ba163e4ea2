"""Tracker policy without QEMU: guards, error mapping, selection, /proc parsing (fakes only)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from cuju_libvirt.errors import ReplicationError, StateError, TrackerError, TrackerUnavailableError
from cuju_libvirt.ft_engine import trackers as T


class FakeBackend:
    """Stands in for the C tracker; can fail on demand."""

    npages = 8
    page_size = 4096

    def __init__(self, fail: OSError | None = None, result: tuple[int, bool] = (2, False)) -> None:
        self.fail, self.result = fail, result
        self.closed = 0

    def arm(self) -> None:
        if self.fail:
            raise self.fail

    def harvest(self, out: memoryview) -> tuple[int, bool]:
        if self.fail:
            raise self.fail
        return self.result

    def close(self) -> None:
        self.closed += 1


def _tracker(backend: FakeBackend, stopped: bool = True) -> T._GuardedTracker:
    return T._GuardedTracker(backend, lambda: stopped, "test-vm")


def test_errors_are_replication_errors() -> None:
    assert issubclass(TrackerUnavailableError, TrackerError)
    assert issubclass(TrackerError, ReplicationError)


def test_harvest_maps_oserror_to_tracker_error_with_the_cause() -> None:
    err = OSError(5, "Input/output error")
    t = _tracker(FakeBackend(fail=err))
    with pytest.raises(TrackerError, match="copy all of guest RAM") as info:
        t.harvest(T.page_buffer(8))
    assert info.value.__cause__ is err
    with pytest.raises(TrackerError, match="arming failed"):
        t.arm()


def test_resync_is_passed_on_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    t = _tracker(FakeBackend(result=(8, True)))
    h = t.harvest(T.page_buffer(8))
    assert h == T.Harvest(8, True)
    assert "full resync needed" in caplog.text


def test_guard_refuses_while_running_and_after_close() -> None:
    b = FakeBackend()
    t = _tracker(b, stopped=False)
    with pytest.raises(StateError, match="while the VM runs"):
        t.harvest(T.page_buffer(8))
    with pytest.raises(StateError, match="while the VM runs"):
        t.arm()
    t.close()
    t.close()
    assert b.closed == 1
    with pytest.raises(StateError, match="after close"):
        t.harvest(T.page_buffer(8))


def test_select_rejects_unknown_setting_naming_the_attribute(tmp_path: Path) -> None:
    with pytest.raises(TrackerUnavailableError, match=r"tracker='fast'.*tracker attribute of <cuju:ft>"):
        T.select_tracker("fast", pid=os.getpid(), ram_path=tmp_path / "x", vm_stopped=lambda: True)


def test_find_ram_mapping_errors(tmp_path: Path) -> None:
    with pytest.raises(TrackerUnavailableError, match="RAM file"):
        T.find_ram_mapping(os.getpid(), tmp_path / "missing")
    f = tmp_path / "ram"
    f.write_bytes(b"\0" * 4096)
    with pytest.raises(TrackerUnavailableError, match="no shared mapping"):
        T.find_ram_mapping(os.getpid(), f)


def test_unfit_reason_refuses_a_ram_file_on_a_disk_file_system() -> None:
    # The checkout lives on the root file system (ext4 here), not on tmpfs.
    here = Path(__file__)
    if T._mount_fstype(here) in ("tmpfs", "hugetlbfs"):
        pytest.skip("the checkout is on tmpfs")
    reason = T.uffd_unfit_reason(os.getpid(), here)
    assert reason is not None and "memory_backing_dir on tmpfs or hugetlbfs" in reason


def test_self_test_reports_missing_features(monkeypatch: pytest.MonkeyPatch) -> None:
    def probe(user_mode_only: bool = True) -> dict[str, object]:
        return {"features": ["EVENT_REMOVE"], "missing": ["WP_ASYNC"], "pagemap_scan": True, "uffd_errno": 0}

    monkeypatch.setattr(T._cuju, "uffd_probe", probe)
    r = T._run_self_test(True)
    assert not r.ok and "WP_ASYNC" in r.reason


def test_self_test_reports_missing_pagemap_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    def probe(user_mode_only: bool = True) -> dict[str, object]:
        return {"features": [], "missing": [], "pagemap_scan": False, "uffd_errno": 0}

    monkeypatch.setattr(T._cuju, "uffd_probe", probe)
    r = T._run_self_test(True)
    assert not r.ok and "PAGEMAP_SCAN" in r.reason
