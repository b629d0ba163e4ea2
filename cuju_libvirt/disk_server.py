"""The block server of a protected disk: one nbdkit daemon per disk, outside cujud.

QEMU reaches each protected disk through a host-local NBD export over a UNIX socket,
``/run/cuju-libvirt/nbd/<uuid>/<target>.sock`` (:func:`~cuju_libvirt.disk_xml.nbd_socket_path`),
export name = the target dev. nbdkit serves it with our plugin
(``c_ext/nbdkit/cujudisk.c``): every write goes to the image at once and into the
disk's epoch journal (``<target>.journal`` beside the socket, see
``c_ext/diskjournal.h``), which cujud seals at each epoch boundary.

Who starts it: the libvirt hook at ``prepare`` (before QEMU starts), by itself, so a
VM starts whether cujud runs or not. nbdkit puts itself in the background (its own
session, re-parented to init): it is no child of cujud or of libvirtd, and the VM's
disk keeps working while cujud restarts. The journal is a file, so a restarted server
appends to the same journal; QEMU, whose disks use ``error_policy='stop'``, pauses
rather than fails I/O while a server restarts. The hook stops the servers at
``release``; the journal stays (its dirty bitmaps let a later resync send only what
changed) until :func:`forget` removes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cuju_libvirt.disk_xml import nbd_socket_path
from cuju_libvirt.errors import CujuError

log = logging.getLogger(__name__)

#: The plugin nbdkit loads (built by scripts/setup.sh from c_ext/nbdkit).
PLUGIN = Path(__file__).resolve().parent / "libexec" / "nbdkit-cujudisk-plugin.so"
#: Debian's QEMU user: it must be able to connect to the socket (QEMU opens the export itself).
QEMU_USER = "libvirt-qemu"
#: Journal bytes per epoch buffer: an epoch writing more falls back to its dirty bitmap.
DEFAULT_JOURNAL_CAPACITY = 64 << 20


class DiskServerError(CujuError):
    """A disk's block server could not be started, found or stopped."""


@dataclass(frozen=True)
class ServerPaths:
    """Where the server of one disk keeps its socket, journal and pid file."""

    socket: str
    journal: str
    pidfile: str

    @classmethod
    def of(cls, uuid: str, target: str) -> ServerPaths:
        sock = nbd_socket_path(uuid, target)
        base = sock.removesuffix(".sock")
        return cls(socket=sock, journal=base + ".journal", pidfile=base + ".pid")

    @classmethod
    def under(cls, directory: str | Path, target: str) -> ServerPaths:
        """The same layout in another directory (tests, benchmarks)."""
        base = str(Path(directory) / target)
        return cls(socket=base + ".sock", journal=base + ".journal", pidfile=base + ".pid")


def _qemu_img(*args: str) -> str:
    try:
        done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError as err:
        raise DiskServerError("qemu-img not found; fix: apt-get install qemu-utils") from err
    if done.returncode != 0:
        raise DiskServerError(f"qemu-img {args[0]} {args[-1]}: {done.stderr.strip()}")
    return done.stdout


def image_info(image: str, fmt: str) -> dict[str, Any]:
    """``qemu-img info`` of ``image`` read as ``fmt`` (shared: a served image is in use)."""
    info = json.loads(_qemu_img("info", "--output=json", "-U", "-f", fmt, image))
    return info if isinstance(info, dict) else {}


def write_qcow2_placeholder(path: str, virtual_size: int, cluster_size: int = 65536) -> int:
    """Write an empty qcow2 of ``virtual_size`` at the start of the (empty) replica ``path``;
    return how many bytes it took (the rest of the file stays a hole).

    The standby's QEMU opens its replica as qcow2 over NBD when it starts, before the initial
    sync has copied anything: an all-zero file is 'not in qcow2 format' and the standby
    cannot start. It opens its disks inactive (``-incoming``), never writes them, and
    re-reads every qcow2 table when it takes over (QEMU activates the block layer at the
    end of the incoming migration), by then from the synced copy of the primary's file.
    What the placeholder wrote must be overwritten by the sync, holes too."""
    _qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", path, str(virtual_size))
    return os.stat(path).st_size


def export_size_for(image: str, fmt: str) -> int | None:
    """The NBD export size a disk needs: None (the file's size) for raw; for qcow2, room for the
    file to grow to a fully allocated image (QEMU decodes the qcow2 over NBD, and an NBD
    export cannot grow): virtual size + L2 tables and refcounts twice over + 64 MiB."""
    if fmt != "qcow2":
        return None
    info = image_info(image, fmt)
    virtual, cluster = int(info["virtual-size"]), int(info.get("cluster-size", 65536))
    bound = virtual + 2 * (virtual // cluster) * 8 * 2 + (64 << 20)
    bound = max(bound, os.stat(image).st_size)
    return (bound + (1 << 20) - 1) & ~((1 << 20) - 1)


def qemu_owner() -> tuple[int, int] | None:
    """(uid, gid) of QEMU's user, to own each socket; None where QEMU runs as root."""
    try:
        user = pwd.getpwnam(QEMU_USER)
    except KeyError:
        return None
    return user.pw_uid, user.pw_gid


def _read_pid(paths: ServerPaths) -> int | None:
    try:
        return int(Path(paths.pidfile).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _is_our_server(pid: int, journal: str) -> bool:
    """True if ``pid`` is an nbdkit serving this journal with our plugin (not a recycled pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return f"journal={journal}".encode() in argv and any(a.endswith(PLUGIN.name.encode()) for a in argv)


def served_image(paths: ServerPaths) -> str | None:
    """The image the live server of these paths serves (its ``file=``), or None."""
    pid = running_pid(paths)
    if pid is None:
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for arg in argv:
        if arg.startswith(b"file="):
            return os.fsdecode(arg[5:])
    return None


def running_pid(paths: ServerPaths) -> int | None:
    """The pid of the live server of these paths, or None."""
    pid = _read_pid(paths)
    return pid if pid is not None and _is_our_server(pid, paths.journal) else None


def start(
    paths: ServerPaths,
    image: str,
    *,
    target: str,
    export_size: int | None = None,
    capacity: int = DEFAULT_JOURNAL_CAPACITY,
    socket_mode: int = 0o600,
    owner: tuple[int, int] | None = None,
    timeout: float = 10.0,
    nbdkit: str = "nbdkit",
) -> int:
    """Start (or find running) the server of ``image``; return its pid once it accepts connections.

    ``export_size`` exports more than the image holds (a qcow2 file that must grow);
    ``owner`` (uid, gid) gets the socket (QEMU's user when QEMU does not run as root).
    Idempotent: a live server of the same journal is kept (a second ``prepare``).
    """
    pid = running_pid(paths)
    if pid is not None:
        return pid
    if not PLUGIN.is_file():
        raise DiskServerError(f"the nbdkit plugin {PLUGIN} is missing; fix: run scripts/setup.sh "
                              "(it builds c_ext/nbdkit and needs Debian's nbdkit-plugin-dev)")
    if not os.path.exists(image):
        raise DiskServerError(f"disk {target}: image {image!r} does not exist")
    Path(paths.socket).parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    for stale in (paths.socket, paths.pidfile):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    argv = [nbdkit, "--unix", paths.socket, "--pidfile", paths.pidfile,
            str(PLUGIN), f"file={image}", f"journal={paths.journal}", f"export={target}",
            f"capacity={capacity}"]
    if export_size is not None:
        argv.append(f"size={export_size}")
    try:
        # nbdkit forks into the background once its socket is ready; this parent exits.
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, start_new_session=True, check=False)
    except FileNotFoundError as err:
        raise DiskServerError(f"{nbdkit} not found; fix: apt-get install nbdkit") from err
    except subprocess.TimeoutExpired as err:
        raise DiskServerError(f"disk {target}: nbdkit did not start within {timeout:.0f} s") from err
    if done.returncode != 0:
        raise DiskServerError(f"disk {target}: nbdkit failed ({done.returncode}): {done.stderr.strip()}")
    deadline = time.monotonic() + timeout
    while True:
        pid = running_pid(paths)
        if pid is not None and os.path.exists(paths.socket):
            break
        if time.monotonic() > deadline:
            raise DiskServerError(f"disk {target}: nbdkit started but {paths.socket} did not appear")
        time.sleep(0.01)
    os.chmod(paths.socket, socket_mode)
    if owner is not None:
        os.chown(paths.socket, *owner)
    log.info("disk %s: block server %d serves %s on %s", target, pid, image, paths.socket)
    return pid


def stop(paths: ServerPaths, timeout: float = 10.0) -> bool:
    """Stop the server (SIGTERM, then SIGKILL); True if one was running. The journal stays."""
    pid = running_pid(paths)
    if pid is None:
        for stale in (paths.socket, paths.pidfile):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _is_our_server(pid, paths.journal):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.01)
    for stale in (paths.socket, paths.pidfile):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    return True


def forget(paths: ServerPaths) -> None:
    """Remove a stopped server's journal (the next start begins with an empty one)."""
    if running_pid(paths) is not None:
        raise DiskServerError(f"{paths.journal}: the server still runs; stop it first")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.journal)
