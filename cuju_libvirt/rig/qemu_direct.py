"""Run one QEMU directly (no libvirt) with a QMP socket and a file-backed, shared guest RAM.

:class:`DirectGuest` is what tracker tests and benchmarks use when they need a real,
running guest whose RAM file they can read and whose monitor they can drive::

    with DirectGuest(disk=boot_image(), memory_mib=64) as guest:
        guest.stop()
        data = guest.read_ram(COUNTER_GPA, 4)
        guest.cont()

The machine is ``pc`` under TCG with ``-nodefaults``; guest RAM is one
``memory-backend-file`` (``share=on``), so for low memory the RAM file offset equals the
guest-physical address. COM1 goes to a log file. All files (RAM file, QMP socket, serial
log, QEMU's stderr) live in one private directory, by default on tmpfs under
``/dev/shm``, that is removed when the guest is closed.

Clean-up: QEMU runs in its own process group, which is killed on exit (also when the
``with`` body raises). QEMU gets ``SIGKILL`` as its parent-death signal (via
``setpriv --pdeathsig``), so it dies with the process (thread) that started it, and a
directory left behind by a killed test run is swept by the next :class:`DirectGuest`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from cuju_libvirt.errors import MonitorError, RigError
from cuju_libvirt.qmp import QMPClient

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
#: Parent directory of the private per-guest directories (tmpfs).
DEFAULT_RUN_BASE = Path("/dev/shm")
_MARKER = ".cuju-direct-guest"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_dirs(base: Path = DEFAULT_RUN_BASE) -> list[Path]:
    """Remove private guest directories whose creating process is gone; return them.

    Only directories carrying this module's marker file are considered.
    """
    removed: list[Path] = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return removed
    for entry in entries:
        marker = entry / _MARKER
        try:
            owner = int(marker.read_text().strip())
        except (OSError, ValueError):
            continue
        if not _pid_alive(owner):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if removed:
        log.info("removed %d stale guest directories: %s", len(removed), ", ".join(map(str, removed)))
    return removed


class DirectGuest:
    """One QEMU process (TCG, ``pc``), started by :meth:`start` or ``with``.

    Parameters:
        memory_mib: guest RAM size (the RAM file's size).
        disk: a raw disk image to boot from (IDE); attached with ``snapshot=on`` unless
            ``disk_snapshot`` is false, so the cached image is never modified.
        kernel, initrd, append: direct kernel boot.
        extra_args: further QEMU arguments, appended as given.
        name: prefix of the private directory and QEMU's process name (``-name``).
        paused: start with ``-S`` (CPUs stopped until :meth:`cont`).
        incoming: start with ``-incoming defer`` (paused, waiting for ``migrate-incoming``), as
            cujud's standbys are: expecting a device-state blob, without a configuration section.
        full_migration: with ``incoming``, expect an ordinary QEMU's migration stream instead
            (its configuration section included), e.g. for QEMU's own live migration as a baseline.
        run_base: where the private directory is created (tmpfs by default).
        start_timeout: seconds to wait for QEMU's monitor.
    """

    def __init__(
        self,
        *,
        memory_mib: int = 64,
        disk: str | os.PathLike[str] | None = None,
        disk_snapshot: bool = True,
        kernel: str | os.PathLike[str] | None = None,
        initrd: str | os.PathLike[str] | None = None,
        append: str | None = None,
        extra_args: Sequence[str] = (),
        name: str = "cuju-direct",
        paused: bool = False,
        incoming: bool = False,
        full_migration: bool = False,
        run_base: str | os.PathLike[str] = DEFAULT_RUN_BASE,
        start_timeout: float = 15.0,
        qemu: str = QEMU_BINARY,
        serial_socket: str | os.PathLike[str] | None = None,
    ) -> None:
        if memory_mib < 1:
            raise ValueError(f"memory_mib must be at least 1, not {memory_mib}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"guest name {name!r}: use letters, digits, '.', '_' and '-' only")
        self.memory_mib = memory_mib
        self.disk = Path(disk) if disk is not None else None
        self.disk_snapshot = disk_snapshot
        self.kernel = Path(kernel) if kernel is not None else None
        self.initrd = Path(initrd) if initrd is not None else None
        self.append = append
        self.extra_args = list(extra_args)
        self.name = name
        self.paused = paused
        self.incoming = incoming
        self.full_migration = full_migration
        self.run_base = Path(run_base)
        self.start_timeout = start_timeout
        self.qemu = qemu
        #: COM1 to this UNIX socket (QEMU connects as a client, as to a chardev server), not the log file.
        self.serial_socket = Path(serial_socket) if serial_socket is not None else None
        self.dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QMPClient | None = None

    # -- paths and handles ----------------------------------------------------------------

    def _path(self, leaf: str) -> Path:
        if self.dir is None:
            raise RigError(f"guest {self.name} is not started")
        return self.dir / leaf

    @property
    def ram_path(self) -> Path:
        """The guest RAM file (offset == guest-physical address for low memory)."""
        return self._path("guest.ram")

    @property
    def qmp_path(self) -> Path:
        return self._path("qmp.sock")

    @property
    def serial_path(self) -> Path:
        return self._path("com1.log")

    @property
    def stderr_path(self) -> Path:
        return self._path("qemu.stderr")

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RigError(f"guest {self.name} is not started")
        return self._proc.pid

    @property
    def qmp(self) -> QMPClient:
        """The connected, negotiated QMP client of this guest's monitor."""
        if self._qmp is None:
            raise RigError(f"guest {self.name} is not started")
        return self._qmp

    @property
    def ram_size(self) -> int:
        return self.memory_mib << 20

    # -- life cycle -----------------------------------------------------------------------

    def command_line(self, qmp_fd: int) -> list[str]:
        """QEMU's argument vector (without the ``setpriv`` wrapper)."""
        size = f"{self.memory_mib}M"
        argv = [
            self.qemu,
            "-name", f"{self.name},process={self.name}",
            "-machine", "pc,accel=tcg,memory-backend=pc.ram",
            "-nodefaults",
            "-nographic",
            "-m", size,
            "-object", f"memory-backend-file,id=pc.ram,size={size},mem-path={self.ram_path},share=on",
            "-chardev", f"socket,id=cuju-qmp,fd={qmp_fd},server=on,wait=off",
            "-mon", "chardev=cuju-qmp,mode=control",
            "-chardev", (f"socket,id=cuju-com1,path={self.serial_socket}" if self.serial_socket is not None
                         else f"file,id=cuju-com1,path={self.serial_path}"),
            "-serial", "chardev:cuju-com1",
        ]  # fmt: skip
        if self.disk is not None:
            snap = ",snapshot=on" if self.disk_snapshot else ""
            argv += ["-drive", f"file={self.disk},format=raw,if=ide,index=0,media=disk{snap}"]
        if self.kernel is not None:
            argv += ["-kernel", str(self.kernel)]
        if self.initrd is not None:
            argv += ["-initrd", str(self.initrd)]
        if self.append is not None:
            argv += ["-append", self.append]
        if self.paused or self.incoming:
            argv.append("-S")
        if self.incoming:
            # As cujud's standbys: paused after the load, no configuration section expected
            # (device-state blobs from xen-save-devices-state have none).
            argv += ["-incoming", "defer"]
            if not self.full_migration:
                argv += ["-global", "migration.send-configuration=off"]
        argv += self.extra_args
        return argv

    def start(self) -> DirectGuest:
        """Start QEMU and connect to its monitor; on any failure nothing is left behind."""
        if self._proc is not None:
            raise RigError(f"guest {self.name} is already started")
        if shutil.which(self.qemu) is None:
            raise RigError(f"{self.qemu} not found: install the Debian package qemu-system-x86")
        sweep_stale_dirs(self.run_base)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}.", dir=self.run_base))
        try:
            (self.dir / _MARKER).write_text(f"{os.getpid()}\n")
            self._launch()
        except BaseException:
            self.close()
            raise
        return self

    def _launch(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.qmp_path))
            listener.listen(4)
            argv = self.command_line(listener.fileno())
            wrapper = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
            log.debug("starting %s", " ".join(argv))
            with open(self.stderr_path, "wb") as err:
                self._proc = subprocess.Popen(
                    wrapper + argv,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    pass_fds=(listener.fileno(),),
                    start_new_session=True,
                )
        finally:
            # QEMU holds its own copy; ours must go, or a dead QEMU would not close it.
            listener.close()
        try:
            self._qmp = QMPClient(self.qmp_path, connect_timeout=self.start_timeout)
        except MonitorError as err:
            raise RigError(f"QEMU for guest {self.name} did not start: {self._failure_text()}") from err
        log.info("guest %s started: pid %d, %d MiB RAM in %s", self.name, self.pid, self.memory_mib, self.dir)

    def _failure_text(self) -> str:
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
        try:
            text = self.stderr_path.read_text(errors="replace").strip()
        except OSError:
            text = ""
        status = "still running" if proc is None or proc.returncode is None else f"exit {proc.returncode}"
        return f"{status}; stderr: {text[-2000:] or '(empty)'}"

    def close(self) -> None:
        """Kill QEMU's process group and remove the private directory; idempotent."""
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log.error("QEMU pid %d of guest %s did not die after SIGKILL", proc.pid, self.name)
        directory, self.dir = self.dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> DirectGuest:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- conveniences -----------------------------------------------------------------------

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Pause the vCPUs (QMP ``stop``)."""
        self.qmp.execute("stop")

    def cont(self) -> None:
        """Resume the vCPUs (QMP ``cont``)."""
        self.qmp.execute("cont")

    def status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``inmigrate``, ...)."""
        reply: dict[str, Any] = self.qmp.execute("query-status")
        return str(reply["status"])

    def serial_text(self) -> str:
        """Everything the guest wrote to COM1 so far."""
        try:
            return self.serial_path.read_bytes().decode("ascii", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_serial(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the COM1 log matches the regular expression ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.serial_text())
            if match is not None:
                return match
            if not self.alive():
                raise RigError(f"guest {self.name} died: {self._failure_text()}")
            if time.monotonic() > deadline:
                tail = self.serial_text()[-300:]
                raise RigError(f"guest {self.name}: no {pattern!r} on COM1 within {timeout} s; got {tail!r}")
            time.sleep(0.02)

    def read_ram(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes of the RAM file at ``offset`` (== guest-physical address in low RAM)."""
        if offset < 0 or length < 0 or offset + length > self.ram_size:
            raise ValueError(f"range {offset:#x}+{length:#x} outside guest RAM of {self.ram_size:#x} bytes")
        fd = os.open(self.ram_path, os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)
