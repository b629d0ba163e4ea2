"""The primary engine never leaves the VM paused silently after a failure: QEMU refusing
``cont`` (here: it cannot reopen a disk image) is retried, then reported in one clear line."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest

from cuju_libvirt.ft_engine import epoch
from cuju_libvirt.ft_engine.epoch import PrimaryConfig, PrimaryEngine
from cuju_libvirt.ft_engine.state import FTMachine, Role
from cuju_libvirt.ft_engine.stats import DomainStats
from cuju_libvirt.qmp import QMPConnectionError, QMPError

DENIED = "Could not open '/images/vm.img': Permission denied"


class PausedQEMU:
    """A monitor of a paused VM whose ``cont`` fails ``refusals`` times, then succeeds."""

    def __init__(self, refusals: int, *, gone: bool = False) -> None:
        self.refusals = refusals
        self.gone = gone
        self.status = "paused"
        self.conts = 0

    def execute(self, command: str, arguments: dict[str, Any] | None = None, **_: Any) -> Any:
        if self.gone:
            raise QMPConnectionError("QMP connection lost")
        if command == "query-status":
            return {"status": self.status}
        assert command == "cont", command
        self.conts += 1
        if self.conts <= self.refusals:
            raise QMPError("cont", "GenericError", DENIED)
        self.status = "running"
        return {}


def engine(qmp: PausedQEMU) -> PrimaryEngine:
    a, b = socket.socketpair()
    b.close()
    return PrimaryEngine(PrimaryConfig(ram_path="/nonexistent", ram_size=4096, tag="vm1"), qmp=qmp,  # type: ignore[arg-type]
                         pid=1, link=a, stats=DomainStats("vm1", "u", "primary"),
                         machine=FTMachine("vm1", Role.PRIMARY))


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(epoch, "RESUME_RETRY_DELAYS", (0.0, 0.0, 0.0), raising=False)


@pytest.mark.timeout(10)
def test_a_refused_cont_is_retried_until_the_vm_runs(caplog: pytest.LogCaptureFixture) -> None:
    qmp = PausedQEMU(refusals=2)
    problems: list[str] = []
    with caplog.at_level(logging.INFO):
        engine(qmp)._release_resources(problems, orderly=False)
    assert qmp.status == "running" and qmp.conts == 3
    assert problems == []
    assert any("runs again" in r.getMessage() and DENIED in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(10)
def test_a_vm_left_paused_is_reported_with_the_fix(caplog: pytest.LogCaptureFixture) -> None:
    qmp = PausedQEMU(refusals=100)
    with caplog.at_level(logging.INFO):
        engine(qmp)._release_resources([], orderly=False)
    assert qmp.status == "paused" and qmp.conts == 4  # the first try and three retries
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "left PAUSED" in errors[0] and DENIED in errors[0] and "virsh resume vm1" in errors[0]


@pytest.mark.timeout(10)
def test_a_lost_monitor_is_not_retried() -> None:
    qmp = PausedQEMU(refusals=0, gone=True)
    problems: list[str] = []
    engine(qmp)._release_resources(problems, orderly=False)
    assert len(problems) == 1 and "could not make sure the VM runs" in problems[0]
