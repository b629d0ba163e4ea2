"""cujud's connection to its local libvirt: keepalive, events, reconnect, error classes.

* :func:`classify` turns a ``libvirt.libvirtError`` into the matching
  :class:`~cuju_libvirt.errors.LibvirtError` subclass by ``(get_error_domain(),
  get_error_code())`` - never by message text - and :func:`translate` does it for a
  block of calls, keeping the libvirt error as ``__cause__``.
* :class:`EventLoop` runs libvirt's default event implementation
  (``virEventRegisterDefaultImpl`` / ``virEventRunDefaultImpl``) in one thread per
  process; keepalive, close callbacks and domain events need it.
* :class:`LibvirtConnection` opens the URI with retries (tenacity, exponential
  backoff), turns keepalive on, registers the lifecycle-event callback, the callbacks of
  :data:`DOMAIN_EVENTS` (devices, jobs, balloon, power management, reset) and the close
  callback, and when libvirtd goes away reconnects in the background, registering
  everything again and telling its listeners (cujud then re-adopts its domains).

Lifecycle and domain-event listeners run in the event-loop thread: they must return
quickly (hand the work to another thread) and must not call libvirt synchronously.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import libvirt
import tenacity

from cuju_libvirt.errors import (
    LibvirtConnectionError,
    LibvirtError,
    LibvirtNotFoundError,
    LibvirtStateError,
    LibvirtUnsupportedError,
)
from cuju_libvirt.logsetup import log_failure

LOG = logging.getLogger(__name__)


# --- error classification ------------------------------------------------------------------------


def _consts(*names: str) -> frozenset[int]:
    """The values of the libvirt constants that exist in this binding (older ones lack some)."""
    return frozenset(int(getattr(libvirt, n)) for n in names if hasattr(libvirt, n))


_NOT_FOUND = _consts(
    "VIR_ERR_NO_DOMAIN", "VIR_ERR_NO_DOMAIN_METADATA", "VIR_ERR_NO_NETWORK", "VIR_ERR_NO_STORAGE_POOL",
    "VIR_ERR_NO_STORAGE_VOL", "VIR_ERR_NO_NODE_DEVICE", "VIR_ERR_NO_DOMAIN_SNAPSHOT",
    "VIR_ERR_NO_INTERFACE", "VIR_ERR_NO_SECRET", "VIR_ERR_NO_NWFILTER", "VIR_ERR_NO_DOMAIN_CHECKPOINT",
)
_STATE = _consts("VIR_ERR_OPERATION_INVALID")
_UNSUPPORTED = _consts("VIR_ERR_NO_SUPPORT", "VIR_ERR_ARGUMENT_UNSUPPORTED", "VIR_ERR_OPERATION_UNSUPPORTED")
_CONNECTION_CODES = _consts("VIR_ERR_INVALID_CONN", "VIR_ERR_RPC")
_CONNECTION_DOMAINS = _consts("VIR_FROM_RPC", "VIR_FROM_REMOTE")
_AUTH = _consts("VIR_ERR_AUTH_FAILED", "VIR_ERR_AUTH_CANCELLED", "VIR_ERR_AUTH_UNAVAILABLE")


def error_class(domain: int | None, code: int | None) -> type[LibvirtError]:
    """The exception class for a libvirt error ``(domain, code)``."""
    if code in _AUTH:
        return LibvirtError  # retrying with the same credentials will not help
    if code in _NOT_FOUND:
        return LibvirtNotFoundError
    if code in _STATE:
        return LibvirtStateError
    if code in _UNSUPPORTED:
        return LibvirtUnsupportedError
    if code in _CONNECTION_CODES or domain in _CONNECTION_DOMAINS:
        return LibvirtConnectionError
    return LibvirtError


def classify(err: libvirt.libvirtError, action: str) -> LibvirtError:
    """``err`` as a LibvirtError subclass whose message says what was being done."""
    domain, code = err.get_error_domain(), err.get_error_code()
    message = err.get_error_message() or str(err) or "unknown libvirt error"
    cls = error_class(domain, code)
    result = cls(f"{action}: {message}", domain=domain, code=code)
    result.__cause__ = err
    return result


@contextlib.contextmanager
def translate(action: str) -> Iterator[None]:
    """Run libvirt calls; a libvirtError leaves as the classified LibvirtError (cause kept)."""
    try:
        yield
    except libvirt.libvirtError as err:
        raise classify(err, action) from err


# --- the event loop ------------------------------------------------------------------------------


class EventLoop:
    """libvirt's default event loop in a daemon thread; one per process, started on demand."""

    _lock = threading.Lock()
    _registered = False
    _thread: threading.Thread | None = None
    _stop = threading.Event()

    @classmethod
    def ensure(cls) -> None:
        """Register the default implementation (once) and make sure the loop thread runs.

        Must happen before the first connection is opened, or that connection gets no
        events, keepalive or close notifications.
        """
        with cls._lock:
            if not cls._registered:
                # libvirt would print every error on stderr; we report them ourselves
                libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
                libvirt.virEventRegisterDefaultImpl()
                cls._registered = True
            if cls._thread is None or not cls._thread.is_alive():
                cls._stop.clear()
                cls._thread = threading.Thread(target=cls._run, name="cujud-libvirt-events", daemon=True)
                cls._thread.start()

    @classmethod
    def _run(cls) -> None:
        while not cls._stop.is_set():
            if libvirt.virEventRunDefaultImpl() < 0:
                LOG.error("libvirt event loop iteration failed")

    @classmethod
    def stop(cls) -> None:
        """Stop the loop thread (tests and shutdown); :meth:`ensure` starts it again."""
        with cls._lock:
            thread = cls._thread
            if thread is None:
                return
            cls._stop.set()
            # wake the loop: a timer that fires at once and removes itself
            libvirt.virEventAddTimeout(0, lambda timer, _opaque: libvirt.virEventRemoveTimeout(timer), None)
            thread.join(5.0)
            cls._thread = None


# --- lifecycle events ----------------------------------------------------------------------------


def _event_names() -> tuple[dict[int, str], dict[int, dict[int, str]]]:
    events: dict[int, str] = {}
    details: dict[int, dict[int, str]] = {}
    prefix = "VIR_DOMAIN_EVENT_"
    for name, value in vars(libvirt).items():
        if name.startswith(prefix) and name.count("_") == 3 and isinstance(value, int) \
                and not name.endswith("_LAST"):
            events[value] = name[len(prefix):]
    for value, ev in events.items():
        sub = f"{prefix}{ev}_"
        details[value] = {v: n[len(sub):] for n, v in vars(libvirt).items()
                          if n.startswith(sub) and isinstance(v, int) and not n.endswith("_LAST")}
    return events, details


_EVENT_NAMES, _DETAIL_NAMES = _event_names()


@dataclass(frozen=True)
class LifecycleEvent:
    """One domain lifecycle event, with libvirt's numbers and their names."""

    domain: str
    uuid: str
    event: int
    detail: int

    @property
    def event_name(self) -> str:
        """E.g. ``STARTED``, ``SUSPENDED``, ``STOPPED``."""
        return _EVENT_NAMES.get(self.event, str(self.event))

    @property
    def detail_name(self) -> str:
        """E.g. ``DESTROYED`` or ``CRASHED`` for ``STOPPED`` (this tells a kill from a shutdown)."""
        return _DETAIL_NAMES.get(self.event, {}).get(self.detail, str(self.detail))

    def __str__(self) -> str:
        return f"{self.domain}: {self.event_name}/{self.detail_name}"


class LinkState(enum.Enum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


@dataclass(frozen=True)
class DomainEvent:
    """One of libvirt's other domain events (:data:`DOMAIN_EVENTS`): what happened to the
    domain while it runs, with the event's own values in ``info``.

    ``kind`` is one of ``device-added``, ``device-removed`` (``info['alias']``),
    ``job-completed`` (``info['operation']``: a ``VIR_DOMAIN_JOB_OPERATION_*`` name such as
    ``SNAPSHOT``), ``block-job`` (``info['disk']``, ``info['type']`` such as ``COPY``,
    ``info['status']`` such as ``COMPLETED``), ``balloon-change`` (``info['actual_kib']``),
    ``pm-suspend``, ``pm-wakeup``, ``reboot``, ``memory-device-size-change``
    (``info['alias']``).
    """

    domain: str
    uuid: str
    kind: str
    info: dict[str, Any]

    def __str__(self) -> str:
        values = ", ".join(f"{k}={v}" for k, v in sorted(self.info.items()))
        return f"{self.domain}: {self.kind}{f' ({values})' if values else ''}"


def _names(prefix: str) -> dict[int, str]:
    return {int(v): n[len(prefix):] for n, v in vars(libvirt).items()
            if n.startswith(prefix) and isinstance(v, int) and not n.endswith("_LAST")}


_JOB_OPERATIONS = _names("VIR_DOMAIN_JOB_OPERATION_")
_BLOCK_JOB_TYPES = _names("VIR_DOMAIN_BLOCK_JOB_TYPE_")
_BLOCK_JOB_STATUS = {int(getattr(libvirt, f"VIR_DOMAIN_BLOCK_JOB_{n}")): n
                     for n in ("COMPLETED", "FAILED", "CANCELED", "READY")}


def _job_info(params: dict[str, Any]) -> dict[str, Any]:
    operation = params.get(getattr(libvirt, "VIR_DOMAIN_JOB_OPERATION", "operation"))
    name = _JOB_OPERATIONS.get(operation, "UNKNOWN") if isinstance(operation, int) else "UNKNOWN"
    return {"operation": name}


#: The domain events cujud subscribes to besides the lifecycle: libvirt's event id name,
#: the :attr:`DomainEvent.kind`, and how the callback's own arguments (after ``conn, dom``
#: and before ``opaque``) become :attr:`DomainEvent.info`. Events this binding lacks are skipped.
DOMAIN_EVENTS: tuple[tuple[str, str, Callable[..., dict[str, Any]]], ...] = (
    ("VIR_DOMAIN_EVENT_ID_DEVICE_ADDED", "device-added", lambda alias: {"alias": alias}),
    ("VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED", "device-removed", lambda alias: {"alias": alias}),
    ("VIR_DOMAIN_EVENT_ID_JOB_COMPLETED", "job-completed", _job_info),
    ("VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2", "block-job", lambda disk, kind, status: {
        "disk": disk, "type": _BLOCK_JOB_TYPES.get(kind, str(kind)),
        "status": _BLOCK_JOB_STATUS.get(status, str(status))}),
    ("VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE", "balloon-change", lambda actual: {"actual_kib": actual}),
    ("VIR_DOMAIN_EVENT_ID_PMSUSPEND", "pm-suspend", lambda reason: {}),
    ("VIR_DOMAIN_EVENT_ID_PMSUSPEND_DISK", "pm-suspend", lambda reason: {"disk": True}),
    ("VIR_DOMAIN_EVENT_ID_PMWAKEUP", "pm-wakeup", lambda reason: {}),
    ("VIR_DOMAIN_EVENT_ID_REBOOT", "reboot", lambda: {}),
    ("VIR_DOMAIN_EVENT_ID_MEMORY_DEVICE_SIZE_CHANGE", "memory-device-size-change",
     lambda alias, size: {"alias": alias, "size_kib": size}),
)


LifecycleListener = Callable[[LifecycleEvent], None]
DomainListener = Callable[[DomainEvent], None]
StateListener = Callable[[LinkState], None]

_CLOSE_REASONS = {
    getattr(libvirt, "VIR_CONNECT_CLOSE_REASON_ERROR", 0): "I/O error",
    getattr(libvirt, "VIR_CONNECT_CLOSE_REASON_EOF", 1): "libvirtd closed the connection",
    getattr(libvirt, "VIR_CONNECT_CLOSE_REASON_KEEPALIVE", 2): "keepalive timeout",
    getattr(libvirt, "VIR_CONNECT_CLOSE_REASON_CLIENT", 3): "closed by this client",
}


class LibvirtConnection:
    """A libvirt connection that keeps itself alive and re-opens when libvirtd returns."""

    def __init__(
        self, uri: str, *, keepalive_interval: int = 5, keepalive_count: int = 3,
        backoff_min: float = 0.5, backoff_max: float = 30.0,
        opener: Callable[[str], Any] = libvirt.open,
    ) -> None:
        self.uri = uri
        self.keepalive_interval = keepalive_interval
        self.keepalive_count = keepalive_count
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._opener = opener
        self._conn: Any = None
        self._callback_ids: list[int] = []
        self._lifecycle: list[LifecycleListener] = []
        self._domain_listeners: list[DomainListener] = []
        self._state_listeners: list[StateListener] = []
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._reconnector: threading.Thread | None = None
        self.state = LinkState.DISCONNECTED
        self.attempts = 0

    # --- listeners ---

    def add_lifecycle_listener(self, listener: LifecycleListener) -> None:
        self._lifecycle.append(listener)

    def add_domain_listener(self, listener: DomainListener) -> None:
        """``listener(event)`` for every :data:`DOMAIN_EVENTS` event, in the event-loop thread."""
        self._domain_listeners.append(listener)

    def add_state_listener(self, listener: StateListener) -> None:
        self._state_listeners.append(listener)

    def _set_state(self, state: LinkState) -> None:
        self.state = state
        for listener in list(self._state_listeners):
            try:
                listener(state)
            except Exception as err:
                log_failure(LOG, "libvirt state listener", err)

    # --- opening ---

    @property
    def conn(self) -> Any:
        """The live ``virConnect``; LibvirtConnectionError while disconnected."""
        conn = self._conn
        if conn is None:
            raise LibvirtConnectionError(f"not connected to libvirt at {self.uri} (reconnecting)")
        return conn

    def _open_once(self) -> None:
        self.attempts += 1
        with translate(f"connecting to libvirt at {self.uri}"):
            conn = self._opener(self.uri)
        try:
            try:
                with translate("enabling keepalive"):
                    conn.setKeepAlive(self.keepalive_interval, self.keepalive_count)
            except LibvirtUnsupportedError:
                LOG.debug("%s: no keepalive for this driver (a local connection)", self.uri)
            with translate("registering the close callback"):
                conn.registerCloseCallback(self._on_close, None)
            with translate("registering for lifecycle events"):
                ids = [conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None
                )]
            for id_name, kind, info in DOMAIN_EVENTS:
                if not hasattr(libvirt, id_name):
                    continue
                with translate(f"registering for {kind} events"):
                    ids.append(conn.domainEventRegisterAny(
                        None, getattr(libvirt, id_name), self._domain_callback(kind, info), None))
        except LibvirtError:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
            raise
        with self._lock:
            self._conn, self._callback_ids = conn, ids
        LOG.info("connected to libvirt at %s", self.uri)
        self._set_state(LinkState.CONNECTED)

    def _retrying(self, timeout: float | None) -> tenacity.Retrying:
        stops: list[Any] = [lambda _rs: self._closing.is_set()]
        if timeout is not None:
            stops.append(tenacity.stop_after_delay(timeout))
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(LibvirtConnectionError),
            wait=tenacity.wait_exponential(
                multiplier=self.backoff_min, min=self.backoff_min, max=self.backoff_max
            ),
            stop=tenacity.stop_any(*stops),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )

    def _sleep(self, seconds: float) -> None:
        self._closing.wait(seconds)  # close() cuts a backoff short

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        LOG.warning("libvirt at %s unreachable (%s); retrying in %.1f s", self.uri, err, delay)

    def open(self, timeout: float | None = 0.0) -> None:
        """Connect; retry while libvirtd is unreachable, for up to ``timeout`` s (None: forever).

        Errors that retrying will not cure (bad URI, authentication) are raised at once.
        """
        EventLoop.ensure()
        self._closing.clear()
        if timeout == 0.0:
            self._open_once()
        else:
            self._retrying(timeout)(self._open_once)

    def open_in_background(self) -> None:
        """Connect (or keep retrying) in a background thread; listeners learn the outcome."""
        EventLoop.ensure()
        self._closing.clear()
        self._start_reconnector()

    # --- losing the connection ---

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        # in the event-loop thread: record and hand the work to another thread
        LOG.warning("connection to libvirt at %s lost: %s", self.uri, _CLOSE_REASONS.get(reason, reason))
        with self._lock:
            lost, self._conn, self._callback_ids = self._conn, None, []
        if lost is not None:
            # drop our reference outside the event loop thread (unref may call back into it)
            threading.Thread(target=self._drop, args=(lost,), daemon=True).start()
        self._set_state(LinkState.DISCONNECTED)
        if not self._closing.is_set():
            self._start_reconnector()

    @staticmethod
    def _drop(conn: Any) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def _start_reconnector(self) -> None:
        with self._lock:
            if self._reconnector is not None and self._reconnector.is_alive():
                return
            self._reconnector = threading.Thread(target=self._reconnect, name="cujud-libvirt-reconnect",
                                                 daemon=True)
            self._reconnector.start()

    def _reconnect(self) -> None:
        try:
            self._retrying(None)(self._open_once)
        except LibvirtError as err:
            if not self._closing.is_set():
                log_failure(LOG, f"reconnecting to libvirt at {self.uri} gave up", err)

    def _on_event(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        try:
            ev = LifecycleEvent(dom.name(), dom.UUIDString(), event, detail)
        except libvirt.libvirtError as err:
            LOG.debug("lifecycle event for a vanished domain: %s", err)
            return
        LOG.debug("lifecycle event %s", ev)
        for listener in list(self._lifecycle):
            try:
                listener(ev)
            except Exception as err:
                log_failure(LOG, f"lifecycle listener for {ev}", err)

    def _domain_callback(self, kind: str, info: Callable[..., dict[str, Any]]) -> Callable[..., None]:
        def callback(_conn: Any, dom: Any, *args: Any) -> None:
            try:
                ev = DomainEvent(dom.name(), dom.UUIDString(), kind, info(*args[:-1]))
            except libvirt.libvirtError as err:
                LOG.debug("%s event for a vanished domain: %s", kind, err)
                return
            LOG.debug("domain event %s", ev)
            for listener in list(self._domain_listeners):
                try:
                    listener(ev)
                except Exception as err:
                    log_failure(LOG, f"domain listener for {ev}", err)
        return callback

    # --- closing ---

    def close(self) -> None:
        """Deregister everything and close; no reconnection afterwards."""
        self._closing.set()
        reconnector = self._reconnector
        if reconnector is not None and reconnector is not threading.current_thread():
            reconnector.join(5.0)
        with self._lock:
            conn, ids, self._conn, self._callback_ids = self._conn, self._callback_ids, None, []
        if conn is not None:
            for cb in ids:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.domainEventDeregisterAny(cb)
            with contextlib.suppress(libvirt.libvirtError):
                conn.unregisterCloseCallback()
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        self._set_state(LinkState.CLOSED)
