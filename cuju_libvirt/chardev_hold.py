"""Serial output commit, the pure part: a chardev's bytes held per epoch until committed.

The guest's serial output (``<serial>``/``<console>``) is output like its packets: a line
the primary printed during epoch N must reach the user only once the backup has epoch N,
or a failover resumes from an older state and the standby prints that line again. QEMU's
chardevs cannot hold anything, so a prepared domain's chardev is a UNIX socket served by
the chardev server (:mod:`cuju_libvirt.chardev_server`), which feeds every byte QEMU
writes into one :class:`HeldStream` and writes to the user's target what it releases.

The rules (one stream per chardev; epochs are the engine's numbers, increasing):

* **Passing** (the VM is not protected): every byte is released as it comes.
* :meth:`HeldStream.cut` (VM stopped, after the socket was drained): the bytes since the
  last cut belong to epoch ``epoch``, the one the engine stages in this pause. The first
  cut of a passing stream releases them (nothing protects them yet) and starts holding.
* :meth:`HeldStream.commit` (the backup acknowledged ``epoch``): every closed epoch up to
  it is released, in order.
* :meth:`HeldStream.settle` (the backup took over, resuming from ``epoch``): the closed
  epochs up to it are released, the rest is dropped (the standby prints it again, from
  the very state that printed it here); the stream is then finished.
* :meth:`HeldStream.release_all` (protection ends, the VM goes on *here*): everything held
  is released in order and the stream passes again.

So the released bytes are always a prefix of what the guest wrote, and after a settle
the standby's output continues exactly where the released bytes end.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cuju_libvirt.errors import StateError


@dataclass
class HeldStream:
    """The held output of one chardev (see the module docstring). Not thread-safe."""

    holding: bool = False
    #: Bytes since the last cut (the running epoch).
    running: bytearray = field(default_factory=bytearray)
    #: Closed epochs not yet committed, oldest first: (epoch, bytes).
    closed: deque[tuple[int, bytes]] = field(default_factory=deque)
    #: True after :meth:`settle`: the VM runs elsewhere, nothing more comes or goes.
    finished: bool = False
    #: Bytes released and dropped so far (statistics).
    released_bytes: int = 0
    dropped_bytes: int = 0
    _last_cut: int | None = None

    @property
    def held_bytes(self) -> int:
        return len(self.running) + sum(len(b) for _, b in self.closed)

    @property
    def held_epochs(self) -> list[int]:
        return [e for e, _ in self.closed]

    def write(self, data: bytes) -> bytes:
        """Bytes QEMU wrote; returns what may leave at once (all of it while passing)."""
        if self.finished:
            self.dropped_bytes += len(data)
            return b""
        if not self.holding:
            return self._out(bytes(data))
        self.running += data
        return b""

    def cut(self, epoch: int) -> bytes:
        """The bytes so far belong to ``epoch``; returns what may leave at once."""
        self._require_live("cut an epoch")
        if self._last_cut is not None and epoch <= self._last_cut:
            raise StateError(f"epoch {epoch} cut after epoch {self._last_cut}: epochs must increase")
        self._last_cut = epoch
        data, self.running = bytes(self.running), bytearray()
        if not self.holding:
            self.holding = True
            return self._out(data)
        self.closed.append((epoch, data))
        return b""

    def commit(self, epoch: int) -> bytes:
        """Epoch ``epoch`` is on the backup: release every closed epoch up to it."""
        self._require_live("commit an epoch")
        out = bytearray()
        while self.closed and self.closed[0][0] <= epoch:
            out += self.closed.popleft()[1]
        return self._out(bytes(out))

    def settle(self, epoch: int) -> bytes:
        """The backup resumed from ``epoch``: release up to it, drop the rest, finish."""
        self._require_live("settle")
        out = self.commit(epoch)
        self.dropped_bytes += self.held_bytes
        self.closed.clear()
        self.running = bytearray()
        self.finished = True
        return out

    def release_all(self) -> bytes:
        """Protection ends and the VM goes on here: everything held leaves; passing again."""
        self._require_live("release")
        out = bytearray()
        while self.closed:
            out += self.closed.popleft()[1]
        out += self.running
        self.running = bytearray()
        self.holding = False
        self._last_cut = None
        return self._out(bytes(out))

    def _out(self, data: bytes) -> bytes:
        self.released_bytes += len(data)
        return data

    def _require_live(self, what: str) -> None:
        if self.finished:
            raise StateError(f"the stream was settled (the VM runs elsewhere): cannot {what}")
