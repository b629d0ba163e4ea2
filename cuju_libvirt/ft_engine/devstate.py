"""Device state out of a stopped primary QEMU, and into a standby QEMU on failover (over QMP).

Mechanism only: when to save, which blob is committed and when to fail over is the
engine's policy. Guest RAM is *not* part of this: it lives in a shared file that the data
plane replicates page by page, and the ``x-ignore-shared`` migration capability makes
QEMU leave shared RAM blocks out of the stream. What remains (CPU, devices, the small
non-shared ROM blocks; ~320 KB for a ``pc`` machine) is the device-state blob.

Primary, once per epoch while the VM is stopped (:class:`DeviceStateSaver`)::

    saver = DeviceStateSaver(qmp)           # checks that all guest RAM is shared
    qmp.execute("stop"); ...; saved = saver.save(); qmp.execute("cont")

``save`` turns ``x-ignore-shared`` on, hands QEMU the write end of a pipe with ``getfd``,
runs ``migrate fd:NAME``, drains the read end until QEMU closes it, confirms the
migration completed and the VM is in ``postmigrate``, and turns the capability off again
(libvirt 9.0 does not know it: left on, a later ``virsh save`` writes an image without
RAM that cannot be restored). ``keep_ignore_shared=True`` leaves it on between saves
(saves two QMP round trips per epoch) until :meth:`DeviceStateSaver.close`; the owner
must then refuse libvirt save/migrate for as long as the saver is open.

QEMU allows one save per stop/cont cycle: after a save the VM is in ``postmigrate`` and
another ``migrate`` is refused until ``cont``.

Standby, on failover (:func:`load_device_state`, then :func:`resume_standby`, or both
with :func:`failover`): the standby QEMU was started with ``-incoming defer``, the same
machine type, devices and RAM backend (same id and size, ``share=on``), and its RAM file
holds the committed pages. The blob is vetted first (:func:`check_standby`) because QEMU
7.2 *exits* when an incoming migration fails: a refused blob would cost the standby.
Then ``x-ignore-shared`` on, ``getfd`` + ``migrate-incoming fd:NAME``, the blob is fed
through a pipe, and the load is awaited (run state ``paused``); ``cont`` and
``announce-self`` follow.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cuju_libvirt._closing import Closing
from cuju_libvirt.errors import MonitorError, StateError
from cuju_libvirt.ft_engine.vmstate import (
    IGNORE_SHARED,
    BlobFormatError,
    BlobInfo,
    DeviceStateError,
    check_end,
    parse_blob,
)
from cuju_libvirt.qmp import QMPClient, QMPConnectionError, QMPError

__all__ = [
    "BlobFormatError",
    "BlobInfo",
    "DeviceStateError",
    "DeviceStateSaver",
    "LoadTimings",
    "ResumeTimings",
    "SaveTimings",
    "SavedState",
    "StandbyMismatchError",
    "check_standby",
    "failover",
    "load_device_state",
    "resume_standby",
]

log = logging.getLogger(__name__)

#: Default deadline (seconds) for one save or load.
DEFAULT_TIMEOUT = 10.0
#: Pipe capacity asked for: a whole blob fits, so QEMU never waits for the reader.
PIPE_SIZE = 1 << 20
_CHUNK = 1 << 18
_TERMINAL = frozenset({"completed", "failed", "cancelled"})
# QEMU's announce-self defaults (all four are mandatory arguments in QEMU 7.2).
_ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}
_RAMBLOCK_LINE = re.compile(
    r"^\s*(?P<name>\S.*?)\s+\d+ \S*B\s+0x[0-9a-f]+\s+(?P<used>0x[0-9a-f]+)\s+(?P<max>0x[0-9a-f]+)\s*$"
)


class StandbyMismatchError(DeviceStateError):
    """The standby QEMU does not match the machine the blob came from; ``problems`` lists each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(
            "standby does not match the primary (start both from the same domain XML): " + "; ".join(problems)
        )
        self.problems = list(problems)


@dataclass(frozen=True)
class SaveTimings:
    """Seconds spent in each phase of one save (``perf_counter`` deltas)."""

    check: float  # query-status (the VM must be stopped)
    caps_on: float  # x-ignore-shared on (0 when kept on)
    getfd: float
    migrate: float  # the `migrate` command's round trip
    drain: float  # reading the stream until QEMU closed its end
    confirm: float  # query-migrate / query-status until completed + postmigrate
    caps_off: float  # x-ignore-shared off (0 when kept on)
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
    caps_on: float
    getfd: float
    incoming: float  # the `migrate-incoming` command's round trip
    load: float  # feeding the blob until QEMU finished loading it
    total: float


@dataclass(frozen=True)
class ResumeTimings:
    cont: float
    announce: float
    total: float


def _set_ignore_shared(qmp: QMPClient, state: bool) -> None:
    qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": IGNORE_SHARED, "state": state}]})


def _ignore_shared_state(qmp: QMPClient) -> bool:
    for cap in qmp.execute("query-migrate-capabilities"):
        if cap.get("capability") == IGNORE_SHARED:
            return bool(cap.get("state"))
    raise DeviceStateError(f"this QEMU has no {IGNORE_SHARED} migration capability (QEMU >= 4.0 needed)")


def _pipe() -> tuple[int, int]:
    """A pipe, close-on-exec, as large as the system allows up to PIPE_SIZE."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return read_fd, write_fd


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _qemu_words(err: MonitorError) -> str:
    return err.desc if isinstance(err, QMPError) else str(err)


def _suppress_vmdesc(qmp: QMPClient) -> bool:
    """Whether the machine leaves the JSON device description out of the stream."""
    try:
        return bool(qmp.execute("qom-get", {"path": "/machine", "property": "suppress-vmdesc"}))
    except QMPError:
        return False  # no such property: the description is always written


def _memdevs(qmp: QMPClient) -> list[dict[str, Any]]:
    devs: list[dict[str, Any]] = qmp.execute("query-memdev")
    return devs


class DeviceStateSaver(Closing):
    """Saves the device state of one primary QEMU, once per stop/cont cycle.

    ``qmp`` is the direct QMP connection of the primary (the saver uses it from the
    caller's thread only). The constructor checks that every memory backend is
    ``share=on`` (otherwise RAM would travel in the blob) and that no migration is
    running. ``keep_ignore_shared`` keeps the capability on until :meth:`close`.
    """

    def __init__(
        self,
        qmp: QMPClient,
        *,
        keep_ignore_shared: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        fdname: str = "cuju-devstate",
        logger: logging.Logger | None = None,
    ) -> None:
        self.qmp = qmp
        self.keep_ignore_shared = keep_ignore_shared
        self.timeout = timeout
        self.fdname = fdname
        self.log = logger or log
        self.saves = 0
        self._caps_on = False
        #: The machine writes the trailing device description (see :mod:`.vmstate`).
        self.vmdesc = True
        self._check_primary()
        if keep_ignore_shared:
            _set_ignore_shared(qmp, True)
            self._caps_on = True

    def _check_primary(self) -> None:
        try:
            devs = _memdevs(self.qmp)
            migration = self.qmp.execute("query-migrate").get("status")
            currently_on = _ignore_shared_state(self.qmp)
            self.vmdesc = not _suppress_vmdesc(self.qmp)
        except MonitorError as err:
            raise DeviceStateError("cannot inspect the primary QEMU", _qemu_words(err)) from err
        unshared = [str(dev.get("id")) for dev in devs if not dev.get("share")]
        problems = []
        if not devs:
            problems.append("guest RAM is not a memory backend object (use -machine memory-backend=)")
        if unshared:
            problems.append(
                f"memory backend(s) {', '.join(unshared)} not shared: give the domain "
                "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"
            )
        if migration not in (None, *_TERMINAL):
            problems.append(f"a migration is in progress (status {migration})")
        if problems:
            raise DeviceStateError("cannot save device state of this QEMU: " + "; ".join(problems))
        if currently_on:
            self.log.warning(
                "%s was already on in the primary QEMU; it is turned off after saves", IGNORE_SHARED
            )

    def save(self) -> SavedState:
        """Save the device state of the stopped VM; the VM stays stopped (``postmigrate``).

        Raises :class:`~cuju_libvirt.errors.StateError` if the VM is running or was already
        saved in this stop/cont cycle (nothing changed), and :class:`DeviceStateError` with
        QEMU's message if the save fails; the VM is then still stopped and ``cont`` resumes it.
        """
        clock = time.perf_counter
        t0 = clock()
        try:
            status = self.qmp.execute("query-status")["status"]
        except MonitorError as err:
            raise DeviceStateError("cannot query the primary's run state", _qemu_words(err)) from err
        if status == "postmigrate":
            raise StateError("device state was already saved in this stop/cont cycle: cont the VM first")
        if status != "paused":
            raise StateError(f"device state can only be saved while the VM is stopped; it is {status!r}")
        t1 = clock()
        caps_changed = False
        read_fd, write_fd = _pipe()
        fd_registered = False
        migrating = False
        try:
            if not self._caps_on:
                _set_ignore_shared(self.qmp, True)
                caps_changed = True
            t2 = clock()
            self.qmp.execute("getfd", {"fdname": self.fdname}, fd=write_fd)
            fd_registered = True
            _close(write_fd)
            write_fd = -1
            t3 = clock()
            self.qmp.execute("migrate", {"uri": f"fd:{self.fdname}"})
            fd_registered = False  # QEMU took it over
            migrating = True
            t4 = clock()
            blob = self._drain(read_fd, t0 + self.timeout)
            t5 = clock()
            self._confirm(t0 + self.timeout)
            migrating = False
            t6 = clock()
            if caps_changed:
                _set_ignore_shared(self.qmp, False)
                caps_changed = False
            t7 = clock()
        except MonitorError as err:
            raise DeviceStateError("device-state save failed", _qemu_words(err)) from err
        finally:
            if write_fd >= 0:
                _close(write_fd)
            _close(read_fd)
            self._clean_up(migrating=migrating, fd_registered=fd_registered, caps_changed=caps_changed)
        try:
            check_end(blob, vmdesc=self.vmdesc)
        except BlobFormatError as err:
            raise DeviceStateError(f"QEMU reported success but the stream is incomplete: {err}") from err
        self.saves += 1
        toggled = not self._caps_on
        timings = SaveTimings(
            check=t1 - t0,
            caps_on=t2 - t1 if toggled else 0.0,
            getfd=t3 - t2,
            migrate=t4 - t3,
            drain=t5 - t4,
            confirm=t6 - t5,
            caps_off=t7 - t6 if toggled else 0.0,
            total=t7 - t0,
        )
        return SavedState(blob, timings)

    def _drain(self, read_fd: int, deadline: float) -> bytes:
        chunks: list[bytes] = []
        poller = select.poll()
        poller.register(read_fd, select.POLLIN)
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise DeviceStateError(
                    f"device-state save did not finish within {self.timeout} s "
                    f"({sum(map(len, chunks))} bytes received)"
                )
            chunk = os.read(read_fd, _CHUNK)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def _confirm(self, deadline: float) -> None:
        """Wait for a terminal migration state and the postmigrate run state; fail with QEMU's reason."""
        while True:
            info = self.qmp.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                break
            if status in _TERMINAL:
                raise DeviceStateError(
                    f"device-state save {status}", str(info.get("error-desc", "QEMU gave no reason"))
                )
            self._check_deadline(deadline, f"migration status {status}")
        while (run := self.qmp.execute("query-status")["status"]) != "postmigrate":
            if run != "finish-migrate":
                raise DeviceStateError(f"after the save the VM is {run!r}, not 'postmigrate'")
            self._check_deadline(deadline, f"run state {run}")

    def _check_deadline(self, deadline: float, waiting: str) -> None:
        if time.perf_counter() > deadline:
            raise DeviceStateError(f"device-state save did not finish within {self.timeout} s ({waiting})")

    def _clean_up(self, *, migrating: bool, fd_registered: bool, caps_changed: bool) -> None:
        """After a failed save: stop the migration, drop the fd, restore the capability (best effort)."""
        if not (migrating or fd_registered or caps_changed):
            return
        try:
            if migrating:
                self._cancel()
            if fd_registered:
                with contextlib.suppress(QMPError):
                    self.qmp.execute("closefd", {"fdname": self.fdname})
            if caps_changed:
                _set_ignore_shared(self.qmp, False)
        except QMPConnectionError as err:  # QEMU is gone: nothing left to clean; the save's error is raised
            self.log.debug("cleaning up after a failed device-state save: %s", err)
        except MonitorError as err:
            self.log.error("cleaning up after a failed device-state save: %s", err)

    def _cancel(self) -> None:
        deadline = time.perf_counter() + self.timeout
        with contextlib.suppress(QMPError):
            self.qmp.execute("migrate_cancel")
        while self.qmp.execute("query-migrate").get("status") not in _TERMINAL:
            if time.perf_counter() > deadline:
                self.log.error("migration did not end after migrate_cancel")
                return
            time.sleep(0.001)

    def close(self) -> None:
        """Turn ``x-ignore-shared`` off if it was kept on; idempotent."""
        if not self._caps_on:
            return
        self._caps_on = False
        try:
            _set_ignore_shared(self.qmp, False)
        except MonitorError as err:
            self.log.error("could not turn %s off again: %s", IGNORE_SHARED, err)


# -- standby ---------------------------------------------------------------------------------


def _ramblocks(qmp: QMPClient) -> dict[str, tuple[int, int]] | None:
    """The standby's RAM blocks as {name: (used, max)} from HMP ``info ramblock``; None if unavailable."""
    try:
        text = qmp.execute("human-monitor-command", {"command-line": "info ramblock"})
    except QMPError:
        return None
    blocks = {}
    for line in str(text).splitlines():
        match = _RAMBLOCK_LINE.match(line)
        if match:
            blocks[match["name"]] = (int(match["used"], 16), int(match["max"], 16))
    return blocks or None


def check_standby(qmp: QMPClient, info: BlobInfo) -> None:
    """Raise :class:`StandbyMismatchError` unless the standby can take a blob described by ``info``.

    Checked: the standby waits for an incoming migration; same machine type; every memory
    backend shared, and listed in the blob with the same size; the same set of RAM blocks,
    each large enough. Not checkable here: the device list and CPU model (QEMU checks them
    while loading, fatally); keep them equal by starting both from the same domain XML.
    """
    try:
        status = qmp.execute("query-status")["status"]
        machine = str(qmp.execute("qom-get", {"path": "/machine", "property": "type"}))
        devs = _memdevs(qmp)
        blocks = _ramblocks(qmp)
    except MonitorError as err:
        raise DeviceStateError("cannot inspect the standby QEMU", _qemu_words(err)) from err
    problems = []
    if status != "inmigrate":
        problems.append(f"standby is {status!r}, not waiting for state: start it with -incoming defer")
    machine = machine.removesuffix("-machine")
    if machine != info.machine_type:
        problems.append(f"machine type: primary {info.machine_type}, standby {machine}")
    sent = {block.name: block.length for block in info.ram_blocks}
    for dev in devs:
        ident = str(dev.get("id"))
        if not dev.get("share"):
            problems.append(f"standby memory backend {ident} is not share=on")
        if ident not in sent:
            problems.append(f"standby memory backend {ident} does not exist on the primary")
        elif sent[ident] != int(dev.get("size", -1)):
            problems.append(f"memory backend {ident}: primary {sent[ident]} bytes, standby {dev.get('size')}")
    if blocks is None:
        log.warning("standby QEMU does not answer 'info ramblock': RAM block list not compared")
    else:
        for name in sorted(set(sent) - set(blocks)):
            problems.append(f"RAM block {name} exists only on the primary")
        for name in sorted(set(blocks) - set(sent)):
            problems.append(f"RAM block {name} exists only on the standby")
        for name in sorted(set(sent) & set(blocks)):
            used, maximum = blocks[name]
            resizable = used != maximum
            if sent[name] > maximum or (not resizable and sent[name] != used):
                problems.append(f"RAM block {name}: primary {sent[name]:#x} bytes, standby {used:#x}")
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
) -> LoadTimings:
    """Load ``blob`` into the standby QEMU behind ``qmp``; on return it is loaded and ``paused``.

    With ``verify`` (the default) the blob and the standby are checked first
    (:func:`parse_blob`, :func:`check_standby`): a failed check leaves the standby untouched,
    still waiting, so a good blob can follow. Past that point a refusal by QEMU ends the
    standby QEMU (QEMU 7.2 exits on a failed incoming migration); the
    :class:`DeviceStateError` then carries QEMU's reason, read from ``qemu_log`` if given.
    The standby is never resumed here.
    """
    clock = time.perf_counter
    t0 = clock()
    deadline = t0 + timeout
    log_path = Path(qemu_log) if qemu_log is not None else None
    if verify:
        try:
            vmdesc = not _suppress_vmdesc(qmp)
        except MonitorError as err:
            raise DeviceStateError("cannot inspect the standby QEMU", _qemu_words(err)) from err
        check_standby(qmp, parse_blob(blob, vmdesc=vmdesc))
    t1 = clock()
    read_fd, write_fd = _pipe()
    try:
        try:
            _set_ignore_shared(qmp, True)
            t2 = clock()
            qmp.execute("getfd", {"fdname": fdname}, fd=read_fd)
            _close(read_fd)
            read_fd = -1
            t3 = clock()
            qmp.execute("migrate-incoming", {"uri": f"fd:{fdname}"})
            t4 = clock()
            _feed(write_fd, blob, deadline)
            _close(write_fd)
            write_fd = -1
            _wait_loaded(qmp, deadline)
            t5 = clock()
        except (MonitorError, OSError) as err:
            raise _load_failure(err, log_path) from err
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                _close(fd)
    return LoadTimings(
        check=t1 - t0, caps_on=t2 - t1, getfd=t3 - t2, incoming=t4 - t3, load=t5 - t4, total=t5 - t0
    )


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
        log.warning("standby resumed by itself after the load (the blob came from a running VM?)")


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


def resume_standby(qmp: QMPClient, *, announce: bool = True) -> ResumeTimings:
    """``cont`` the loaded standby and (by default) ``announce-self`` its NICs."""
    clock = time.perf_counter
    t0 = clock()
    try:
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
) -> tuple[LoadTimings, ResumeTimings]:
    """Load the last committed blob into the standby and resume it."""
    loaded = load_device_state(qmp, blob, timeout=timeout, qemu_log=qemu_log)
    return loaded, resume_standby(qmp, announce=announce)
