"""The chardev server of a protected domain: holds its serial output per epoch, outside cujud.

A prepared ``<serial>``/``<console>`` (:mod:`cuju_libvirt.chardev_xml`) is a UNIX socket
that QEMU connects to, ``/run/cuju-libvirt/chardev/<uuid>/<key>.sock``. This process (one
per domain and host, all its chardevs) accepts QEMU there, feeds every byte QEMU writes
into a :class:`~cuju_libvirt.chardev_hold.HeldStream` and writes what the stream releases
to the user's own target: the file, pty, UNIX or TCP socket of the original element (and
its ``<log>`` file). What the user types goes to QEMU at once (input is never held).

Who starts it: the libvirt hook at ``prepare`` (before QEMU starts; the hook tells it
nothing about epochs), so the VM's console works whether cujud runs or not, and the
server is no child of the hook, cujud or libvirtd: it outlives a cujud restart with its
held bytes. cujud's engine drives it over ``control.sock`` in the same directory, one
JSON line per request and per answer:

==================================  =========================================================
request                             effect
==================================  =========================================================
``{"op": "cut", "epoch": N}``       VM stopped: read every byte QEMU has written (the
                                    sockets are drained until they would block), then close
                                    epoch N (the first cut of a passing stream releases)
``{"op": "commit", "epoch": N}``    the backup has N: release every epoch up to N
``{"op": "settle", "epoch": N}``    the backup resumed from N: release up to N, drop the rest
``{"op": "release-all"}``           protection ends here: release everything, pass again
``{"op": "status"}``                held epochs and bytes per chardev
``{"op": "finish"}``                QEMU is gone (the hook's ``release``): exit as soon as
                                    nothing is held (at once if nothing is)
==================================  =========================================================

Every answer is ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. The hook's
``release`` sends ``finish``: a crashed primary's server keeps the unacknowledged tail
until cujud settles it with the epoch the backup resumed from.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import termios
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cuju_libvirt._closing import Closing
from cuju_libvirt.chardev_hold import HeldStream
from cuju_libvirt.chardev_xml import CHARDEV_SOCKET_DIR, ChardevTarget
from cuju_libvirt.errors import CujuError, StateError

log = logging.getLogger(__name__)

#: Bytes waiting for a slow socket target before the oldest are dropped (QEMU's own socket
#: chardevs drop what an unconnected peer cannot take, too).
TARGET_BACKLOG = 1 << 20
_READ = 65536


class ChardevServerError(CujuError):
    """A domain's chardev server could not be started, reached or stopped."""


@dataclass(frozen=True)
class ServerPaths:
    """Where the chardev server of one domain keeps its sockets, config and pid file."""

    directory: str

    @classmethod
    def of(cls, uuid: str) -> ServerPaths:
        return cls(f"{CHARDEV_SOCKET_DIR}/{uuid.lower()}")

    @property
    def control(self) -> str:
        return f"{self.directory}/control.sock"

    @property
    def pidfile(self) -> str:
        return f"{self.directory}/server.pid"

    @property
    def config(self) -> str:
        return f"{self.directory}/server.json"

    def socket(self, key: str) -> str:
        return f"{self.directory}/{key}.sock"

    def pty_link(self, key: str) -> str:
        return f"{self.directory}/{key}.pty"


# --- targets: where released bytes go, where input comes from ------------------------------------


class _Target:
    """One place released bytes are written to (and, for sockets and ptys, input read from)."""

    def fileno(self) -> int | None:
        """A descriptor to watch for input (None: output only)."""
        return None

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def read(self) -> bytes:
        return b""

    def close(self) -> None:
        pass


class _FileTarget(_Target):
    """A file, opened (and, without ``append``, truncated as QEMU does) at the first byte
    released: a standby's server leaves the file of the host it waits on alone until it
    takes over."""

    def __init__(self, path: str, append: bool) -> None:
        self.path, self.append = path, append
        self.fd: int | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.fd is None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if self.append else os.O_TRUNC)
            self.fd = os.open(self.path, flags, 0o600)
            if not self.append:
                os.lseek(self.fd, 0, os.SEEK_END)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)


class _PtyTarget(_Target):
    """A pty of the server's own (its name in ``<key>.pty``, a symlink): like QEMU's, output
    nobody reads is dropped once the pty's buffer is full."""

    def __init__(self, link: str) -> None:
        self.master, self.slave = os.openpty()  # the slave stays open: no EIO/HUP storm
        os.set_blocking(self.master, False)
        tty.setraw(self.slave, termios.TCSANOW)
        self.name = os.ttyname(self.slave)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        os.symlink(self.name, link)
        self.link = link

    def fileno(self) -> int | None:
        return self.master

    def write(self, data: bytes) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.master, data)

    def read(self) -> bytes:
        try:
            return os.read(self.master, _READ)
        except (BlockingIOError, OSError):
            return b""

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self.link)


class _SocketTarget(_Target):
    """The user's UNIX or TCP socket: ``bind`` listens for one client at a time (a new one
    replaces the old), ``connect`` connects (again, once a second, while it is not)."""

    def __init__(self, target: ChardevTarget) -> None:
        self.t = target
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.backlog = bytearray()
        self.next_try = 0.0
        if target.mode == "bind":
            if target.kind == "unix":
                assert target.path is not None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target.path)
                self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.listener.bind(target.path)
            else:
                info = socket.getaddrinfo(target.host or "0.0.0.0", target.service,
                                          type=socket.SOCK_STREAM)[0]
                self.listener = socket.socket(info[0], socket.SOCK_STREAM)
                self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self.listener.bind(info[4])
            self.listener.listen(4)
            self.listener.setblocking(False)
        else:
            self._connect()

    def _connect(self) -> None:
        """Start connecting without waiting (the server's one thread answers every pause): a
        TCP connect completes in the background (sends wait in the backlog meanwhile), a target
        that cannot take it now (refused, backlog full) is tried again in a second."""
        self.next_try = time.monotonic() + 1.0
        address: Any
        try:
            if self.t.kind == "unix":
                assert self.t.path is not None
                family, address = socket.AF_UNIX, self.t.path
            else:
                info = socket.getaddrinfo(self.t.host or "localhost", self.t.service,
                                          type=socket.SOCK_STREAM)[0]
                family, address = info[0], info[4]
        except OSError as err:
            log.debug("%s: cannot resolve (%s); trying again", self.t.describe(), err)
            return
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            log.debug("%s: cannot connect (%s); trying again", self.t.describe(), os.strerror(code))
            sock.close()
            return
        self.conn = sock

    def fileno(self) -> int | None:
        if self.conn is not None:
            return self.conn.fileno()
        return self.listener.fileno() if self.listener is not None else None

    def write(self, data: bytes) -> None:
        if self.conn is None and self.listener is None and time.monotonic() >= self.next_try:
            self._connect()
        if self.conn is None:
            return  # nobody connected: dropped, as QEMU's own socket chardev does
        self.backlog += data
        self.flush()

    def flush(self) -> None:
        if self.conn is None:
            return
        while self.backlog:
            try:
                sent = self.conn.send(self.backlog)
            except BlockingIOError:
                break
            except OSError:
                self._lost()
                return
            del self.backlog[:sent]
        if len(self.backlog) > TARGET_BACKLOG:
            del self.backlog[: len(self.backlog) - TARGET_BACKLOG]

    def read(self) -> bytes:
        if self.conn is None:
            assert self.listener is not None
            with contextlib.suppress(BlockingIOError):
                conn, _ = self.listener.accept()
                conn.setblocking(False)
                self.conn = conn
            return b""
        try:
            data = self.conn.recv(_READ)
        except BlockingIOError:
            return b""
        except OSError:
            data = b""
        if not data:
            self._lost()
        return data

    def _lost(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.backlog.clear()

    def close(self) -> None:
        self._lost()
        if self.listener is not None:
            self.listener.close()
            if self.t.kind == "unix" and self.t.path:
                with contextlib.suppress(OSError):
                    os.unlink(self.t.path)


def _open_targets(target: ChardevTarget, paths: ServerPaths, key: str) -> list[_Target]:
    opened: list[_Target] = []
    if target.kind == "file":
        assert target.path is not None
        opened.append(_FileTarget(target.path, target.append))
    elif target.kind == "pty":
        opened.append(_PtyTarget(paths.pty_link(key)))
    elif target.kind in ("unix", "tcp"):
        opened.append(_SocketTarget(target))
    if target.log is not None:
        opened.append(_FileTarget(target.log, target.log_append))
    return opened


# --- the server -----------------------------------------------------------------------------------


class _Chardev:
    """One chardev: QEMU's socket, its held stream and its targets."""

    def __init__(self, key: str, target: ChardevTarget, paths: ServerPaths,
                 owner: tuple[int, int] | None) -> None:
        self.key = key
        self.stream = HeldStream()
        self.targets = _open_targets(target, paths, key)
        path = paths.socket(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        os.chmod(path, 0o600)
        if owner is not None:
            os.chown(path, *owner)
        self.listener.listen(2)
        self.listener.setblocking(False)
        self.qemu: socket.socket | None = None

    def release(self, data: bytes) -> None:
        if data:
            for t in self.targets:
                t.write(data)

    def drain(self) -> bool:
        """Read what QEMU has written until the socket would block; False once QEMU is gone."""
        while self.qemu is not None:
            try:
                data = self.qemu.recv(_READ)
            except BlockingIOError:
                return True
            except OSError:
                data = b""
            if not data:
                self.qemu.close()
                self.qemu = None
                return False
            self.release(self.stream.write(data))
        return False

    def to_qemu(self, data: bytes) -> None:
        if data and self.qemu is not None:
            with contextlib.suppress(OSError):
                self.qemu.setblocking(True)
                self.qemu.sendall(data)
                self.qemu.setblocking(False)

    def close(self) -> None:
        for t in self.targets:
            t.close()
        if self.qemu is not None:
            self.qemu.close()
        self.listener.close()


class Server:
    """The event loop of one domain's chardev server (single-threaded)."""

    def __init__(self, paths: ServerPaths, chardevs: dict[str, ChardevTarget],
                 owner: tuple[int, int] | None = None) -> None:
        self.paths = paths
        self.devs = {key: _Chardev(key, t, paths, owner) for key, t in chardevs.items()}
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.control)
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.control.bind(paths.control)
        os.chmod(paths.control, 0o600)
        self.control.listen(8)
        self.control.setblocking(False)
        self.finishing = False
        self.done = False
        self.sel = selectors.DefaultSelector()
        self.clients: dict[socket.socket, bytearray] = {}

    def held_bytes(self) -> int:
        return sum(d.stream.held_bytes for d in self.devs.values())

    def serve(self) -> None:
        while not self.done:
            self._watch()
            for key, _ in self.sel.select(1.0):
                self._ready(key.data)
            for dev in self.devs.values():
                for t in dev.targets:
                    if isinstance(t, _SocketTarget):
                        t.flush()
            if self.finishing and self.held_bytes() == 0:
                self.done = True
        self.close()

    def _watch(self) -> None:
        self.sel.close()
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.control, selectors.EVENT_READ, ("control", None))
        for client in self.clients:
            self.sel.register(client, selectors.EVENT_READ, ("client", client))
        for dev in self.devs.values():
            if dev.qemu is None:
                self.sel.register(dev.listener, selectors.EVENT_READ, ("accept", dev))
            else:
                self.sel.register(dev.qemu, selectors.EVENT_READ, ("qemu", dev))
            for t in dev.targets:
                fd = t.fileno()
                if fd is not None:
                    self.sel.register(fd, selectors.EVENT_READ, ("target", (dev, t)))

    def _ready(self, data: tuple[str, Any]) -> None:
        kind, obj = data
        if kind == "control":
            with contextlib.suppress(BlockingIOError):
                conn, _ = self.control.accept()
                conn.setblocking(False)
                self.clients[conn] = bytearray()
        elif kind == "client":
            self._client(obj)
        elif kind == "accept":
            with contextlib.suppress(BlockingIOError):
                conn, _ = obj.listener.accept()
                conn.setblocking(False)
                obj.qemu = conn
        elif kind == "qemu":
            obj.drain()
        elif kind == "target":
            dev, target = obj
            dev.to_qemu(target.read())

    def _client(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(_READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            del self.clients[conn]
            conn.close()
            return
        buf = self.clients[conn]
        buf += data
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            answer = self.handle(line)
            conn.setblocking(True)
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(answer).encode() + b"\n")
            conn.setblocking(False)

    def handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            op = request["op"]
            if op in ("cut", "commit", "settle"):
                epoch = int(request["epoch"])
                for dev in self.devs.values():
                    dev.drain()  # every byte written before this request is QEMU's past
                    dev.release(getattr(dev.stream, op)(epoch))
            elif op == "release-all":
                for dev in self.devs.values():
                    dev.drain()
                    dev.release(dev.stream.release_all())
            elif op == "finish":
                self.finishing = True
            elif op != "status":
                raise ValueError(f"unknown op {op!r}")
        except (ValueError, KeyError, TypeError, StateError) as err:
            return {"ok": False, "error": str(err)}
        return {"ok": True, "chardevs": {
            key: {"holding": d.stream.holding, "held_epochs": d.stream.held_epochs,
                  "held_bytes": d.stream.held_bytes, "released_bytes": d.stream.released_bytes,
                  "dropped_bytes": d.stream.dropped_bytes, "qemu_connected": d.qemu is not None,
                  "finished": d.stream.finished}
            for key, d in self.devs.items()}}

    def close(self) -> None:
        self.sel.close()
        for conn in self.clients:
            conn.close()
        self.control.close()
        for dev in self.devs.values():
            dev.close()
        for path in [self.paths.control, *(self.paths.socket(k) for k in self.devs)]:
            with contextlib.suppress(OSError):
                os.unlink(path)


# --- the client, and starting and stopping the process ------------------------------------------


class ChardevClient(Closing):
    """A connection to one domain's chardev server (cujud's engine, the hook, tests)."""

    def __init__(self, control: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(control)
        except OSError as err:
            self.sock.close()
            raise ChardevServerError(f"cannot reach the chardev server at {control}: {err.strerror}") from err
        self.buf = b""

    def call(self, op: str, **params: Any) -> dict[str, Any]:
        try:
            self.sock.sendall(json.dumps({"op": op, **params}).encode() + b"\n")
            while b"\n" not in self.buf:
                data = self.sock.recv(_READ)
                if not data:
                    raise ChardevServerError(f"the chardev server closed the connection during {op!r}")
                self.buf += data
        except OSError as err:
            raise ChardevServerError(f"chardev server, {op!r}: {err}") from err
        line, _, self.buf = self.buf.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise ChardevServerError(f"chardev server refused {op!r}: {answer.get('error')}")
        return answer

    def close(self) -> None:
        self.sock.close()


def _read_pid(paths: ServerPaths) -> int | None:
    try:
        return int(Path(paths.pidfile).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _is_our_server(pid: int, paths: ServerPaths) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return __name__.encode() in argv and paths.config.encode() in argv


def running_pid(paths: ServerPaths) -> int | None:
    """The pid of the live server of these paths, or None."""
    pid = _read_pid(paths)
    return pid if pid is not None and _is_our_server(pid, paths) else None


def start(paths: ServerPaths, chardevs: dict[str, ChardevTarget], *, owner: tuple[int, int] | None = None,
          timeout: float = 10.0) -> int:
    """Start (or find running) the server of a domain's prepared chardevs; its pid once it accepts.

    ``owner`` (uid, gid) gets QEMU's sockets. Idempotent: a live server is kept (a second
    ``prepare``, or a crashed primary's server still holding its tail).
    """
    pid = running_pid(paths)
    if pid is not None:
        return pid
    Path(paths.directory).mkdir(parents=True, exist_ok=True, mode=0o755)
    os.chmod(paths.directory, 0o755)
    Path(paths.config).write_text(json.dumps({
        "chardevs": {k: t.to_json() for k, t in chardevs.items()},
        "owner": list(owner) if owner is not None else None,
    }))
    for stale in (paths.control, paths.pidfile):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    err_path = f"{paths.directory}/server.err"
    with open(err_path, "wb") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", __name__, paths.config], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err_file, start_new_session=True,
                                close_fds=True)
    deadline = time.monotonic() + timeout
    while not (running_pid(paths) == proc.pid and os.path.exists(paths.control)):
        if proc.poll() is not None:
            raise ChardevServerError(f"the chardev server exited ({proc.returncode}): "
                                     f"{Path(err_path).read_text(errors='replace').strip()[-500:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise ChardevServerError(f"the chardev server did not start within {timeout:.0f} s")
        time.sleep(0.01)
    log.info("chardev server %d holds %s in %s", proc.pid, ", ".join(chardevs), paths.directory)
    return proc.pid


def stop(paths: ServerPaths, timeout: float = 10.0) -> bool:
    """Stop the server at once (SIGTERM, then SIGKILL); True if one was running. Held bytes go."""
    pid = running_pid(paths)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _is_our_server(pid, paths):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + timeout
            time.sleep(0.01)
    _clean(paths, keep_error=False)
    return pid is not None


def finish(paths: ServerPaths) -> None:
    """QEMU is gone: the server exits once nothing is held (the hook's ``release``)."""
    if running_pid(paths) is None:
        stop(paths)
        return
    try:
        with ChardevClient(paths.control) as client:
            client.call("finish")
    except ChardevServerError as err:
        log.warning("chardev server in %s: %s", paths.directory, err)


def main(argv: list[str]) -> int:
    config_path = argv[0]
    config = json.loads(Path(config_path).read_text())
    paths = ServerPaths(str(Path(config_path).parent))
    owner = (int(config["owner"][0]), int(config["owner"][1])) if config.get("owner") else None
    chardevs = {k: ChardevTarget.from_json(v) for k, v in config["chardevs"].items()}
    server = Server(paths, chardevs, owner)
    stopping = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        server.done = True

    signal.signal(signal.SIGTERM, on_term)
    Path(paths.pidfile).write_text(f"{os.getpid()}\n")
    try:
        server.serve()
    finally:
        if _read_pid(paths) == os.getpid():  # no new server of this domain started meanwhile
            _clean(paths)
    return 0


def _clean(paths: ServerPaths, keep_error: bool = True) -> None:
    """Remove what a server leaves in its directory, and the directory (``keep_error``: an
    error log that says something stays, with the directory)."""
    err = Path(f"{paths.directory}/server.err")
    with contextlib.suppress(OSError):
        if not keep_error or err.stat().st_size == 0:
            err.unlink()
    for stale in (paths.control, paths.config, paths.pidfile):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    with contextlib.suppress(OSError):
        os.rmdir(paths.directory)


if __name__ == "__main__":
    with contextlib.suppress(OSError):
        os.chdir("/")
    sys.exit(main(sys.argv[1:]))
