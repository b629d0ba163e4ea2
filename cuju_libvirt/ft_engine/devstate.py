"""Device state out of a stopped primary QEMU, and into a standby QEMU on failover (over QMP).

Mechanism only: when to save, which blob is committed and when to fail over is the
engine's policy. Guest RAM is *not* part of this: it lives in a shared file that the data
plane replicates page by page. What remains (CPU, devices; ~13 KB for a bare ``pc``
machine, ~100 KB with virtio devices) is the device-state blob.

Primary, once per epoch while the VM is stopped (:class:`DeviceStateSaver`)::

    saver = DeviceStateSaver(qmp)           # checks that all guest-writable RAM is shared
    qmp.execute("stop"); ...; saved = saver.save(); qmp.execute("cont")
    saver.check_devices(saved.blob)         # off the pause: the device list is unchanged

``save`` runs ``xen-save-devices-state filename=F live=false`` and reads ``F`` back. That
command (in every QEMU build, Xen or not) writes every savevm section that is not RAM
with the VM stopped, and nothing of the migration machinery: no migration state, no
capability (``x-ignore-shared`` is never touched, so a later ``virsh save`` or
``virsh migrate`` sees the QEMU libvirt knows), no ``postmigrate`` run state, no block
inactivation (the VM stays ``paused``; ``cont`` does not reopen images). ``F`` is a file
QEMU opens itself, by default next to the direct QMP socket (``<socket>.devstate``: under
libvirt ``/run/cuju-libvirt/qmp``, a tmpfs directory owned by QEMU's user, where QEMU
already creates its socket: see docs/engine.md for what AppArmor and SELinux need).

Non-shared RAM blocks are not in such a blob. Read-only ones (BIOS, option ROMs, fw_cfg
blobs) are identical on a standby started from the same XML with the same QEMU; the
saver refuses a machine with a guest-writable one (VGA/QXL video memory, a writable
pflash varstore), whose content would not be replicated (:func:`unreplicated_ram`).

Standby (:func:`standby_profile` when it is created, :func:`load_device_state` and
:func:`resume_standby` on failover): the standby QEMU was started with
``-incoming defer -global migration.send-configuration=off`` (the blob has no
configuration section), the same machine type, devices and RAM backend, and its RAM file
holds the committed pages. The blob is vetted first (:func:`check_standby`: its device
sections must be exactly the standby's) because QEMU 7.2 *exits* when an incoming
migration fails: a refused blob would cost the standby. Then ``getfd`` +
``migrate-incoming fd:NAME``, the blob is fed through a pipe, and the load is awaited
(run state ``paused``); ``cont`` and ``announce-self`` follow. The blob of an epoch in
which the user kept the VM paused carries :data:`USER_PAUSE_MARK` after QEMU's stream
(:func:`mark_user_pause`, :func:`split_user_pause`): a failover to it is not resumed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import select
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cuju_libvirt._closing import Closing
from cuju_libvirt.errors import MonitorError, StateError
from cuju_libvirt.ft_engine.vmstate import (
    EMPTY_VMDESC,
    BlobFormatError,
    BlobInfo,
    DeviceStateError,
    Section,
    check_end,
    parse_blob,
)
from cuju_libvirt.qmp import QMPClient, QMPConnectionError, QMPError

__all__ = [
    "USER_PAUSE_MARK",
    "BlobFormatError",
    "BlobInfo",
    "DeviceStateError",
    "DeviceStateSaver",
    "DevicesChangedError",
    "LoadTimings",
    "MachineProfile",
    "ResumeTimings",
    "SaveTimings",
    "SavedState",
    "Section",
    "StandbyMismatchError",
    "check_standby",
    "compare_machines",
    "describe_machine",
    "failover",
    "load_device_state",
    "mark_user_pause",
    "resume_standby",
    "split_user_pause",
    "standby_profile",
    "unreplicated_ram",
]

log = logging.getLogger(__name__)

#: Default deadline (seconds) for one save or load.
DEFAULT_TIMEOUT = 10.0
#: Pipe capacity asked for: a whole blob fits, so QEMU never waits for the reader.
PIPE_SIZE = 1 << 20
_CHUNK = 1 << 18
# QEMU's announce-self defaults (all four are mandatory arguments in QEMU 7.2).
_ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}
_RAMBLOCK_LINE = re.compile(
    r"^\s*(?P<name>\S.*?)\s+\d+ \S*B\s+0x[0-9a-f]+\s+(?P<used>0x[0-9a-f]+)\s+(?P<max>0x[0-9a-f]+)\s*$"
)
#: Non-shared RAM blocks the guest cannot write: firmware, option ROMs (``<dev>/<x>.rom``),
#: fw_cfg blobs (``/rom@etc/...``, built by QEMU) and the read-only pflash code image.
_READ_ONLY_RAM = re.compile(r"^(pc\.bios|pc\.rom|/rom@.*|.*\.rom|(system|pc)\.flash0)$")
#: QEMU run states in which the vCPUs and devices stand still, so a save is one consistent moment.
STOPPED_STATES = frozenset({"paused", "postmigrate"})
#: Suffix of the device-state file next to the QMP socket.
DEVSTATE_SUFFIX = ".devstate"


class StandbyMismatchError(DeviceStateError):
    """The standby QEMU does not match the machine the blob came from; ``problems`` lists each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(
            "standby does not match the primary (start both from the same domain XML): " + "; ".join(problems)
        )
        self.problems = list(problems)


class DevicesChangedError(DeviceStateError):
    """The primary's device sections changed (hot-plug/unplug): the standby no longer matches."""

    def __init__(self, added: list[Section], removed: list[Section]) -> None:
        parts = []
        if added:
            parts.append("added " + ", ".join(map(str, added)))
        if removed:
            parts.append("removed " + ", ".join(map(str, removed)))
        super().__init__(
            f"the VM's devices changed ({'; '.join(parts)}): the standby no longer matches it; "
            "protection ends here and is re-established with a standby of the new configuration"
        )
        self.added = list(added)
        self.removed = list(removed)


@dataclass(frozen=True)
class SaveTimings:
    """Seconds spent in each phase of one save (``perf_counter`` deltas)."""

    check: float  # query-status (the VM must be stopped)
    save: float  # the xen-save-devices-state round trip (QEMU writes the file)
    read: float  # reading the file back
    total: float


@dataclass(frozen=True)
class SavedState:
    """One epoch's device state and how long saving it took."""

    blob: bytes
    timings: SaveTimings


@dataclass(frozen=True)
class LoadTimings:
    """Seconds spent in each phase of loading a blob into the standby."""

    check: float  # parse the blob, compare with the standby
    getfd: float
    incoming: float  # the `migrate-incoming` command's round trip
    load: float  # feeding the blob until QEMU finished loading it
    total: float


@dataclass(frozen=True)
class ResumeTimings:
    cont: float
    announce: float
    total: float


@dataclass(frozen=True)
class MachineProfile:
    """What must be equal on primary and standby, as QMP tells it.

    ``memdevs`` are (id, size, share) of the memory backends; ``ram_blocks`` (name, used,
    max) from ``info ramblock``; ``sections`` the device sections of a device-state save
    (filled by :func:`standby_profile`; empty otherwise).
    """

    machine_type: str
    memdevs: tuple[tuple[str, int, bool], ...]
    ram_blocks: tuple[tuple[str, int, int], ...]
    sections: tuple[Section, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "machine_type": self.machine_type,
            "memdevs": [list(m) for m in self.memdevs],
            "ram_blocks": [list(b) for b in self.ram_blocks],
            "sections": [[s.name, s.instance, s.version] for s in self.sections],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MachineProfile:
        try:
            return cls(
                machine_type=str(data["machine_type"]),
                memdevs=tuple((str(i), int(n), bool(sh)) for i, n, sh in data["memdevs"]),
                ram_blocks=tuple((str(b), int(u), int(m)) for b, u, m in data["ram_blocks"]),
                sections=tuple(Section(str(n), int(i), int(v)) for n, i, v in data.get("sections", [])),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise DeviceStateError(f"malformed machine profile from the peer: {err}") from err


def _qemu_words(err: MonitorError) -> str:
    return err.desc if isinstance(err, QMPError) else str(err)


def _memdevs(qmp: QMPClient) -> list[dict[str, Any]]:
    devs: list[dict[str, Any]] = qmp.execute("query-memdev")
    return devs


def _ramblocks(qmp: QMPClient) -> tuple[tuple[str, int, int], ...] | None:
    """The RAM blocks as (name, used, max) from HMP ``info ramblock``; None if unavailable."""
    try:
        text = qmp.execute("human-monitor-command", {"command-line": "info ramblock"})
    except QMPError:
        return None
    blocks = []
    for line in str(text).splitlines():
        match = _RAMBLOCK_LINE.match(line)
        if match:
            blocks.append((match["name"], int(match["used"], 16), int(match["max"], 16)))
    return tuple(sorted(blocks)) or None


def describe_machine(qmp: QMPClient) -> MachineProfile:
    """The machine type, memory backends and RAM blocks of the QEMU behind ``qmp``."""
    try:
        machine = str(qmp.execute("qom-get", {"path": "/machine", "property": "type"}))
        devs = _memdevs(qmp)
        blocks = _ramblocks(qmp)
    except MonitorError as err:
        raise DeviceStateError("cannot inspect QEMU", _qemu_words(err)) from err
    memdevs = tuple(sorted((str(d.get("id")), int(d.get("size", -1)), bool(d.get("share"))) for d in devs))
    return MachineProfile(machine.removesuffix("-machine"), memdevs, blocks or ())


def unreplicated_ram(profile: MachineProfile) -> list[str]:
    """Guest-writable RAM blocks outside the shared memory backends, one sentence each.

    Their content is in neither the replicated RAM file nor a device-state blob, so a
    standby would resume with what they held when it started.
    """
    shared = {ident for ident, _size, share in profile.memdevs if share}
    problems = []
    for name, used, _maximum in profile.ram_blocks:
        if name in shared or _READ_ONLY_RAM.match(name):
            continue
        what = "video memory" if "vram" in name or "vga" in name or "qxl" in name else "guest-writable memory"
        problems.append(
            f"RAM block {name} ({used >> 10} KiB of {what}) is not part of the shared guest RAM and "
            "would not be replicated: give the domain <video><model type='none'/></video> (or "
            "type='ramfb', whose framebuffer is in guest RAM) and no writable <nvram>/pflash"
        )
    return problems


def compare_machines(primary: MachineProfile, standby: MachineProfile) -> list[str]:
    """Differences that make a standby unable to take the primary's state, one sentence each."""
    problems = []
    if primary.machine_type != standby.machine_type:
        problems.append(f"machine type: primary {primary.machine_type}, standby {standby.machine_type}")
    ours = {ident: (size, share) for ident, size, share in primary.memdevs}
    theirs = {ident: (size, share) for ident, size, share in standby.memdevs}
    for ident in sorted(set(ours) | set(theirs)):
        if ident not in theirs:
            problems.append(f"memory backend {ident} exists only on the primary")
        elif ident not in ours:
            problems.append(f"memory backend {ident} exists only on the standby")
        elif ours[ident][0] != theirs[ident][0]:
            problems.append(
                f"memory backend {ident}: primary {ours[ident][0]} bytes, standby {theirs[ident][0]}"
            )
        elif not theirs[ident][1]:
            problems.append(f"standby memory backend {ident} is not share=on")
    if primary.ram_blocks and standby.ram_blocks:
        a = {name: (used, mx) for name, used, mx in primary.ram_blocks}
        b = {name: (used, mx) for name, used, mx in standby.ram_blocks}
        for name in sorted(set(a) - set(b)):
            problems.append(f"RAM block {name} exists only on the primary")
        for name in sorted(set(b) - set(a)):
            problems.append(f"RAM block {name} exists only on the standby")
        for name in sorted(set(a) & set(b)):
            if a[name][1] != b[name][1] or (a[name][0] != b[name][0] and a[name][0] == a[name][1]):
                problems.append(f"RAM block {name}: primary {a[name][0]:#x} bytes, standby {b[name][0]:#x}")
    return problems


def compare_sections(blob: Sequence[Section], standby: Sequence[Section]) -> list[str]:
    """Device sections a standby lacks, has in excess, or has in another version."""
    ours = {(s.name, s.instance): s for s in blob}
    theirs = {(s.name, s.instance): s for s in standby}
    problems = [f"device section {ours[k]} only on the primary" for k in sorted(ours.keys() - theirs)]
    problems += [f"device section {theirs[k]} only on the standby" for k in sorted(theirs.keys() - ours)]
    problems += [
        f"device section {k[0]}[{k[1]}]: primary version {ours[k].version}, standby {theirs[k].version}"
        for k in sorted(set(ours) & set(theirs))
        if ours[k].version != theirs[k].version
    ]
    return problems


def default_path(qmp: QMPClient) -> str:
    """Where QEMU writes the device state by default: next to its direct QMP socket."""
    return qmp.path + DEVSTATE_SUFFIX


def _require_stopped(status: str) -> None:
    if status not in STOPPED_STATES:
        raise StateError(f"device state can only be saved while the VM is stopped; it is {status!r}")


class _StateFile:
    """The file QEMU's ``xen-save-devices-state`` writes, and our way of reading it back.

    QEMU opens it with ``O_CREAT|O_TRUNC`` on every save: the same inode, so the read
    side keeps one descriptor and preads it (re-opened if someone replaced the file).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._ino = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale file of another owner would make QEMU's open fail

    def save(self, qmp: QMPClient) -> None:
        qmp.reply(self.send(qmp))

    def send(self, qmp: QMPClient) -> int:
        """Ask QEMU for the save without waiting (:meth:`QMPClient.reply` takes the id)."""
        return qmp.send("xen-save-devices-state", {"filename": self.path, "live": False})

    def read(self) -> bytes:
        stat = os.stat(self.path)
        if stat.st_ino != self._ino:
            self.close_fd()
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            self._ino = os.fstat(self._fd).st_ino
        data = os.pread(self._fd, stat.st_size + 1, 0)
        while len(data) > stat.st_size:  # a file larger than stat said: read it whole
            stat = os.fstat(self._fd)
            data = os.pread(self._fd, stat.st_size + (1 << 16), 0)
            if len(data) <= stat.st_size:
                break
        return data

    def close_fd(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
            self._ino = -1

    def remove(self) -> None:
        self.close_fd()
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.unlink(self.path)


class DeviceStateSaver(Closing):
    """Saves the device state of one primary QEMU while it is stopped.

    ``qmp`` is the direct QMP connection of the primary (the saver uses it from the
    caller's thread only); ``path`` the file QEMU writes (default: next to the QMP
    socket). The constructor refuses a QEMU whose guest-writable RAM is not all in shared
    memory backends. ``expect_sections`` (the standby's, from :func:`standby_profile`)
    makes the first save check that the standby can take the blob.
    """

    def __init__(
        self,
        qmp: QMPClient,
        *,
        path: str | os.PathLike[str] | None = None,
        expect_sections: Sequence[Section] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.qmp = qmp
        self.log = logger or log
        self.saves = 0
        self.profile = describe_machine(qmp)
        #: The device sections of the first blob: later blobs must list the same ones.
        self.sections: tuple[Section, ...] | None = None
        self._expect = tuple(expect_sections) if expect_sections is not None else None
        self._check_primary()
        self._file = _StateFile(os.fspath(path) if path is not None else default_path(qmp))
        self._request: int | None = None  # the QMP id of a save begun and not finished
        self._status: int | None = None  # ... and of the query-status behind it
        self._started = 0.0

    def _check_primary(self) -> None:
        profile = self.profile
        unshared = [ident for ident, _size, share in profile.memdevs if not share]
        problems = []
        if not profile.memdevs:
            problems.append("guest RAM is not a memory backend object (use -machine memory-backend=)")
        if unshared:
            problems.append(
                f"memory backend(s) {', '.join(unshared)} not shared: give the domain "
                "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"
            )
        problems += unreplicated_ram(profile)
        if problems:
            raise DeviceStateError("cannot protect this QEMU: " + "; ".join(problems))

    @property
    def path(self) -> str:
        return self._file.path

    def save(self) -> SavedState:
        """Save the device state of the stopped VM; the VM stays stopped (``paused``, or
        ``postmigrate`` when libvirt's own job stopped it: the end of the RAM save of
        ``virsh snapshot-create --live --memspec``, before libvirt's ``cont``).

        Raises :class:`~cuju_libvirt.errors.StateError` if the VM is running, and
        :class:`DeviceStateError` with QEMU's message if the save fails (the VM is then
        still stopped and ``cont`` resumes it).
        """
        clock = time.perf_counter
        t0 = clock()
        try:
            status = self.qmp.execute("query-status")["status"]
        except MonitorError as err:
            raise DeviceStateError("cannot query the primary's run state", _qemu_words(err)) from err
        _require_stopped(status)
        self.begin(check=False)
        return self.finish(check_s=clock() - t0)

    def begin(self, *, check: bool = True) -> None:
        """Ask QEMU for the save without waiting for it; :meth:`finish` collects it.

        For a caller whose own ``stop`` went first on the same monitor (QEMU runs a monitor's
        commands in order): it may send both back to back and work (harvest) while QEMU
        writes the device state. Another monitor's command may still run in between (QEMU
        takes turns between monitors): with ``check``, a ``query-status`` goes right behind
        the save and :meth:`finish` raises :class:`StateError` if the VM was not stopped
        then (somebody resumed it: the save itself would then stop and resume it again).
        """
        if self._request is not None:
            raise StateError("a device-state save is already under way")
        self._started = time.perf_counter()
        self._request = self._file.send(self.qmp)
        self._status = self.qmp.send("query-status") if check else None

    def finish(self, *, check_s: float = 0.0) -> SavedState:
        """Wait for the save :meth:`begin` asked for and return the blob (errors as :meth:`save`)."""
        if self._request is None:
            raise StateError("no device-state save was begun")
        clock = time.perf_counter
        request, self._request = self._request, None
        status, self._status = self._status, None
        t1 = self._started
        try:
            self.qmp.reply(request)
        except MonitorError as err:
            if status is not None:
                with contextlib.suppress(MonitorError):
                    self.qmp.reply(status)
            raise DeviceStateError(
                f"device-state save into {self._file.path} failed (QEMU's user must be able to create "
                "files in that directory)",
                _qemu_words(err),
            ) from err
        if status is not None:
            try:
                state = self.qmp.reply(status)["status"]
            except MonitorError as err:
                raise DeviceStateError("cannot query the primary's run state", _qemu_words(err)) from err
            _require_stopped(state)
        t2 = clock()
        try:
            blob = self._file.read()
        except OSError as err:
            raise DeviceStateError(
                f"cannot read the device state QEMU wrote to {self._file.path}: {err}"
            ) from err
        t3 = clock()
        try:
            check_end(blob)
        except BlobFormatError as err:
            raise DeviceStateError(f"QEMU reported success but the blob is incomplete: {err}") from err
        if self.sections is None:
            self._first(blob)
        self.saves += 1
        timings = SaveTimings(check=check_s, save=t2 - t1, read=t3 - t2, total=check_s + t3 - t1)
        return SavedState(blob, timings)

    def _first(self, blob: bytes) -> None:
        sections = parse_blob(blob).sections
        if self._expect is not None:
            problems = compare_sections(sections, self._expect)
            if problems:
                raise StandbyMismatchError(problems)
        self.sections = sections

    def check_devices(self, blob: bytes) -> None:
        """Raise :class:`DevicesChangedError` if ``blob`` lists other device sections than the
        first blob did (a device was hot-plugged or unplugged). ~0.2 ms: call it outside the
        pause, before the epoch is shipped."""
        sections = parse_blob(blob).sections
        if self.sections is None:
            self.sections = sections
            return
        if sections != self.sections:
            before = {(s.name, s.instance): s for s in self.sections}
            now = {(s.name, s.instance): s for s in sections}
            raise DevicesChangedError(
                [now[k] for k in now if k not in before], [before[k] for k in before if k not in now]
            )

    def close(self) -> None:
        """Remove the device-state file; idempotent."""
        self._file.remove()


# -- standby ---------------------------------------------------------------------------------


def _pipe() -> tuple[int, int]:
    """A pipe, close-on-exec, as large as the system allows up to PIPE_SIZE."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return read_fd, write_fd


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _suppress_vmdesc(qmp: QMPClient) -> bool:
    """Whether the machine skips the JSON device description (then it does not expect one)."""
    try:
        return bool(qmp.execute("qom-get", {"path": "/machine", "property": "suppress-vmdesc"}))
    except QMPError:
        return False


def standby_profile(qmp: QMPClient, *, path: str | os.PathLike[str] | None = None) -> MachineProfile:
    """The standby's :class:`MachineProfile`, its device sections included.

    The sections come from a device-state save of the waiting standby itself (QEMU allows
    it while ``inmigrate``; it changes nothing there and costs a few ms): exactly the list
    its load will look up. ``path`` is where QEMU writes it (default: next to its QMP socket).
    """
    profile = describe_machine(qmp)
    state = _StateFile(os.fspath(path) if path is not None else default_path(qmp))
    try:
        state.save(qmp)
        sections = parse_blob(state.read()).sections
    except MonitorError as err:
        raise DeviceStateError(f"cannot list the standby's device sections (save into {state.path})",
                               _qemu_words(err)) from err
    except OSError as err:
        raise DeviceStateError(f"cannot read the standby's device sections from {state.path}: {err}") from err
    finally:
        state.remove()
    return MachineProfile(profile.machine_type, profile.memdevs, profile.ram_blocks, sections)


def check_standby(qmp: QMPClient, info: BlobInfo, standby: MachineProfile | None = None) -> None:
    """Raise :class:`StandbyMismatchError` unless the standby can take a blob described by ``info``.

    Checked: the standby waits for an incoming migration, and the blob's device sections
    are exactly the standby's (name, instance, version: what QEMU's load looks up, fatally).
    ``standby`` is its profile from :func:`standby_profile` (taken when it was created);
    without it the sections are listed now. RAM blocks and memory backends are compared
    with the primary's when pairing (:func:`compare_machines`), not here.
    """
    try:
        status = qmp.execute("query-status")["status"]
    except MonitorError as err:
        raise DeviceStateError("cannot inspect the standby QEMU", _qemu_words(err)) from err
    if status != "inmigrate":
        raise StandbyMismatchError(
            [f"standby is {status!r}, not waiting for state: start it with -incoming defer"]
        )
    if standby is None or not standby.sections:
        standby = standby_profile(qmp)
    problems = compare_sections(info.sections, standby.sections)
    if problems:
        raise StandbyMismatchError(problems)


def _log_reason(qemu_log: Path | None) -> str | None:
    """QEMU's last complaint from its log (stderr or libvirt's per-domain log), if any."""
    if qemu_log is None:
        return None
    try:
        lines = qemu_log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    said = [line.strip() for line in lines[-40:] if "qemu" in line and ":" in line]
    return " | ".join(said[-4:]) or None


def load_device_state(
    qmp: QMPClient,
    blob: bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    fdname: str = "cuju-devstate",
    qemu_log: str | os.PathLike[str] | None = None,
    verify: bool = True,
    standby: MachineProfile | None = None,
) -> LoadTimings:
    """Load ``blob`` into the standby QEMU behind ``qmp``; on return it is loaded and ``paused``.

    With ``verify`` (the default) the blob and the standby are checked first
    (:func:`parse_blob`, :func:`check_standby` with the standby's ``standby`` profile):
    a failed check leaves the standby untouched, still waiting, so a good blob can follow.
    Past that point a refusal by QEMU ends the standby QEMU (QEMU 7.2 exits on a failed
    incoming migration); the :class:`DeviceStateError` then carries QEMU's reason, read
    from ``qemu_log`` if given. The standby is never resumed here.
    """
    clock = time.perf_counter
    t0 = clock()
    deadline = t0 + timeout
    log_path = Path(qemu_log) if qemu_log is not None else None
    try:
        expects_vmdesc = not _suppress_vmdesc(qmp)
    except MonitorError as err:
        raise DeviceStateError("cannot inspect the standby QEMU", _qemu_words(err)) from err
    if verify:
        check_standby(qmp, parse_blob(blob), standby)
    # A QEMU that writes a JSON description also reads one after QEMU_VM_EOF, and logs
    # "Expected vmdescription section" without it: hand it an empty one.
    stream = blob + EMPTY_VMDESC if expects_vmdesc else blob
    t1 = clock()
    read_fd, write_fd = _pipe()
    try:
        try:
            qmp.execute("getfd", {"fdname": fdname}, fd=read_fd)
            _close(read_fd)
            read_fd = -1
            t2 = clock()
            qmp.execute("migrate-incoming", {"uri": f"fd:{fdname}"})
            t3 = clock()
            _feed(write_fd, stream, deadline)
            _close(write_fd)
            write_fd = -1
            _wait_loaded(qmp, deadline)
            t4 = clock()
        except (MonitorError, OSError) as err:
            raise _load_failure(err, log_path) from err
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                _close(fd)
    return LoadTimings(check=t1 - t0, getfd=t2 - t1, incoming=t3 - t2, load=t4 - t3, total=t4 - t0)


def _feed(write_fd: int, blob: bytes, deadline: float) -> None:
    view = memoryview(blob)
    os.set_blocking(write_fd, False)
    poller = select.poll()
    poller.register(write_fd, select.POLLOUT)
    while view:
        try:
            view = view[os.write(write_fd, view[:_CHUNK]) :]
            continue
        except BlockingIOError:
            pass
        remaining = deadline - time.perf_counter()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise DeviceStateError(f"standby QEMU stopped reading device state ({len(view)} bytes left)")


def _wait_loaded(qmp: QMPClient, deadline: float) -> None:
    while True:
        status = qmp.execute("query-status")["status"]
        if status != "inmigrate":
            break
        if time.perf_counter() > deadline:
            raise DeviceStateError("standby QEMU did not finish loading device state in time")
        time.sleep(0.0005)
    migration = qmp.execute("query-migrate").get("status")
    if migration != "completed" or status not in ("paused", "running"):
        raise DeviceStateError(f"standby ended the load in run state {status!r}, migration {migration!r}")
    if status == "running":
        log.warning("standby resumed by itself after the load: start it paused (-S, libvirt's START_PAUSED)")


def _load_failure(err: BaseException, qemu_log: Path | None) -> DeviceStateError:
    if isinstance(err, DeviceStateError):
        return err
    reason = None
    if isinstance(err, QMPConnectionError) or (isinstance(err, OSError) and err.errno == errno.EPIPE):
        time.sleep(0.05)  # let QEMU finish writing its last words
        reason = _log_reason(qemu_log)
        return DeviceStateError(
            "standby QEMU exited while loading device state (QEMU 7.2 exits on a refused incoming "
            "migration); the standby is lost",
            reason or str(err),
        )
    words = _qemu_words(err) if isinstance(err, MonitorError) else str(err)
    return DeviceStateError("loading device state into the standby failed", words)


#: Appended to the blob of an epoch in which somebody else (``virsh suspend``) kept the VM
#: paused: the pause travels with the epoch, and a failover to it leaves the VM paused. A
#: QEMU stream ends with QEMU_VM_EOF (0x01), never with this mark's last byte (0x00).
USER_PAUSE_MARK = b"\x00cuju:paused-by-user\x00"


def mark_user_pause(blob: bytes) -> bytes:
    """``blob`` of an epoch whose VM somebody else keeps paused (see :data:`USER_PAUSE_MARK`)."""
    return blob + USER_PAUSE_MARK


def split_user_pause(blob: bytes) -> tuple[bytes, bool]:
    """QEMU's stream out of a committed blob, and whether the VM was paused by somebody else."""
    if blob.endswith(USER_PAUSE_MARK):
        return blob[: -len(USER_PAUSE_MARK)], True
    return blob, False


def resume_standby(qmp: QMPClient, *, announce: bool = True, run: bool = True) -> ResumeTimings:
    """``cont`` the loaded standby (unless not ``run``: the user had paused the VM) and (by
    default) ``announce-self`` its NICs."""
    clock = time.perf_counter
    t0 = clock()
    try:
        if run:
            qmp.execute("cont")
        t1 = clock()
        if announce:
            qmp.execute("announce-self", dict(_ANNOUNCE))
    except MonitorError as err:
        raise DeviceStateError("resuming the standby failed", _qemu_words(err)) from err
    t2 = clock()
    return ResumeTimings(cont=t1 - t0, announce=t2 - t1, total=t2 - t0)


def failover(
    qmp: QMPClient,
    blob: bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    qemu_log: str | os.PathLike[str] | None = None,
    announce: bool = True,
    standby: MachineProfile | None = None,
) -> tuple[LoadTimings, ResumeTimings]:
    """Load the last committed blob into the standby and resume it."""
    loaded = load_device_state(qmp, blob, timeout=timeout, qemu_log=qemu_log, standby=standby)
    return loaded, resume_standby(qmp, announce=announce)
