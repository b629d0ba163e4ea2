"""The engine's side of serial output commit: one domain's chardev server, driven per epoch.

The server (:mod:`cuju_libvirt.chardev_server`, started by the libvirt hook) holds what
QEMU writes to the domain's held serial ports; the engine tells it where each epoch ends
(:meth:`ChardevHold.cut`, VM stopped, in the same pause as the network boundary) and which
epoch the backup acknowledged (:meth:`ChardevHold.acked`). Who ends protection tells it
how: the VM goes on here (:meth:`ChardevHold.release_all`) or the backup resumed from an
epoch (:meth:`ChardevHold.settle`). A cut that fails fails the epoch (it must never ship
with its serial output unaccounted for); the other calls log and go on.
"""

from __future__ import annotations

import logging

from cuju_libvirt._closing import Closing
from cuju_libvirt.chardev_server import ChardevClient, ChardevServerError, ServerPaths, running_pid
from cuju_libvirt.errors import ReplicationError

log = logging.getLogger(__name__)


class ChardevHoldError(ReplicationError):
    """The chardev server did not take an epoch boundary."""


class ChardevHold(Closing):
    """The connection to one domain's chardev server (used from one thread at a time)."""

    def __init__(self, paths: ServerPaths, timeout: float = 5.0) -> None:
        self.paths = paths
        self.timeout = timeout
        self._client: ChardevClient | None = None
        self.last_cut: int | None = None

    @classmethod
    def of(cls, uuid: str) -> ChardevHold | None:
        """The hold of a domain whose chardev server runs on this host, or None."""
        paths = ServerPaths.of(uuid)
        return cls(paths) if running_pid(paths) is not None else None

    def _call(self, op: str, **params: int) -> None:
        if self._client is None:
            self._client = ChardevClient(self.paths.control, self.timeout)
        try:
            self._client.call(op, **params)
        except ChardevServerError:
            self._client.close()
            self._client = None
            raise

    def cut(self, epoch: int) -> None:
        """VM stopped: what QEMU wrote so far is epoch ``epoch``'s."""
        try:
            self._call("cut", epoch=epoch)
        except ChardevServerError as err:
            raise ChardevHoldError(f"serial output commit: {err}") from err
        self.last_cut = epoch

    def acked(self, epoch: int) -> None:
        self._quiet("commit", epoch=epoch)

    def release_all(self) -> None:
        self._quiet("release-all")

    def settle(self, epoch: int) -> None:
        self._quiet("settle", epoch=epoch)

    def _quiet(self, op: str, **params: int) -> None:
        try:
            self._call(op, **params)
        except ChardevServerError as err:
            log.warning("serial output commit (%s): %s", op, err)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
