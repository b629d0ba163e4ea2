"""virt.py against libvirt's real test:///default driver: events, error classes, retries."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator

import libvirt
import pytest

from cuju_libvirt.cujud.virt import EventLoop, LibvirtConnection, LifecycleEvent, LinkState, translate
from cuju_libvirt.errors import LibvirtConnectionError, LibvirtError, LibvirtNotFoundError
from tests import helpers

pytestmark = pytest.mark.timeout(60)

DOMAIN_XML = ("<domain type='test'><name>{name}</name><memory>1024</memory>"
              "<os><type>hvm</type></os></domain>")


@pytest.fixture
def connection() -> Iterator[LibvirtConnection]:
    c = LibvirtConnection("test:///default")
    c.open()
    yield c
    c.close()


wait_for = functools.partial(helpers.wait_for, timeout=5.0)


def test_lifecycle_events_from_the_test_driver(connection: LibvirtConnection) -> None:
    events: list[LifecycleEvent] = []
    lock = threading.Lock()

    def listener(ev: LifecycleEvent) -> None:
        with lock:
            events.append(ev)

    connection.add_lifecycle_listener(listener)
    assert connection.state is LinkState.CONNECTED
    dom = connection.conn.createXML(DOMAIN_XML.format(name="daemon-ev1"), 0)
    uuid = dom.UUIDString()
    dom.destroy()
    assert wait_for(lambda: len([e for e in events if e.domain == "daemon-ev1"]) >= 2)
    mine = [(e.event_name, e.detail_name) for e in events if e.domain == "daemon-ev1"]
    assert mine == [("STARTED", "BOOTED"), ("STOPPED", "DESTROYED")]
    assert all(e.uuid == uuid for e in events if e.domain == "daemon-ev1")
    assert str(events[-1]) == "daemon-ev1: STOPPED/DESTROYED"


def test_no_events_after_close() -> None:
    c = LibvirtConnection("test:///default")
    c.open()
    seen: list[LifecycleEvent] = []
    c.add_lifecycle_listener(seen.append)
    states: list[LinkState] = []
    c.add_state_listener(states.append)
    c.close()
    assert states == [LinkState.CLOSED]
    with pytest.raises(LibvirtConnectionError, match="not connected"):
        _ = c.conn
    other = libvirt.open("test:///default")
    try:
        other.createXML(DOMAIN_XML.format(name="daemon-ev2"), 0).destroy()
        time.sleep(0.3)
    finally:
        other.close()
    assert [e for e in seen if e.domain == "daemon-ev2"] == []


def test_errors_are_classified_with_the_cause_kept(connection: LibvirtConnection) -> None:
    with pytest.raises(LibvirtNotFoundError, match="looking up daemon-nope: Domain not found") as info, \
            translate("looking up daemon-nope"):
        connection.conn.lookupByName("daemon-nope")
    assert isinstance(info.value.__cause__, libvirt.libvirtError)
    assert (info.value.domain, info.value.code) == (libvirt.VIR_FROM_TEST, libvirt.VIR_ERR_NO_DOMAIN)
    dom = connection.conn.defineXML(DOMAIN_XML.format(name="daemon-meta"))
    try:
        with pytest.raises(LibvirtNotFoundError) as info, translate("reading metadata"):
            dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, "https://cuju-ft.github.io/libvirt/ft/1.0", 0)
        assert info.value.code == libvirt.VIR_ERR_NO_DOMAIN_METADATA
    finally:
        dom.undefine()


def test_unreachable_libvirtd_is_retried_then_reported() -> None:
    c = LibvirtConnection("qemu+unix:///system?socket=/nonexistent/daemon-libvirt-sock",
                          backoff_min=0.05, backoff_max=0.1)
    start = time.monotonic()
    with pytest.raises(LibvirtConnectionError, match=r"connecting to libvirt at .*Failed to connect socket"):
        c.open(timeout=0.5)
    elapsed = time.monotonic() - start
    c.close()
    assert c.attempts >= 3
    assert 0.4 <= elapsed < 3


def test_non_retryable_error_is_raised_at_once() -> None:
    c = LibvirtConnection("test:///nonexistent/daemon-missing.xml", backoff_min=0.05)
    with pytest.raises(LibvirtError) as info:
        c.open(timeout=5)
    assert not isinstance(info.value, LibvirtConnectionError)
    assert c.attempts == 1
    c.close()


def test_event_loop_stops_and_restarts() -> None:


    EventLoop.ensure()
    first = EventLoop._thread
    assert first is not None and first.is_alive()
    EventLoop.stop()
    assert not first.is_alive() and EventLoop._thread is None
    EventLoop.ensure()  # the next connection gets its events again
    c = LibvirtConnection("test:///default")
    c.open()
    seen: list[LifecycleEvent] = []
    c.add_lifecycle_listener(seen.append)
    try:
        c.conn.createXML(DOMAIN_XML.format(name="daemon-ev3"), 0).destroy()
        assert wait_for(lambda: len([e for e in seen if e.domain == "daemon-ev3"]) == 2)
    finally:
        c.close()
