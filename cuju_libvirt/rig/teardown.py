"""Finding and removing rigs, including what a killed test run left behind.

A rig leaves exactly three traces in the root namespaces, all named ``cuju-rig-<id>``:
its cgroup, its tmpfs mount and the directory under it (see :mod:`cuju_libvirt.rig.hosts`).
Everything else (namespaces, their mounts, veths, bridges, daemons, QEMU) dies with the
processes in the cgroup. :func:`discover` finds rigs by those three names, so it also finds
rigs whose state file is gone; :func:`remove_rig` removes one; :func:`down_all` removes all
whose owner has died (or all of them with ``force``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cuju_libvirt.errors import RigError
from cuju_libvirt.rig.sandbox import (
    Cgroup,
    cgroup2_mount,
    find_tool,
    mounts_with_source,
    pid_alive,
    pid_start_time,
    run_quiet,
)

log = logging.getLogger(__name__)

PREFIX = "cuju-rig-"
STATE_FILE = "rig.json"
DEFAULT_BASE = Path("/tmp")


def default_base() -> Path:
    """Where rig roots are created: ``$CUJU_RIG_BASE`` or ``/tmp``."""
    return Path(os.environ.get("CUJU_RIG_BASE") or DEFAULT_BASE)


def read_state(root: Path) -> dict[str, Any] | None:
    """The state a rig wrote into its root, or None if there is none (or it is unreadable)."""
    try:
        state = json.loads((root / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def process_matches(record: dict[str, Any] | None) -> bool:
    """True if ``{"pid": ..., "start": ...}`` still names the same live process."""
    if not record:
        return False
    pid = int(record.get("pid", 0))
    return pid > 0 and pid_alive(pid) and pid_start_time(pid) == record.get("start")


@dataclass
class RigTraces:
    """What exists of one rig, found by name."""

    rig_id: str
    root: Path | None = None
    mounted: bool = False
    cgroup: Path | None = None
    state: dict[str, Any] | None = None
    pids: list[int] = field(default_factory=list)

    @property
    def owner_alive(self) -> bool:
        return process_matches((self.state or {}).get("owner"))

    @property
    def detached(self) -> bool:
        """Started by ``python -m cuju_libvirt.rig up``: no owner, meant to stay until ``down``."""
        return self.state is not None and self.state.get("owner") is None


def traces_of(root: Path) -> RigTraces:
    """What exists of the rig whose root is ``root`` (found from its own names, not by a scan)."""
    state = read_state(root)
    cgroup: Path | None = Path(state["cgroup"]) if state and state.get("cgroup") else None
    if cgroup is None:
        cg_mount = cgroup2_mount()
        cgroup = cg_mount / root.name if cg_mount else None
    return RigTraces(
        root.name.removeprefix(PREFIX),
        root=root if root.exists() else None,
        mounted=os.path.ismount(root),
        cgroup=cgroup if cgroup is not None and cgroup.is_dir() else None,
        state=state,
    )


def discover(bases: tuple[Path, ...] = ()) -> dict[str, RigTraces]:
    """Every rig that left a trace: a tmpfs, a cgroup or a root directory named ``cuju-rig-<id>``."""
    found: dict[str, RigTraces] = {}

    def entry(rig_id: str) -> RigTraces:
        return found.setdefault(rig_id, RigTraces(rig_id))

    for source, mountpoint in mounts_with_source(PREFIX):
        t = entry(source[len(PREFIX):])
        t.root, t.mounted = mountpoint, True
    cg_mount = cgroup2_mount()
    if cg_mount is not None:
        for d in cg_mount.glob(PREFIX + "*"):
            if d.is_dir():
                t = entry(d.name[len(PREFIX):])
                t.cgroup = d
                t.pids = Cgroup(d).pids()
    for base in {default_base(), *bases}:
        for d in base.glob(PREFIX + "*"):
            if d.is_dir():
                t = entry(d.name[len(PREFIX):])
                t.root = t.root or d
    for t in found.values():
        if t.root is not None:
            t.state = read_state(t.root)
    return found


def remove_rig(traces: RigTraces, *, graceful: bool = True, stop_reaper: bool = True) -> None:
    """Remove everything of one rig; :class:`RigError` listing whatever could not be removed.

    ``graceful`` first destroys running guests through libvirt (so libvirt gives disk images
    back to their owners), then everything in the cgroup is killed; the tmpfs is unmounted
    (lazily if a process outside still uses it) and the root directory removed. The rig's
    reaper is stopped first unless ``stop_reaper`` is false (its owner removing it: the
    reaper must stay armed until the end, in case the owner dies half-way).
    """
    state = traces.state or {}
    reaper = state.get("reaper") or {}
    if stop_reaper and process_matches(reaper) and reaper["pid"] != os.getpid():
        # Removed by someone else than its owner: the reaper must not act later (on a rig
        # that may by then carry the same id).
        os.kill(int(reaper["pid"]), signal.SIGTERM)
    if graceful:
        _destroy_guests([str(h.get("uri", "")) for h in (state.get("hosts") or {}).values()])
    problems: list[str] = []
    cgroup = Cgroup(traces.cgroup) if traces.cgroup else None
    if cgroup is not None:
        try:
            cgroup.kill()
            cgroup.remove()
        except (OSError, RigError) as err:
            problems.append(str(err))
    for source, mountpoint in mounts_with_source(PREFIX + traces.rig_id):
        if source == PREFIX + traces.rig_id:
            problems += _unmount(mountpoint)
    root = traces.root
    if root is not None and root.exists():
        if os.path.ismount(root):
            problems.append(f"{root} is still mounted")
        else:
            shutil.rmtree(root, ignore_errors=True)
            if root.exists():
                problems.append(f"cannot remove {root}")
    if problems:
        raise RigError(f"rig {traces.rig_id}: teardown incomplete: " + "; ".join(problems))
    if root is not None:
        (root.parent / f"{root.name}.reaper.log").unlink(missing_ok=True)  # a failed reaper's note
    log.info("rig %s: removed", traces.rig_id)


def _destroy_guests(uris: list[str], timeout: float = 15.0) -> None:
    """``virsh destroy`` every running guest of the given hosts, all at once (each takes ~2 s)."""
    virsh = find_tool("virsh")
    if virsh is None:
        return
    live = [u for u in uris if Path(u.partition("socket=")[2] or "/nonexistent").exists()]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for uri in live:
            names = run_quiet([virsh, "-q", "-c", uri, "list", "--name"], timeout=10).stdout.split()
            procs += [
                subprocess.Popen([virsh, "-q", "-c", uri, "destroy", name], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for name in names
            ]
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except (OSError, subprocess.TimeoutExpired) as err:
        log.debug("destroying guests failed: %s (the cgroup kill follows anyway)", err)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _unmount(mountpoint: Path) -> list[str]:
    umount = find_tool("umount") or "umount"
    for attempt in range(20):
        proc = run_quiet([umount, str(mountpoint)])
        if proc.returncode == 0:
            return []
        if attempt < 19:
            time.sleep(0.1)
    # Busy: a process outside the rig (a shell, a test holding a RAM file) still uses it.
    log.warning("%s busy (%s); detaching it lazily", mountpoint, proc.stderr.strip())
    proc = run_quiet([umount, "--lazy", str(mountpoint)])
    return [] if proc.returncode == 0 else [f"cannot unmount {mountpoint}: {proc.stderr.strip()}"]


def down_all(
    *, force: bool = False, bases: tuple[Path, ...] = (), only: Collection[str] | None = None
) -> list[tuple[str, str]]:
    """Remove every rig whose owner is gone (all rigs with ``force``); return (id, what happened).

    ``only`` limits it to those rig ids (tests use it to leave other people's rigs alone).
    """
    results: list[tuple[str, str]] = []
    for rig_id, traces in sorted(discover(bases).items()):
        if only is not None and rig_id not in only:
            continue
        if traces.owner_alive and not force:
            owner = (traces.state or {}).get("owner") or {}
            results.append((rig_id, f"kept: in use by pid {owner.get('pid')} (use --force)"))
            continue
        try:
            remove_rig(traces)
        except RigError as err:
            results.append((rig_id, f"FAILED: {err}"))
        else:
            results.append((rig_id, "removed"))
    return results


def sweep_stale(min_age: float = 120.0) -> list[str]:
    """Remove rigs left by dead owners (a killed test run whose reaper died too); return their ids.

    Safe to call while other rigs run: a rig whose owner lives, or that ``up`` left for a
    person (no owner), is kept; a rig without a state file is removed only when older than
    ``min_age`` seconds (younger ones may be coming up right now).
    """
    removed = []
    for rig_id, traces in sorted(discover().items()):
        if traces.state is not None:
            stale = traces.state.get("owner") is not None and not traces.owner_alive
        else:
            made = [p for p in (traces.root, traces.cgroup) if p is not None and p.exists()]
            stale = all(time.time() - p.stat().st_ctime > min_age for p in made)
        if not stale:
            continue
        try:
            remove_rig(traces, graceful=False)
        except RigError as err:
            log.warning("%s", err)
        else:
            removed.append(rig_id)
    if removed:
        log.warning("removed %d stale rigs left by killed runs: %s", len(removed), ", ".join(removed))
    return removed
