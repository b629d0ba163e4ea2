"""virt.py error paths with fakes: classification table, close callback, reconnect with backoff."""

from __future__ import annotations

import threading
import time
from typing import Any

import libvirt
import pytest

from cuju_libvirt.cujud.virt import (
    DOMAIN_EVENTS,
    LibvirtConnection,
    LinkState,
    classify,
    error_class,
    translate,
)
from cuju_libvirt.errors import (
    LibvirtConnectionError,
    LibvirtError,
    LibvirtNotFoundError,
    LibvirtStateError,
    LibvirtUnsupportedError,
)

pytestmark = pytest.mark.timeout(30)


def fake_error(domain: int, code: int, message: str = "injected") -> libvirt.libvirtError:
    err = libvirt.libvirtError(message)
    err.err = (code, domain, message, 2, message, None, None, -1, -1)
    return err


@pytest.mark.parametrize(
    ("domain", "code", "cls"),
    [
        (libvirt.VIR_FROM_DOMAIN, libvirt.VIR_ERR_NO_DOMAIN, LibvirtNotFoundError),
        (libvirt.VIR_FROM_DOMAIN, libvirt.VIR_ERR_NO_DOMAIN_METADATA, LibvirtNotFoundError),
        (libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_OPERATION_INVALID, LibvirtStateError),
        (libvirt.VIR_FROM_NONE, libvirt.VIR_ERR_NO_SUPPORT, LibvirtUnsupportedError),
        (libvirt.VIR_FROM_RPC, libvirt.VIR_ERR_SYSTEM_ERROR, LibvirtConnectionError),
        (libvirt.VIR_FROM_REMOTE, libvirt.VIR_ERR_INTERNAL_ERROR, LibvirtConnectionError),
        (libvirt.VIR_FROM_NONE, libvirt.VIR_ERR_INVALID_CONN, LibvirtConnectionError),
        (libvirt.VIR_FROM_RPC, libvirt.VIR_ERR_AUTH_FAILED, LibvirtError),
        (libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_INTERNAL_ERROR, LibvirtError),
        (libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_OPERATION_FAILED, LibvirtError),
    ],
)
def test_classification_by_domain_and_code(domain: int, code: int, cls: type[LibvirtError]) -> None:
    assert error_class(domain, code) is cls
    # the message text plays no part: a misleading one changes nothing
    err = classify(fake_error(domain, code, "Domain not found: connection lost"), "doing X")
    assert type(err) is cls
    assert (err.domain, err.code) == (domain, code)
    assert str(err).startswith("doing X: ")
    with pytest.raises(cls) as info, translate("doing Y"):
        raise fake_error(domain, code)
    assert isinstance(info.value.__cause__, libvirt.libvirtError)


class FakeConn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.close_cb: Any = None
        self.event_cbs: list[Any] = []
        self.closed = False
        self.keepalive: tuple[int, int] | None = None

    def setKeepAlive(self, interval: int, count: int) -> int:
        self.keepalive = (interval, count)
        return 0

    def registerCloseCallback(self, cb: Any, opaque: Any) -> int:
        self.close_cb = cb
        return 0

    def unregisterCloseCallback(self) -> int:
        self.close_cb = None
        return 0

    def domainEventRegisterAny(self, dom: Any, event_id: int, cb: Any, opaque: Any) -> int:
        self.event_cbs.append(cb)
        return len(self.event_cbs)

    def domainEventDeregisterAny(self, cb_id: int) -> int:
        return 0

    def close(self) -> int:
        self.closed = True
        return 0


class Opener:
    """Fails with the given errors first, then hands out fresh fake connections."""

    def __init__(self, failures: list[libvirt.libvirtError]) -> None:
        self.failures = list(failures)
        self.conns: list[FakeConn] = []
        self.calls: list[float] = []

    def __call__(self, uri: str) -> FakeConn:
        self.calls.append(time.monotonic())
        if self.failures:
            raise self.failures.pop(0)
        conn = FakeConn(f"conn{len(self.conns)}")
        self.conns.append(conn)
        return conn


def rpc_down() -> libvirt.libvirtError:
    return fake_error(libvirt.VIR_FROM_RPC, libvirt.VIR_ERR_SYSTEM_ERROR, "Failed to connect socket")


def test_open_retries_with_growing_backoff() -> None:
    opener = Opener([rpc_down(), rpc_down(), rpc_down()])
    c = LibvirtConnection("qemu:///system", opener=opener, backoff_min=0.05, backoff_max=1.0)
    c.open(timeout=10)
    try:
        assert len(opener.calls) == 4
        gaps = [b - a for a, b in zip(opener.calls, opener.calls[1:], strict=False)]
        assert gaps[0] >= 0.04 and gaps[1] >= 0.09 and gaps[2] >= 0.19  # 0.05, 0.1, 0.2
        assert opener.conns[0].keepalive == (5, 3)
        assert opener.conns[0].close_cb is not None
        assert len(opener.conns[0].event_cbs) == 1 + len(DOMAIN_EVENTS)  # lifecycle and the rest
        assert len(opener.conns[0].event_cbs) == 1 + len(DOMAIN_EVENTS)  # lifecycle and the rest
    finally:
        c.close()
    assert opener.conns[0].closed and c.state is LinkState.CLOSED


def test_close_callback_reconnects_and_reregisters() -> None:
    opener = Opener([])
    c = LibvirtConnection("qemu:///system", opener=opener, backoff_min=0.05, backoff_max=0.2)
    states: list[LinkState] = []
    reconnected = threading.Event()

    def on_state(s: LinkState) -> None:
        states.append(s)
        if s is LinkState.CONNECTED and len(opener.conns) == 2:
            reconnected.set()

    c.add_state_listener(on_state)
    c.open()
    first = opener.conns[0]
    opener.failures = [rpc_down(), rpc_down()]  # libvirtd still down for two attempts
    first.close_cb(first, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, None)
    assert reconnected.wait(5)
    try:
        assert states == [LinkState.CONNECTED, LinkState.DISCONNECTED, LinkState.CONNECTED]
        second = opener.conns[1]
        assert c.conn is second
        assert second.close_cb is not None and len(second.event_cbs) == 1 + len(DOMAIN_EVENTS)
        assert len(opener.calls) == 4  # first open, two failures, success
        assert time.monotonic() - opener.calls[1] < 5
    finally:
        c.close()
    deadline = time.monotonic() + 2
    while not first.closed and time.monotonic() < deadline:  # the lost connection is released
        time.sleep(0.01)
    assert first.closed


def test_reconnect_stops_when_closed() -> None:
    opener = Opener([])
    c = LibvirtConnection("qemu:///system", opener=opener, backoff_min=0.2, backoff_max=0.2)
    c.open()
    opener.failures = [rpc_down() for _ in range(1000)]
    first = opener.conns[0]
    first.close_cb(first, libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE, None)
    time.sleep(0.3)
    start = time.monotonic()
    c.close()
    assert time.monotonic() - start < 1.0  # the backoff sleep is cut short
    calls = len(opener.calls)
    time.sleep(0.5)
    assert len(opener.calls) == calls
    assert c.state is LinkState.CLOSED


def test_keepalive_unsupported_is_fine_other_setup_errors_fail() -> None:
    class NoKeepalive(FakeConn):
        def setKeepAlive(self, interval: int, count: int) -> int:
            raise fake_error(libvirt.VIR_FROM_NONE, libvirt.VIR_ERR_NO_SUPPORT)

    class NoEvents(FakeConn):
        def domainEventRegisterAny(self, *a: Any) -> int:
            raise fake_error(libvirt.VIR_FROM_QEMU, libvirt.VIR_ERR_INTERNAL_ERROR, "boom")

    made: list[FakeConn] = []
    c = LibvirtConnection("x:///", opener=lambda uri: made.append(NoKeepalive("a")) or made[-1])
    c.open()
    assert c.state is LinkState.CONNECTED
    c.close()
    c2 = LibvirtConnection("x:///", opener=lambda uri: made.append(NoEvents("b")) or made[-1])
    with pytest.raises(LibvirtError, match="registering for lifecycle events: boom"):
        c2.open()
    assert made[-1].closed  # nothing half-open left behind
    c2.close()
