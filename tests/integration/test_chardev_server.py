"""The chardev server with a real QEMU: the boot-sector guest counts on COM1 into the
server's socket, and the epochs are cut while QEMU is stopped, as the engine does.

The guest stores its counter in RAM, then prints it. So when QEMU is stopped with counter
C in RAM, everything before C is printed in full and "C\\r\\n" at most in part: an epoch
cut then must end exactly there. A cut that missed bytes still in the socket would end
earlier; one that took bytes of the next epoch would show C+1.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt import chardev_server as cs
from cuju_libvirt.chardev_xml import ChardevTarget
from cuju_libvirt.rig.guests import boot_image, read_counter
from cuju_libvirt.rig.qemu_direct import DirectGuest

pytestmark = pytest.mark.timeout(240)
_BANNER = "cuju-boot counter\r\n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[cs.ServerPaths, Path]]:
    paths = cs.ServerPaths(str(tmp_path / "chardev"))
    out = tmp_path / "com1.log"
    cs.start(paths, {"serial0": ChardevTarget("file", path=str(out))})
    try:
        yield paths, out
    finally:
        cs.stop(paths)


def text(path: Path) -> str:
    return path.read_bytes().decode("ascii", errors="replace")  # keeps the \r\n


def _wait(predicate: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _check_ends_at(text: str, counter: int) -> None:
    """``text`` is the counter's output up to the moment the RAM held ``counter``."""
    body = text[text.index(_BANNER) + len(_BANNER):]
    lines = body.split("\r\n")
    full = [int(x) for x in lines[:-1]]
    assert full == list(range(1, len(full) + 1)), "a line is missing or repeated"
    tail = lines[-1]
    if full and full[-1] == counter:
        assert tail == "", f"bytes after {counter}\\r\\n: {tail!r}"
    else:
        assert full[-1] == counter - 1 if full else counter <= 1, (full[-3:], counter)
        assert f"{counter}".startswith(tail), f"the cut does not end in {counter}: tail {tail!r}"


def test_each_cut_ends_exactly_where_the_guest_was_stopped(server: tuple[cs.ServerPaths, Path]) -> None:
    paths, out = server
    with DirectGuest(disk=boot_image(), serial_socket=paths.socket("serial0"),
                     name="cuju-chardev") as guest, cs.ChardevClient(paths.control) as client:
        _wait(lambda: out.exists() and re.search(r"\r\n\d+\r\n", text(out)), "COM1 output passing")
        epoch = 0
        released, last_counter = text(out), 0
        for _ in range(12):
            guest.stop()
            counter = read_counter(guest.ram_path)
            epoch += 1
            client.call("cut", epoch=epoch)
            guest.cont()
            if epoch == 1:  # the first cut releases what came before: nothing was protected yet
                _check_ends_at(text(out), counter)
            else:
                assert text(out) == released, "held output left before its commit"
                client.call("commit", epoch=epoch - 1)
                _check_ends_at(text(out), last_counter)
            released = text(out)
            last_counter = counter
            time.sleep(0.05)
        status = client.call("status")["chardevs"]["serial0"]
        assert status["holding"] and status["held_epochs"] == [epoch] and status["qemu_connected"]
        # the backup resumed from the last epoch: released up to it, the running tail dropped
        guest.stop()
        client.call("settle", epoch=epoch)
        _check_ends_at(text(out), last_counter)
        status = client.call("status")["chardevs"]["serial0"]
        assert status["finished"] and status["held_bytes"] == 0 and status["dropped_bytes"] > 0


def test_release_all_lets_everything_out_and_passes_again(server: tuple[cs.ServerPaths, Path]) -> None:
    paths, out = server
    with DirectGuest(disk=boot_image(), serial_socket=paths.socket("serial0"),
                     name="cuju-chardev2") as guest, cs.ChardevClient(paths.control) as client:
        _wait(lambda: out.exists() and _BANNER in text(out), "the banner")
        guest.stop()
        client.call("cut", epoch=1)
        guest.cont()
        time.sleep(0.3)
        guest.stop()
        counter = read_counter(guest.ram_path)
        client.call("release-all")
        _check_ends_at(text(out), counter)
        guest.cont()
        before = len(text(out))
        _wait(lambda: len(text(out)) > before, "output passing again")


def test_finish_exits_once_nothing_is_held(server: tuple[cs.ServerPaths, Path]) -> None:
    paths, _ = server
    pid = cs.running_pid(paths)
    assert pid is not None
    with cs.ChardevClient(paths.control) as client:
        client.call("cut", epoch=1)
    cs.finish(paths)
    _wait(lambda: cs.running_pid(paths) is None, "the server's exit", 20)


def test_a_socket_target_that_cannot_take_a_connection_never_stalls_the_server(tmp_path: Path) -> None:
    """A ``connect`` target whose listener does not accept (its backlog full) used to block the
    server's one thread in connect(): no cut was answered (each pause waited on it) and QEMU's
    writes stopped being read. The server must keep answering and connect once it can."""
    user = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    user.bind(str(tmp_path / "user.sock"))
    user.listen(0)
    fillers = []
    while True:  # fill the backlog: a blocking connect() to it now waits forever
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        fillers.append(s)
        if s.connect_ex(str(tmp_path / "user.sock")) != 0:
            break
    paths = cs.ServerPaths(str(tmp_path / "chardev"))
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        cs.start(paths, {"serial0": ChardevTarget("unix", path=str(tmp_path / "user.sock"), mode="connect")})
        qemu.connect(paths.socket("serial0"))
        with cs.ChardevClient(paths.control, timeout=10.0) as client:
            for i in range(5):
                qemu.sendall(f"line {i}\r\n".encode())  # passing: released at once, to a closed target
                time.sleep(0.2)
                assert client.call("status")["chardevs"]["serial0"]["qemu_connected"]
            for s in fillers:
                s.close()
            got, conns = b"", []
            deadline = time.monotonic() + 30
            user.settimeout(0.2)
            while b"later" not in got:  # the fillers' queued connections first, then the server's
                assert time.monotonic() < deadline, f"the target never got the output once it could: {got!r}"
                qemu.sendall(b"later\r\n")
                with contextlib.suppress(TimeoutError):
                    conns.append(user.accept()[0])
                    conns[-1].setblocking(False)
                for conn in conns:
                    with contextlib.suppress(BlockingIOError):
                        got += conn.recv(4096)
            for conn in conns:
                conn.close()
    finally:
        qemu.close()
        user.close()
        for s in fillers:
            s.close()
        cs.stop(paths)
