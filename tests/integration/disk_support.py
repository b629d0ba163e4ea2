"""Helpers for the replicated-disk tests: a real block server, writes through QEMU's NBD
client (qemu-io), a model disk, and a backup in a process of its own (to be killed).

    python -m tests.integration.disk_support receive STATE PORT REPLICA:SIZE [REPLICA:SIZE ...]
"""

from __future__ import annotations

import mmap
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cuju_libvirt import disk_server
from cuju_libvirt.ft_engine.disks import DiskSet, ProtectedDisk
from cuju_libvirt.ft_engine.replicator import EpochReceiver

PAGE = 4096


@dataclass
class ModelDisk:
    """One served disk and what it must contain."""

    target: str
    image: Path
    paths: disk_server.ServerPaths
    size: int
    model: bytearray = field(default_factory=bytearray)

    def ops(self, rng: random.Random, count: int) -> list[str]:
        """Random qemu-io commands (writes, write-zeroes with and without unmap, discards),
        applied to the model as they are generated."""
        cmds = []
        for _ in range(count):
            kind = rng.random()
            length = rng.choice([512, 4096, 4096, 8192, 65536, 3 * 4096, 200 * 1024])
            length = min(length, self.size)
            offset = rng.randrange(0, (self.size - length) // 512 + 1) * 512
            if kind < 0.65:
                byte = rng.randrange(1, 256)
                cmds.append(f"write -P {byte} {offset} {length}")
                self.model[offset:offset + length] = bytes([byte]) * length
            elif kind < 0.8:
                cmds.append(f"write -z {offset} {length}")
                self.model[offset:offset + length] = bytes(length)
            elif kind < 0.9:
                cmds.append(f"write -z -u {offset} {length}")
                self.model[offset:offset + length] = bytes(length)
            else:
                cmds.append(f"discard {offset} {length}")
                self.model[offset:offset + length] = bytes(length)
        return cmds

    def run(self, cmds: list[str]) -> None:
        """Send the commands through QEMU's NBD client; returns when every one is replied."""
        argv = ["qemu-io", "-f", "raw", "-d", "unmap"]
        for c in cmds:
            argv += ["-c", c]
        argv.append(f"nbd+unix:///{self.target}?socket={self.paths.socket}")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0 and "error" not in done.stdout.lower(), done.stdout + done.stderr


@contextmanager
def served_disks(
    directory: Path, sizes: dict[str, int], capacity: int = 16 << 20
) -> Iterator[list[ModelDisk]]:
    """Sparse images served by real block servers (stopped afterwards, also on failure)."""
    disks = []
    try:
        for target, size in sizes.items():
            image = directory / f"{target}.img"
            with image.open("wb") as f:
                f.truncate(size)
            paths = disk_server.ServerPaths.under(directory, target)
            disk_server.start(paths, str(image), target=target, capacity=capacity)
            disks.append(ModelDisk(target, image, paths, size, bytearray(size)))
        yield disks
    finally:
        for d in disks:
            disk_server.stop(d.paths)


def disk_set(disks: list[ModelDisk]) -> DiskSet:
    return DiskSet([ProtectedDisk(d.target, str(d.image), d.paths.journal) for d in disks])


def receive(state: str, port: int, replicas: list[tuple[str, int]]) -> int:
    region = mmap.mmap(-1, PAGE)
    rx = EpochReceiver(region, state, disks=replicas)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        rx.start(sock)
    print("ready", flush=True)
    rx.wait(None)
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    assert args[0] == "receive"
    reps = [(spec.rsplit(":", 1)[0], int(spec.rsplit(":", 1)[1])) for spec in args[3:]]
    sys.exit(receive(args[1], int(args[2]), reps))
