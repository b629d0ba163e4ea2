"""Facts about a running QEMU that libvirt does not hand out: its pid, its guest-RAM file,
whether it ended on a signal. Read from libvirt's pid file, ``/proc`` and libvirt's log,
never through the libvirt API (the hook may not call it; cujud needs the answers fast).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cuju_libvirt.errors import CujuError

LIBVIRT_QEMU_RUN_DIR = Path("/run/libvirt/qemu")
LIBVIRT_QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
#: QEMU logs this when a signal (SIGTERM/SIGINT/SIGHUP: libvirt's destroy, a shutdown) ends it.
_SIGNAL_LINE = re.compile(rb"terminating on signal (\d+)")


@dataclass(frozen=True)
class RamBacking:
    path: str
    size: int


def qemu_pid(domain: str, run_dir: Path = LIBVIRT_QEMU_RUN_DIR) -> int | None:
    """The pid of the QEMU running ``domain`` (libvirt's pid file), or None if it runs no QEMU."""
    try:
        pid = int((run_dir / f"{domain}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def ram_backing(pid: int) -> RamBacking:
    """The guest-RAM file of QEMU ``pid`` (``mem-path`` on its command line) and its size.

    libvirt names the file differently with every start and removes it at stop, so it is
    read from the running process. Only one RAM backend is supported (one NUMA cell at most, no
    DIMM): more is refused with what to do.
    """
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError as err:
        raise CujuError(f"QEMU process {pid} is gone: {err.strerror}") from err
    paths: list[str] = []
    ids: list[str] = []
    for arg in argv:
        text = arg.decode(errors="replace")
        if text.startswith("{") and '"mem-path"' in text:
            with_path = json.loads(text)
            paths.append(str(with_path["mem-path"]))
            ids.append(str(with_path.get("id", "?")))
        elif "mem-path=" in text:
            paths += re.findall(r"mem-path=([^,]+)", text)
            ids += re.findall(r"(?:^|,)id=([^,]+)", text) or ["?"]
    if not paths:
        raise CujuError(f"QEMU process {pid} has no file-backed guest RAM (mem-path): FT needs exactly one "
                        "shared RAM file (<memoryBacking><source type='file'/><access mode='shared'/>)")
    if len(paths) > 1:
        raise CujuError(
            f"QEMU process {pid} has {len(paths)} RAM backends ({', '.join(ids)}): FT replicates exactly one "
            "shared RAM file, and each DIMM (<memory model='dimm'>, also one hot-plugged with virsh "
            "attach-device) or further NUMA cell is a RAM backend of its own that a standby would lack; "
            "the VM stays UNPROTECTED until you remove the DIMM (virsh detach-device, if the guest lets "
            "it go) or restart the VM without it")
    path = paths[0]
    if os.path.isdir(path):  # memory_backing_dir without a file name: QEMU made one inside
        raise CujuError(f"QEMU process {pid}: mem-path {path} is a directory, not the RAM file")
    return RamBacking(path, os.stat(path).st_size)


def log_offset(domain: str, log_dir: Path = LIBVIRT_QEMU_LOG_DIR) -> int:
    """Current size of libvirt's log of ``domain`` (read later with :func:`ended_on_signal`)."""
    try:
        return (log_dir / f"{domain}.log").stat().st_size
    except OSError:
        return 0


def ended_on_signal(domain: str, since: int, log_dir: Path = LIBVIRT_QEMU_LOG_DIR) -> int | None:
    """The signal number QEMU said it terminated on, logged after byte ``since``, or None.

    QEMU logs ``terminating on signal N`` for the catchable signals that libvirt uses to
    destroy a domain (SIGTERM first). A SIGKILL leaves no such line.
    """
    try:
        with open(log_dir / f"{domain}.log", "rb") as fh:
            fh.seek(since)
            data = fh.read()
    except OSError:
        return None
    found = _SIGNAL_LINE.findall(data)
    return int(found[-1]) if found else None


def owner_ids(pid: int) -> tuple[int, int]:
    """The effective uid and gid QEMU ``pid`` runs as (``/proc/PID/status``)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        uid = int(re.search(r"^Uid:\s+\d+\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        gid = int(re.search(r"^Gid:\s+\d+\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    except (OSError, AttributeError, ValueError) as err:
        raise CujuError(f"cannot read the user of QEMU process {pid}: {err}") from err
    return uid, gid
