"""Type stub for the C extension cuju_libvirt._cuju (hand-written; keep in step with c_ext/)."""

import array
import mmap
from typing import final

__version__: str
WIRE_VERSION: int
features: frozenset[str]

# --- replicate (c_ext/sender.c, receiver.c; wire format in c_ext/wire.h) ---
_ReadBuffer = bytes | bytearray | memoryview | mmap.mmap | array.array[int]
_WriteBuffer = bytearray | memoryview | mmap.mmap | array.array[int]

MAX_DEVICE_STATE: int

def checksum(data: _ReadBuffer, seed: int = 0) -> int: ...
def raw_send(fd: int, buffer: _ReadBuffer, timeout: float | None = None) -> None: ...
def raw_recv(fd: int, buffer: _WriteBuffer, timeout: float | None = None) -> None: ...

@final
class Sender:
    def __init__(
        self,
        fd: int,
        region: _ReadBuffer,
        *,
        page_size: int = 4096,
        session_id: int = 0,
        io_timeout: float | None = None,
    ) -> None: ...
    def handshake(self, timeout: float | None = None) -> int: ...
    def stage(
        self, epoch: int, dirty_indexes: _ReadBuffer, device_state: _ReadBuffer, timeout: float | None = None
    ) -> None: ...
    def ship(self) -> None: ...
    def wait_ack(self, epoch: int, timeout: float | None = None) -> bool: ...
    def counters(self) -> dict[str, int]: ...
    def close(self, orderly: bool = True, timeout: float | None = None) -> None: ...

@final
class Receiver:
    def __init__(
        self,
        region: _WriteBuffer,
        device_state_path: str | bytes,
        journal_path: str | bytes,
        *,
        page_size: int = 4096,
        durable: bool = False,
    ) -> None: ...
    @property
    def last_applied(self) -> int: ...
    def start(
        self, fd: int, io_timeout: float | None = None, handshake_timeout: float | None = None
    ) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...
    def counters(self) -> dict[str, int]: ...
    def error(self) -> tuple[int, str, int, int] | None: ...
    def close(self) -> None: ...
