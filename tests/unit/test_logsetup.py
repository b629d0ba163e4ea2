"""Logging helpers: handler set-up by the daemon only, per-VM child loggers, one-line failures."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from cuju_libvirt import logsetup
from cuju_libvirt.errors import LibvirtError


@pytest.fixture
def clean_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def test_setup_replaces_only_its_own_handler(clean_root: None) -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    first, second = io.StringIO(), io.StringIO()
    logsetup.setup("WARNING", stream=first)
    logsetup.setup("debug", stream=second, journal=True)
    assert len(root.handlers) == before + 1
    assert root.level == logging.DEBUG
    logging.getLogger("cuju_libvirt.test").debug("hello %s", "vm")
    assert first.getvalue() == ""
    assert second.getvalue() == "DEBUG cuju_libvirt.test: hello vm\n"


def test_setup_with_timestamps(clean_root: None) -> None:
    out = io.StringIO()
    logsetup.setup(logging.INFO, stream=out)
    logging.getLogger("cuju_libvirt.x").info("up")
    line = out.getvalue()
    assert line.endswith(" INFO cuju_libvirt.x: up\n") and line[:4].isdigit()


def test_for_domain_is_one_level_below() -> None:
    base = logging.getLogger("cuju_libvirt.cujud.daemon")
    assert logsetup.for_domain(base, "vm1").name == "cuju_libvirt.cujud.daemon.vm1"
    child = logsetup.for_domain(base, "web.example.com")
    assert child.name == "cuju_libvirt.cujud.daemon.web_example_com"
    assert child.parent is base


def test_log_failure_one_line_and_traceback_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("cuju_libvirt.test.failure")
    try:
        try:
            raise OSError("socket gone")
        except OSError as cause:
            raise LibvirtError("connecting to libvirt at qemu:///system: failed") from cause
    except LibvirtError as err:
        caplog.set_level(logging.INFO, logger=log.name)
        logsetup.log_failure(log, "pairing vm1", err)
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
            (logging.ERROR,
             "pairing vm1: connecting to libvirt at qemu:///system: failed (cause: socket gone)")
        ]
        assert caplog.records[0].exc_info is None
        caplog.clear()
        caplog.set_level(logging.DEBUG, logger=log.name)
        logsetup.log_failure(log, "pairing vm1", err, level=logging.WARNING)
        assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG]
        assert caplog.records[1].exc_info is not None and caplog.records[1].exc_info[1] is err
