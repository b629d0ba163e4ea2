"""The local control socket of cujud, used by the libvirt hook and the CLI.

A UNIX stream socket (``control_socket``, mode 0600, root only) carrying JSON lines:
one request per line, one response per line, any number per connection::

    -> {"v": 1, "id": 7, "method": "ping", "params": {}}
    <- {"v": 1, "id": 7, "ok": true, "result": {"node": "host-a"}}
    <- {"v": 1, "id": 7, "ok": false, "error": {"code": "unknown-method", "message": "..."}}

``v`` is the envelope version (:data:`VERSION`); a request with another version is
answered with the error ``unsupported-version``. Error codes: ``bad-request``,
``unsupported-version``, ``unknown-method``, ``refused`` (the handler declined; the
message says why), ``internal``, ``permission-denied``. Lines are capped at
:data:`MAX_LINE` bytes. The peer's credentials (``SO_PEERCRED``) are checked on
every connection: only root (or the uids the server was told to allow) may talk.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cuju_libvirt._closing import Closing
from cuju_libvirt.errors import ControlError, CujuError
from cuju_libvirt.logsetup import log_failure

LOG = logging.getLogger(__name__)

VERSION = 1
MAX_LINE = 1 << 20
START_HINT = "start it with 'systemctl start cujud' (or 'cujud --config FILE' in the foreground)"

Params = dict[str, Any]
Handler = Callable[[Params], Mapping[str, Any]]

_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a UNIX socket."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def _error(rid: object, code: str, message: str) -> dict[str, Any]:
    return {"v": VERSION, "id": rid, "ok": False, "error": {"code": code, "message": message}}


class ControlServer:
    """Serves the control socket, dispatching each request to a registered handler.

    Handlers take the request's ``params`` and return the result mapping; a
    :class:`CujuError` becomes a ``refused`` answer with its message, any other
    exception an ``internal`` one (logged, traceback at DEBUG).
    """

    def __init__(
        self, path: Path, handlers: Mapping[str, Handler] | None = None, *,
        allowed_uids: frozenset[int] = frozenset({0}), idle_timeout: float = 30.0,
    ) -> None:
        self.path = path
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.allowed_uids = allowed_uids
        self.idle_timeout = idle_timeout
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._sock = self._bind(path)
        self._inode = os.stat(path).st_ino
        self._thread = threading.Thread(target=self._accept_loop, name="cujud-control", daemon=True)
        self._thread.start()
        LOG.info("control socket listening at %s", path)

    def register(self, method: str, handler: Handler) -> None:
        self.handlers[method] = handler

    @staticmethod
    def _bind(path: Path) -> socket.socket:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(info.st_mode):
                raise ControlError(
                    f"{path} exists and is not a socket; remove it or set another control_socket"
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except OSError:
                LOG.info("removing stale control socket %s", path)
                path.unlink()
            else:
                raise ControlError(f"another cujud is already running: it answers on {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is never reachable by others, not even briefly
        try:
            sock.bind(str(path))
        except OSError as err:
            sock.close()
            raise ControlError(f"cannot create the control socket {path}: {err.strerror}") from err
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(16)
        return sock

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), name="cujud-control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)
        try:
            pid, uid, _ = peer_credentials(conn)
            if uid not in self.allowed_uids:
                LOG.warning("control socket: refused pid %d uid %d (root only)", pid, uid)
                self._write(conn, _error(None, "permission-denied",
                                         f"only root may use the cujud control socket (you are uid {uid})"))
                return
            conn.settimeout(self.idle_timeout)
            reader = conn.makefile("rb")
            while not self._closed.is_set():
                line = reader.readline(MAX_LINE + 1)
                if not line:
                    return
                if len(line) > MAX_LINE and not line.endswith(b"\n"):
                    self._write(conn, _error(None, "bad-request", f"request longer than {MAX_LINE} bytes"))
                    return
                self._write(conn, self._answer(line))
        except (OSError, ValueError) as err:  # timeouts, resets, a socket closed under us
            LOG.debug("control connection ended: %s", err)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    @staticmethod
    def _write(conn: socket.socket, reply: dict[str, Any]) -> None:
        conn.sendall(json.dumps(reply, separators=(",", ":")).encode() + b"\n")

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return _error(None, "bad-request", f"not a JSON line: {err}")
        if not isinstance(req, dict):
            return _error(None, "bad-request", "a request is a JSON object")
        rid = req.get("id")
        if req.get("v") != VERSION:
            return _error(rid, "unsupported-version",
                          f"this cujud speaks control protocol version {VERSION}, got {req.get('v')!r}")
        method, params = req.get("method"), req.get("params", {})
        if not isinstance(method, str) or not isinstance(params, dict):
            return _error(rid, "bad-request", "'method' must be a string and 'params' an object")
        handler = self.handlers.get(method)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return _error(rid, "unknown-method", f"cujud has no method {method!r} (it has: {known})")
        try:
            result = dict(handler(params))
        except CujuError as err:
            LOG.debug("control %s refused: %s", method, err)
            return _error(rid, "refused", str(err))
        except Exception as err:
            log_failure(LOG, f"control method {method!r}", err)
            return _error(rid, "internal", f"internal error in {method!r}; see the cujud log")
        return {"v": VERSION, "id": rid, "ok": True, "result": result}

    def close(self) -> None:
        """Stop serving and remove the socket file (if it is still ours)."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(2.0)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()


class ControlClient(Closing):
    """Talks to cujud over its control socket; one connection, reused for every call."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._reader: Any = None

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except FileNotFoundError:
            sock.close()
            raise ControlError(f"cujud is not running: no socket at {self.path}; {START_HINT}") from None
        except ConnectionRefusedError:
            sock.close()
            raise ControlError(
                f"cujud is not running: {self.path} is a stale socket nobody listens on; {START_HINT}"
            ) from None
        except PermissionError:
            sock.close()
            raise ControlError(f"permission denied on {self.path}: the control socket is for root") from None
        except OSError as err:
            sock.close()
            raise ControlError(f"cannot connect to cujud at {self.path}: {err.strerror or err}") from err
        self._sock, self._reader = sock, sock.makefile("rb")
        return sock

    def call(self, method: str, params: Params | None = None) -> dict[str, Any]:
        """Send one request and return its result; ControlError for every failure."""
        sock = self._connect()
        rid = next(self._ids)
        line = json.dumps({"v": VERSION, "id": rid, "method": method, "params": params or {}}).encode()
        try:
            sock.sendall(line + b"\n")
            raw = self._reader.readline(MAX_LINE + 1)
        except TimeoutError:
            self.close()
            raise ControlError(f"cujud did not answer {method!r} within {self.timeout:g} s") from None
        except OSError as err:
            self.close()
            raise ControlError(f"connection to cujud lost during {method!r}: {err.strerror or err}") from err
        if not raw:
            self.close()
            raise ControlError(f"cujud closed the connection during {method!r}")
        try:
            reply = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            self.close()
            raise ControlError(f"cujud sent a malformed answer to {method!r}") from err
        if not isinstance(reply, dict):
            raise ControlError(f"cujud sent a malformed answer to {method!r}")
        if reply.get("ok") is True and isinstance(reply.get("result"), dict):
            return reply["result"]  # type: ignore[no-any-return]
        error = reply.get("error")
        if not isinstance(error, dict):
            error = {}
        code = str(error.get("code", "unknown"))
        raise ControlError(f"cujud: {method}: {error.get('message', 'error without a message')}", code=code)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._reader = None
