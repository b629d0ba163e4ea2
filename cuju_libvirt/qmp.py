"""A small synchronous QMP client over a UNIX socket (no third-party dependency).

The FT engine stops and continues a protected VM a few hundred times per second on a
*direct* QMP socket (DESIGN.md, "The monitor path"), so this client is built for that
hot path: one connected socket, a reusable receive buffer, pre-encoded requests for
commands without arguments, no sleeps and no threads. It is not thread-safe: one owner
(thread) per client.

Protocol handling:

* After connecting, the greeting is read and ``qmp_capabilities`` is sent (out-of-band
  execution is not enabled).
* Every request carries an ``id``. Replies with another id belong to a request that timed
  out earlier and are dropped, so a timeout leaves the connection usable.
* Commands can be pipelined: :meth:`QMPClient.send` several, then collect each answer with
  :meth:`QMPClient.reply` (in any order); the epoch's pause sends ``stop`` and the
  device-state save back to back this way.
* Asynchronous events are buffered (bounded; the oldest are dropped first and counted in
  :attr:`QMPClient.dropped_events`) and can be read with :meth:`QMPClient.events` or
  awaited with :meth:`QMPClient.wait_event`.
* A file descriptor can travel with a command by ``SCM_RIGHTS`` (``fd=``), as ``getfd``
  and ``add-fd`` require.

Errors (see :mod:`cuju_libvirt.errors`): :class:`QMPError` when QEMU answers with an
error, :class:`QMPConnectionError` when the socket cannot be reached or is closed,
:class:`QMPTimeoutError` when no answer comes in time; all derive from
:class:`~cuju_libvirt.errors.MonitorError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections import deque
from typing import Any

from cuju_libvirt._closing import Closing
from cuju_libvirt.errors import MonitorError, StateError

log = logging.getLogger(__name__)

#: Default deadline (seconds) for one command's reply.
DEFAULT_TIMEOUT = 10.0
#: Default number of buffered events kept before the oldest are dropped.
DEFAULT_EVENT_BUFFER = 4096

_RECV_CHUNK = 64 * 1024


class QMPError(MonitorError):
    """QEMU answered a command with an error.

    ``command`` is the command name, ``error_class`` QEMU's error class (e.g.
    ``GenericError``, ``CommandNotFound``) and ``desc`` its human-readable description.
    """

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP command {command!r} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPConnectionError(MonitorError):
    """The QMP socket could not be reached, or QEMU closed it (QEMU exited or crashed)."""


class QMPTimeoutError(MonitorError):
    """No reply (or event) arrived before the deadline; the connection stays usable."""


class QMPClient(Closing):
    """A connected, negotiated QMP session.

    Construct with the path of QEMU's QMP server socket; the constructor connects, reads the
    greeting and negotiates capabilities within ``connect_timeout`` seconds. Use as a context
    manager or call :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        connect_timeout: float = 5.0,
        timeout: float = DEFAULT_TIMEOUT,
        event_buffer: int = DEFAULT_EVENT_BUFFER,
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.dropped_events = 0
        self.greeting: dict[str, Any] = {}
        self._events: deque[dict[str, Any]] = deque(maxlen=event_buffer)
        self._buf = bytearray()
        self._chunk = bytearray(_RECV_CHUNK)
        self._chunk_view = memoryview(self._chunk)
        self._next_id = 0
        self._prefixes: dict[str, bytes] = {}
        #: Commands sent and not yet answered through :meth:`reply` (id -> name), and the
        #: answers read while waiting for another one.
        self._pending: dict[int, str] = {}
        self._replies: dict[int, dict[str, Any]] = {}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock: socket.socket | None = sock
        deadline = time.monotonic() + connect_timeout
        try:
            sock.settimeout(connect_timeout)
            sock.connect(self.path)
        except OSError as err:
            self._drop_socket()
            raise QMPConnectionError(
                f"cannot connect to QMP socket {self.path}: {err.strerror or err}; "
                "is QEMU running with this monitor socket?"
            ) from err
        try:
            self._negotiate(deadline)
        except BaseException:
            self.close()
            raise

    # -- public API ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._sock is None

    def fileno(self) -> int:
        """The socket's file descriptor (for ``select``/``poll`` on pending events)."""
        return self._require_socket("fileno").fileno()

    def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        fd: int | None = None,
    ) -> Any:
        """Run ``command`` and return its ``return`` value.

        ``fd``, if given, is passed to QEMU with the request by ``SCM_RIGHTS`` (for ``getfd``,
        ``add-fd``); the caller keeps its own copy and may close it afterwards. Raises
        :class:`QMPError` if QEMU refuses the command.
        """
        return self.reply(self.send(command, arguments, fd=fd), timeout=timeout)

    def send(self, command: str, arguments: dict[str, Any] | None = None, *, fd: int | None = None) -> int:
        """Send ``command`` without waiting for its answer; return the id :meth:`reply` takes.

        QEMU runs a monitor's commands one after the other in the order sent, so a second
        command sent before the first one's answer starts without a round trip in between.
        """
        sock = self._require_socket(command)
        self._next_id += 1
        req_id = self._next_id
        if arguments is None:
            prefix = self._prefixes.get(command)
            if prefix is None:
                prefix = b'{"execute":' + json.dumps(command).encode() + b',"id":'
                self._prefixes[command] = prefix
            data = b"%s%d}\n" % (prefix, req_id)
        else:
            msg = {"execute": command, "arguments": arguments, "id": req_id}
            data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        self._send(sock, command, data, fd)
        self._pending[req_id] = command
        return req_id

    def reply(self, req_id: int, *, timeout: float | None = None) -> Any:
        """The ``return`` value of the command :meth:`send` returned ``req_id`` for, waiting
        for it if needed; :class:`QMPError` if QEMU refused it. Answers to other commands
        still awaited are kept for their own call."""
        command = self._pending.get(req_id)
        if command is None:
            raise StateError(f"no QMP command with id {req_id} awaits its answer")
        reply = self._replies.pop(req_id, None)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while reply is None:
                msg = self._read_message(deadline, command)
                if msg.get("id") == req_id and "event" not in msg:
                    reply = msg
                else:
                    self._keep(msg)
        finally:
            self._pending.pop(req_id, None)  # a late answer after a timeout is dropped as stale
        if "return" in reply:
            return reply["return"]
        if "error" in reply:
            error = reply["error"]
            raise QMPError(command, str(error.get("class", "?")), str(error.get("desc", "")))
        raise QMPConnectionError(f"malformed QMP reply to {command!r} from {self.path}: {reply!r}")

    def events(self, name: str | None = None, *, clear: bool = True) -> list[dict[str, Any]]:
        """Buffered events (oldest first), optionally only those called ``name``.

        Events already waiting on the socket are read first, without blocking. With
        ``clear`` (the default) the returned events leave the buffer.
        """
        self._pump()
        if name is None:
            found = list(self._events)
            if clear:
                self._events.clear()
            return found
        found = [ev for ev in self._events if ev["event"] == name]
        if clear and found:
            kept = [ev for ev in self._events if ev["event"] != name]
            self._events.clear()
            self._events.extend(kept)
        return found

    def wait_event(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        """Return (and remove) the oldest buffered event ``name``, waiting for one if needed."""
        for index, event in enumerate(self._events):
            if event["event"] == name:
                del self._events[index]
                return event
        self._require_socket(f"wait for event {name}")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            msg = self._read_message(deadline, f"event {name}")
            if msg.get("event") == name:
                return msg
            self._keep(msg)

    def close(self) -> None:
        """Close the connection; idempotent."""
        self._drop_socket()

    # -- internals ----------------------------------------------------------------------

    def _negotiate(self, deadline: float) -> None:
        try:
            greeting = self._read_message(deadline, "greeting")
        except QMPTimeoutError as err:
            raise QMPConnectionError(
                f"no QMP greeting on {self.path}: QEMU is not ready, or another client holds this "
                "monitor (QEMU serves one client per monitor socket)"
            ) from err
        if "QMP" not in greeting:
            raise QMPConnectionError(f"{self.path} is not a QMP socket: first message was {greeting!r}")
        self.greeting = greeting["QMP"]
        self.execute("qmp_capabilities", timeout=max(deadline - time.monotonic(), 0.0))

    def _require_socket(self, what: str) -> socket.socket:
        if self._sock is None:
            raise QMPConnectionError(f"QMP connection to {self.path} is closed (cannot {what})")
        return self._sock

    def _drop_socket(self) -> None:
        sock, self._sock = self._sock, None
        self._pending.clear()
        self._replies.clear()
        if sock is not None:
            sock.close()

    def _send(self, sock: socket.socket, command: str, data: bytes, fd: int | None) -> None:
        try:
            if fd is None:
                sock.sendall(data)
            else:
                sent = socket.send_fds(sock, [data], [fd])
                if sent < len(data):
                    sock.sendall(data[sent:])
        except OSError as err:
            raise self._lost(f"sending {command!r}", err) from err

    def _lost(self, doing: str, err: OSError | None = None) -> QMPConnectionError:
        """Close the dead connection and describe the loss. Events QEMU wrote before it went
        (e.g. SHUTDOWN, while a command was being sent) are kept: they say why it went."""
        self._salvage_events()
        self._drop_socket()
        how = f"lost ({err.strerror or err})" if err is not None else "closed by QEMU"
        return QMPConnectionError(f"QMP connection to {self.path} {how} while {doing}; did QEMU exit?")

    def _keep(self, msg: dict[str, Any]) -> None:
        """File a message read while waiting for something else: an event into the buffer,
        the answer to a command sent and not yet collected for :meth:`reply`; drop the rest
        (answers to commands that timed out)."""
        if "event" in msg:
            self._store_event(msg)
        elif msg.get("id") in self._pending:
            self._replies[msg["id"]] = msg
        else:
            log.debug("dropping stale QMP reply %r", msg)

    def _salvage_events(self) -> None:
        """Move every complete event still unread (buffered or on the socket) into the buffer."""
        sock = self._sock
        with contextlib.suppress(OSError):
            if sock is not None:
                sock.settimeout(0.0)
                while n := sock.recv_into(self._chunk_view):
                    self._buf += self._chunk_view[:n]
        with contextlib.suppress(QMPConnectionError):
            while (msg := self._next_buffered()) is not None:
                if "event" in msg:
                    self._store_event(msg)

    def _store_event(self, event: dict[str, Any]) -> None:
        if len(self._events) == self._events.maxlen:
            self.dropped_events += 1
        self._events.append(event)

    def _pump(self) -> None:
        """Read whatever is already on the socket into the event buffer, without blocking."""
        sock = self._sock
        if sock is None:
            return
        while True:
            msg = self._next_buffered()
            if msg is None:
                try:
                    sock.settimeout(0.0)
                    n = sock.recv_into(self._chunk_view)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as err:
                    raise self._lost("reading events", err) from err
                if n == 0:
                    raise self._lost("reading events")
                self._buf += self._chunk_view[:n]
                continue
            self._keep(msg)

    def _next_buffered(self) -> dict[str, Any] | None:
        end = self._buf.find(b"\n")
        if end < 0:
            return None
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        try:
            msg = json.loads(line)
        except ValueError as err:
            raise QMPConnectionError(f"malformed QMP message from {self.path}: {line[:200]!r}") from err
        if not isinstance(msg, dict):
            raise QMPConnectionError(f"malformed QMP message from {self.path}: {line[:200]!r}")
        return msg

    def _read_message(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        sock = self._require_socket(f"read {waiting_for}")
        while True:
            msg = self._next_buffered()
            if msg is not None:
                return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPTimeoutError(f"no QMP answer from {self.path} while waiting for {waiting_for}")
            try:
                sock.settimeout(remaining)
                n = sock.recv_into(self._chunk_view)
            except TimeoutError as err:
                raise QMPTimeoutError(
                    f"no QMP answer from {self.path} while waiting for {waiting_for}"
                ) from err
            except OSError as err:
                raise self._lost(f"waiting for {waiting_for}", err) from err
            if n == 0:
                raise self._lost(f"waiting for {waiting_for}")
            self._buf += self._chunk_view[:n]
