"""Facts cujud must not forget across restarts (``state_dir``), one small JSON file each.

* ``takeovers/UUID.json`` on the host whose standby took a domain over: it holds the VM now.
* ``protected/UUID.json`` on the primary while a standby may hold its state: written once
  the domain is protected, removed when protection ends in an orderly way. Found at
  ``prepare`` (the host crashed or was cut off while protected), the start waits for the
  peer's word that it does not run the VM.
* ``ceded/UUID.json`` on the host that lost a domain to its peer: this host must not start
  the domain again while the peer holds it. The hook refuses ``virsh start`` while the
  file exists (even when cujud is not running); an operator who has made sure the peer no
  longer runs the VM removes it (``cuju-libvirt ft forget-ceded DOMAIN``).
* ``standbys/UUID.json`` on the backup while a standby of the domain exists here: what a
  restarted cujud needs to settle it (its name, peer, generation, XML and replicas). Written
  before the standby can receive a single epoch, removed when it is dropped or takes over.
  Without it a standby found at start-up is an orphan and destroyed; with it the standby
  stays paused until the peer (or the witness) says whether the primary still runs.

Files are written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path("/var/lib/cuju-libvirt")
TAKEOVERS = "takeovers"
CEDED = "ceded"
PROTECTED = "protected"
STANDBYS = "standbys"


def _path(state_dir: Path, kind: str, uuid: str) -> Path:
    if not uuid or "/" in uuid or uuid.startswith("."):
        raise ValueError(f"not a domain UUID: {uuid!r}")
    return state_dir / kind / f"{uuid}.json"


def write(state_dir: Path, kind: str, uuid: str, **facts: Any) -> Path:
    path = _path(state_dir, kind, uuid)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    data = json.dumps({"uuid": uuid, "time": time.time(), **facts}, sort_keys=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def read(state_dir: Path, kind: str, uuid: str) -> dict[str, Any] | None:
    try:
        data = json.loads(_path(state_dir, kind, uuid).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_all(state_dir: Path, kind: str) -> list[dict[str, Any]]:
    """Every readable record of ``kind`` (in UUID order)."""
    try:
        names = sorted(p.stem for p in (state_dir / kind).glob("*.json"))
    except OSError:
        return []
    return [rec for name in names if (rec := read(state_dir, kind, name)) is not None]


def remove(state_dir: Path, kind: str, uuid: str) -> bool:
    try:
        _path(state_dir, kind, uuid).unlink()
    except FileNotFoundError:
        return False
    return True
