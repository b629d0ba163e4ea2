"""Locally built test guests and their build cache.

The **boot-sector guest** (``guest_src/boot.asm``, ``nasm -f bin``, one 512-byte raw disk
image) sets up COM1, enters flat 32-bit protected mode and loops: increment the counter at
:data:`COUNTER_GPA`, print it in decimal on COM1, busy-wait. Under TCG it counts a few
thousand times per second within a second of start. With the ``pc`` machine and a single
file memory backend, the RAM file offset equals the guest-physical address for low memory,
so the counter can be read straight out of the RAM file (:func:`read_counter`).

The **memory-writer** variant (:class:`WriterConfig`) also writes the counter into
``writes`` pseudo-random pages of a span of RAM per iteration, and into ``run_pages``
consecutive pages every ``run_every`` iterations. Every write stores a value the page
never held before (the counter only grows), so a brute-force diff of the RAM file sees
every page the guest wrote.

Besides the span, the guest writes only :data:`GUEST_OWN_PAGES` once it runs (stack and
counter page); its code page is never written.

Images are cached in ``$CUJU_CACHE_DIR`` (default ``/var/cache/cuju-libvirt``) under a name
that carries the hash of the source and the build parameters, so a build happens only when
either changed; a new image is renamed into place atomically. ``python -m
cuju_libvirt.rig.guests`` builds both images and prints their paths.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cuju_libvirt.errors import RigError

#: Where built guest images are kept unless ``$CUJU_CACHE_DIR`` says otherwise.
DEFAULT_CACHE_DIR = Path("/var/cache/cuju-libvirt")
CACHE_ENV = "CUJU_CACHE_DIR"

PAGE_SIZE = 4096
#: Guest-physical address of the u32 (little-endian) counter.
COUNTER_GPA = 0x8000
#: Guest-physical address of the u32 magic the guest writes once it reached protected mode.
MAGIC_GPA = 0x8004
#: The command word of a ``power=True`` guest (:func:`command_guest`).
COMMAND_GPA = 0x800C
#: Commands of a ``power=True`` guest: the guest itself powers off (ACPI S5), resets, or
#: suspends to RAM (ACPI S3; woken, it boots again).
POWER_OFF, RESET, SUSPEND = 1, 2, 3
MAGIC = 0x554A5543  # b"CUJU"
#: Guest-physical address of the writer's xorshift32 state.
RNG_GPA = 0x8008
#: Where the boot sector is loaded (read-only once running).
CODE_GPA = 0x7C00
#: Page frame numbers the guest itself writes while looping: stack (0x6000) and counter (0x8000).
GUEST_OWN_PAGES = frozenset({0x6000 // PAGE_SIZE, COUNTER_GPA // PAGE_SIZE})
#: Busy-wait iterations per count; ~2,000-3,000 counts/s under TCG on the development machine.
DEFAULT_DELAY = 100_000

_SOURCE = "boot.asm"
_BANNER = re.compile(r"cuju-boot (counter|writer)\r?\n")


@dataclass(frozen=True)
class WriterConfig:
    """What the memory-writer guest writes each iteration (see ``guest_src/boot.asm``).

    ``span_base`` and ``span_pages`` give the RAM span (default: 64 MiB from 1 MiB); each
    iteration writes ``writes`` pseudo-random pages of it, and every ``run_every``-th
    iteration (a power of two) also ``run_pages`` consecutive pages from a random start.
    ``seed`` seeds the xorshift32 generator (non-zero).
    """

    span_base: int = 0x100000
    span_pages: int = 16384
    writes: int = 16
    run_every: int = 16
    run_pages: int = 64
    seed: int = 0x2545F491

    def __post_init__(self) -> None:
        problems = []
        if self.span_base < 0x100000 or self.span_base % PAGE_SIZE:
            problems.append(f"span_base {self.span_base:#x} must be page-aligned and at least 1 MiB")
        if not 1 <= self.span_pages <= (0xFFFFFFFF - self.span_base) // PAGE_SIZE:
            problems.append(f"span_pages {self.span_pages} must be at least 1 and fit below 4 GiB")
        if not 0 <= self.writes <= 0xFFFF:
            problems.append(f"writes {self.writes} must be in 0..65535")
        if self.run_every < 1 or self.run_every & (self.run_every - 1):
            problems.append(f"run_every {self.run_every} must be a power of two")
        if not 1 <= self.run_pages <= self.span_pages:
            problems.append(f"run_pages {self.run_pages} must be in 1..span_pages")
        if not 1 <= self.seed <= 0xFFFFFFFF:
            problems.append(f"seed {self.seed:#x} must be a non-zero u32")
        if problems:
            raise ValueError("invalid WriterConfig: " + "; ".join(problems))

    @property
    def span_end(self) -> int:
        """First guest-physical address after the span."""
        return self.span_base + self.span_pages * PAGE_SIZE

    @property
    def min_memory_mib(self) -> int:
        """The smallest guest RAM (MiB) that holds the whole span."""
        return -(-self.span_end // (1 << 20))

    def span_pfns(self) -> range:
        """Page frame numbers of the span."""
        return range(self.span_base // PAGE_SIZE, self.span_end // PAGE_SIZE)

    def defines(self) -> dict[str, int]:
        return {
            "WRITER": 1,
            "SPAN_BASE": self.span_base,
            "SPAN_PAGES": self.span_pages,
            "WRITES": self.writes,
            "RUN_EVERY": self.run_every,
            "RUN_PAGES": self.run_pages,
            "SEED": self.seed,
        }


def cache_dir() -> Path:
    """The build cache directory: ``$CUJU_CACHE_DIR`` or ``/var/cache/cuju-libvirt``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def _source_text() -> bytes:
    return resources.files("cuju_libvirt.rig").joinpath("guest_src", _SOURCE).read_bytes()


def boot_image(
    writer: WriterConfig | None = None,
    *,
    delay: int = DEFAULT_DELAY,
    cache: str | os.PathLike[str] | None = None,
    power: bool = False,
) -> Path:
    """Path of the boot-sector guest image (counter, or memory writer if ``writer``), built if needed.
    ``power``: the guest also obeys :func:`command_guest` (it powers off or resets itself)."""
    if not 1 <= delay <= 0xFFFFFFFF:
        raise ValueError(f"delay {delay} must be in 1..4294967295")
    defines = {"DELAY": delay}
    if power:
        defines["POWER"] = 1
    if writer is not None:
        defines.update(writer.defines())
    source = _source_text()
    digest = hashlib.sha256(source)
    for key in sorted(defines):
        digest.update(f"\0{key}={defines[key]}".encode())
    kind = "writer" if writer is not None else "counter"
    directory = Path(cache) if cache is not None else cache_dir()
    target = directory / f"boot-{kind}-{digest.hexdigest()[:16]}.img"
    if target.is_file() and target.stat().st_size == 512:
        return target
    return _assemble(source, defines, directory, target)


def _assemble(source: bytes, defines: dict[str, int], directory: Path, target: Path) -> Path:
    nasm = shutil.which("nasm")
    if nasm is None:
        raise RigError("nasm not found: install the Debian package nasm (scripts/setup.sh does)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RigError(f"cannot create the guest cache {directory}: {err}; set {CACHE_ENV}") from err
    with tempfile.TemporaryDirectory(prefix=".build-", dir=directory) as tmp:
        src = Path(tmp) / _SOURCE
        src.write_bytes(source)
        out = Path(tmp) / "image"
        argv = [nasm, "-f", "bin", "-o", str(out)]
        argv += [f"-D{key}={value}" for key, value in sorted(defines.items())]
        proc = subprocess.run([*argv, str(src)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RigError(f"nasm failed on {_SOURCE} with {defines}: {proc.stderr.strip()}")
        image = out.read_bytes()
        if len(image) != 512 or image[510:] != b"\x55\xaa":
            raise RigError(f"nasm produced {len(image)} bytes, not a 512-byte boot sector: code too big")
        os.chmod(out, 0o644)
        os.replace(out, target)
    return target


def command_guest(ram_path: str | os.PathLike[str], command: int) -> None:
    """Ask a ``power=True`` guest to power off (:data:`POWER_OFF`), reset (:data:`RESET`) or
    suspend to RAM (:data:`SUSPEND`) itself: the command word is written through its RAM file
    and read by its next iteration."""
    fd = os.open(ram_path, os.O_WRONLY)
    try:
        os.pwrite(fd, struct.pack("<I", command), COMMAND_GPA)
    finally:
        os.close(fd)


def read_counter(ram_path: str | os.PathLike[str]) -> int:
    """The counter, read straight from a guest RAM file (0 before the guest started counting)."""
    fd = os.open(ram_path, os.O_RDONLY)
    try:
        data = os.pread(fd, 8, COUNTER_GPA)
    finally:
        os.close(fd)
    counter, magic = struct.unpack("<II", data)
    return counter if magic == MAGIC else 0


def serial_counts(text: str) -> list[int]:
    """The counter values the guest printed on COM1, in order (complete lines after the banner)."""
    starts = [match.end() for match in _BANNER.finditer(text)]
    if not starts:
        return []
    lines = text[starts[-1] :].split("\n")
    counts = []
    for line in lines[:-1]:  # the last piece may be a line still being written
        value = line.strip()
        if value.isdigit():
            counts.append(int(value))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cuju_libvirt.rig.guests",
        description="Build (or find in the cache) the boot-sector test guest images and print their paths.",
        epilog=f"The cache is ${CACHE_ENV}, default {DEFAULT_CACHE_DIR}.",
    )
    parser.parse_args(argv)
    try:
        print(f"counter {boot_image()}")
        print(f"writer  {boot_image(WriterConfig())}")
    except RigError as err:
        print(f"guests: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
