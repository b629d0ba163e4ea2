"""The Linux test guest: a Debian kernel and a busybox initramfs, built locally and cached.

What the guest is made of (nothing downloaded at run time beyond Debian packages):

* the kernel of the Debian package that ``linux-image-amd64`` depends on (resolved with
  ``apt-cache``, fetched with ``apt-get download``, unpacked with ``dpkg-deb -x``);
* from the same package, the virtio modules in :data:`MODULES` plus everything they
  depend on (read from each module's ``depends`` field with ``modinfo``), copied in
  dependency order (``.ko.xz``/``.ko.zst`` are decompressed at build time);
* ``/bin/busybox`` of ``busybox-static``;
* ``/bin/agent``, the workload program (``guest_src/agent.c``, ``gcc -static -O2``);
* ``/init`` (``guest_src/init``), which mounts proc/sys/devtmpfs, loads the modules,
  configures ``eth0`` from the kernel command line and runs the workloads of ``cuju.mode``.

The initramfs (newc cpio, gzip) is written here, byte-for-byte reproducibly (fixed owners
and times), including the ``/dev/console`` node the kernel needs before devtmpfs is up.

Kernel and initramfs are cached in ``$CUJU_CACHE_DIR`` (default ``/var/cache/cuju-libvirt``)
in a directory named after a hash of every input (kernel package and version, sources,
module list, busybox and compiler); a new build is renamed into place atomically, so
concurrent builders never see a half-written guest. ``python -m cuju_libvirt.rig.linux_guest``
builds it and prints the paths.

Use :func:`kernel_cmdline` to write the ``-append`` string for a workload (its keys are
listed in ``guest_src/agent.c`` and ``guest_src/init``) and :func:`parse_serial` to read
the guest's reports back from its serial console.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import ipaddress
import json
import logging
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cuju_libvirt.errors import RigError
from cuju_libvirt.rig.guests import CACHE_ENV, DEFAULT_CACHE_DIR, cache_dir

log = logging.getLogger(__name__)

#: The modules the guest loads (their dependencies are added and ordered at build time).
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "virtio_balloon",
    "crc32c_generic",  # ext4's metadata checksums (the fsrec workload)
    "ext4",
)
#: Workloads the agent knows (``cuju.mode``; several may be joined with commas).
MODES = ("count", "udp", "echo", "stress", "balloon", "diskread", "cpu", "service", "fsrec", "pattern")
#: The Debian meta package whose dependency names the kernel package.
KERNEL_META_PACKAGE = "linux-image-amd64"
#: Bumped whenever the layout of the build changes in a way the inputs do not show.
BUILD_FORMAT = 2
#: ELF note (owner "Xen") holding the 32-bit PVH entry point; QEMU boots such an ELF directly.
XEN_ELFNOTE_PHYS32_ENTRY = 18

_SOURCES = ("agent.c", "init")
_NAME_RE = re.compile(r"^linux-image-[0-9][A-Za-z0-9.+-]*$")


@dataclass(frozen=True)
class LinuxGuest:
    """A built guest: where its kernel and initramfs are, and what they were built from.

    ``kernel`` is what to boot (``-kernel`` or libvirt's ``<kernel>``): the uncompressed
    ELF ``vmlinux`` when the kernel has a PVH entry point (QEMU then skips the bzImage
    decompressor, which under TCG takes longer than the rest of the boot), else the
    package's ``vmlinuz``. ``bzimage`` is always the package's ``vmlinuz``.
    """

    kernel: Path
    initrd: Path
    bzimage: Path
    pvh: bool
    kernel_package: str
    kernel_version: str
    modules: tuple[str, ...]
    key: str

    @property
    def directory(self) -> Path:
        return self.kernel.parent


# -- inputs ---------------------------------------------------------------------------------


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd)
    except FileNotFoundError as err:
        raise RigError(f"{what}: {argv[0]} not found; run scripts/setup.sh to install it") from err
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RigError(f"{what}: `{' '.join(argv)}` failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


def parse_kernel_dependency(apt_cache_depends: str) -> str | None:
    """The kernel package named in ``apt-cache depends linux-image-amd64`` output, if any."""
    for line in apt_cache_depends.splitlines():
        key, _, value = line.strip().partition(":")
        name = value.strip()
        if key in ("Depends", "|Depends") and _NAME_RE.match(name):
            return name
    return None


def parse_candidate(apt_cache_policy: str) -> str | None:
    """The candidate version in ``apt-cache policy PACKAGE`` output, if there is one."""
    for line in apt_cache_policy.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Candidate" and value.strip() not in ("", "(none)"):
            return value.strip()
    return None


def resolve_kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel ``linux-image-amd64`` depends on, per the apt lists.

    With empty apt lists (a fresh machine) it runs ``apt-get update`` once and asks again.
    """
    for attempt in (1, 2):
        name = parse_kernel_dependency(
            _run(["apt-cache", "depends", KERNEL_META_PACKAGE], "resolving the guest kernel")
        )
        version = None
        if name is not None:
            version = parse_candidate(_run(["apt-cache", "policy", name], "resolving the guest kernel"))
        if name is not None and version is not None:
            return name, version
        if attempt == 1:
            log.info("apt knows no candidate for %s: running apt-get update", KERNEL_META_PACKAGE)
            _run(["apt-get", "update", "-qq"], "updating the apt package lists")
    raise RigError(
        f"apt has no installable kernel behind {KERNEL_META_PACKAGE}: check /etc/apt/sources.list "
        "(Debian main) and run apt-get update"
    )


def _source(name: str) -> bytes:
    return resources.files("cuju_libvirt.rig").joinpath("guest_src", name).read_bytes()


def _busybox_path() -> Path:
    for line in _run(["dpkg-query", "-L", "busybox-static"], "finding busybox-static").splitlines():
        if line.endswith("/bin/busybox") and Path(line).is_file():
            return Path(line)
    raise RigError("busybox-static ships no /bin/busybox here: reinstall the Debian package busybox-static")


def build_key(package: str, version: str, busybox: bytes, compiler: str) -> str:
    """Hash of every input of the build; the cache directory is named after it."""
    digest = hashlib.sha256(f"format={BUILD_FORMAT}\0{package}={version}\0".encode())
    digest.update(("\0".join(MODULES) + "\0" + compiler + "\0").encode())
    digest.update(hashlib.sha256(busybox).digest())
    for name in _SOURCES:
        digest.update(name.encode() + b"\0" + hashlib.sha256(_source(name)).digest())
    return digest.hexdigest()[:20]


# -- modules --------------------------------------------------------------------------------


def module_name(path: Path) -> str:
    """``virtio-rng.ko.xz`` -> ``virtio_rng`` (the kernel treats ``-`` and ``_`` alike)."""
    return path.name.split(".ko")[0].replace("-", "_")


def order_modules(wanted: Iterable[str], depends: Mapping[str, Iterable[str]]) -> list[str]:
    """``wanted`` plus their dependencies, each after everything it depends on.

    ``depends`` maps a module to the modules it needs (``modinfo -F depends``). Ties keep the
    order of ``wanted``; a missing module or a dependency cycle is a :class:`RigError`.
    """
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise RigError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in depends:
            via = f" (needed by {chain[-1]})" if chain else ""
            raise RigError(f"kernel module {name}{via} is not in the kernel package")
        state[name] = "visiting"
        for dep in depends[name]:
            visit(dep, (*chain, name))
        state[name] = "done"
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def _module_files(modules_root: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(modules_root.rglob("*.ko*")):
        if re.search(r"\.ko(\.xz|\.zst|\.gz)?$", path.name):
            files[module_name(path)] = path
    return files


def _module_depends(files: Mapping[str, Path], wanted: Iterable[str]) -> dict[str, list[str]]:
    """``modinfo -F depends`` for ``wanted`` and, transitively, what they need."""
    depends: dict[str, list[str]] = {}
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in depends or name not in files:
            continue
        out = _run(["modinfo", "-F", "depends", str(files[name])], f"reading module {name}").strip()
        depends[name] = [dep.replace("-", "_") for dep in out.split(",") if dep]
        todo.extend(depends[name])
    return depends


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise RigError(f"{path.name} is zstd-compressed: install the Debian package zstd")
        return subprocess.run([zstd, "-dc", str(path)], capture_output=True, check=True).stdout
    return data


# -- initramfs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive: a directory, regular file, symlink or device node."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def cpio_newc(entries: Iterable[CpioEntry]) -> bytes:
    """A newc ("070701") cpio archive of ``entries``, owners root, times zero, then the trailer."""
    out = bytearray()
    members = [*entries, CpioEntry("TRAILER!!!", 0)]
    for ino, entry in enumerate(members, start=1):
        name = entry.path.lstrip("/").encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, *entry.rdev, len(name), 0)
        out += b"070701" + b"".join(b"%08X" % value for value in fields)
        out += name
        out += b"\0" * (-len(out) % 4)
        out += entry.data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def initramfs_entries(
    busybox: bytes, agent: bytes, init: bytes, modules: Iterable[tuple[str, bytes]]
) -> Iterator[CpioEntry]:
    """The members of the guest's initramfs, parents before children."""
    directory = stat.S_IFDIR | 0o755
    for path in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp", "sbin", "usr"):
        yield CpioEntry(path, directory)
    yield CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    yield CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3))
    yield CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox)
    yield CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox")
    yield CpioEntry("bin/agent", stat.S_IFREG | 0o755, agent)
    yield CpioEntry("init", stat.S_IFREG | 0o755, init)
    names = []
    for name, data in modules:
        names.append(name)
        yield CpioEntry(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, data)
    yield CpioEntry("etc/cuju-modules", stat.S_IFREG | 0o644, ("\n".join(names) + "\n").encode())


# -- build ----------------------------------------------------------------------------------


def _compiler_id() -> str:
    return _run(["gcc", "--version"], "checking the C compiler").splitlines()[0]


def compile_agent(directory: str | os.PathLike[str]) -> Path:
    """Compile ``guest_src/agent.c`` (static) into ``directory``; the binary's path.

    The same binary the guest runs; on the host it is handy for testing the workloads
    against an :class:`~cuju_libvirt.rig.observer.Observer` over loopback.
    """
    work = Path(directory)
    src = work / "agent.c"
    src.write_bytes(_source("agent.c"))
    out = work / "agent"
    _run(
        ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(src)],
        "compiling the guest agent (needs gcc and libc6-dev)",
    )
    return out


def _load(directory: Path) -> LinuxGuest | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        guest = LinuxGuest(
            kernel=directory / str(manifest["kernel"]),
            initrd=directory / "initrd.gz",
            bzimage=directory / "vmlinuz",
            pvh=manifest["kernel"] == "vmlinux",
            kernel_package=str(manifest["kernel_package"]),
            kernel_version=str(manifest["kernel_version"]),
            modules=tuple(manifest["modules"]),
            key=str(manifest["key"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return guest if all(p.is_file() for p in (guest.kernel, guest.initrd, guest.bzimage)) else None


_BUILD_PREFIX = ".linux-guest-build-"
#: A build directory untouched for this long belongs to a builder that was killed.
STALE_BUILD_SECONDS = 3600.0


def _sweep_stale_builds(root: Path) -> None:
    """Remove build directories of killed builders, and guests built from other inputs
    (older sources or kernels) more than an hour ago: each one is ~75 MB."""
    for pattern in (_BUILD_PREFIX + "*", "linux-guest-*"):
        for entry in root.glob(pattern):
            try:
                if time.time() - entry.stat().st_mtime > STALE_BUILD_SECONDS:
                    log.info("removing %s from the guest cache (stale)", entry)
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                continue


class StaleAptLists(RigError):
    """``apt-get download`` failed: the package lists may name a version the archive dropped."""


def build_linux_guest(cache: str | os.PathLike[str] | None = None) -> LinuxGuest:
    """The Linux test guest for the current Debian kernel, from the cache or built now.

    A build downloads one kernel package (~70 MB) and takes ~15 s; a cached guest is
    returned after a few ``apt-cache``/``dpkg-query`` look-ups. If the download fails (old
    package lists naming a kernel the archive no longer has), the lists are updated once
    and the kernel resolved again.
    """
    try:
        return _build_linux_guest(cache)
    except StaleAptLists as err:
        log.info("%s: running apt-get update and resolving the kernel again", err)
        _run(["apt-get", "update", "-qq"], "updating the apt package lists")
        return _build_linux_guest(cache)


def _build_linux_guest(cache: str | os.PathLike[str] | None) -> LinuxGuest:
    package, version = resolve_kernel_package()
    busybox_path = _busybox_path()
    busybox = busybox_path.read_bytes()
    key = build_key(package, version, busybox, _compiler_id())
    root = Path(cache) if cache is not None else cache_dir()
    target = root / f"linux-guest-{key}"
    cached = _load(target)
    if cached is not None:
        log.debug("Linux guest %s from the cache: %s", key, target)
        return cached
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RigError(f"cannot create the guest cache {root}: {err}; set {CACHE_ENV}") from err
    _sweep_stale_builds(root)
    log.info("building the Linux test guest from %s=%s into %s", package, version, target)
    with tempfile.TemporaryDirectory(prefix=_BUILD_PREFIX, dir=root) as tmp:
        work = Path(tmp)
        staged = work / "guest"
        staged.mkdir()
        kernel_version, modules, kernel = _build_into(work, staged, package, version, busybox)
        manifest = {
            "key": key,
            "kernel": kernel,
            "kernel_package": f"{package}={version}",
            "kernel_version": kernel_version,
            "modules": modules,
            "busybox": str(busybox_path),
        }
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        staged.chmod(0o755)
        try:
            staged.rename(target)
        except OSError:
            # Another builder renamed the same inputs into place first: use theirs.
            if _load(target) is None:
                raise
    guest = _load(target)
    if guest is None:
        raise RigError(f"the Linux guest built into {target} cannot be read back")
    return guest


def _build_into(
    work: Path, staged: Path, package: str, version: str, busybox: bytes
) -> tuple[str, list[str], str]:
    debs = work / "debs"
    debs.mkdir()
    try:
        _run(["apt-get", "download", "-q", f"{package}={version}"], "downloading the guest kernel", cwd=debs)
    except RigError as err:
        raise StaleAptLists(str(err)) from err
    deb = next(iter(debs.glob("*.deb")), None)
    if deb is None:
        raise RigError(f"apt-get download {package}={version} left no .deb in {debs}")
    unpacked = work / "unpacked"
    _run(["dpkg-deb", "-x", str(deb), str(unpacked)], f"unpacking {deb.name}")
    kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
    module_roots = sorted((unpacked / "lib" / "modules").glob("*/kernel"))
    if len(kernels) != 1 or len(module_roots) != 1:
        raise RigError(f"{deb.name}: expected one boot/vmlinuz-* and one lib/modules/*/kernel")
    kernel_version = kernels[0].name.removeprefix("vmlinuz-")
    files = _module_files(module_roots[0])
    order = order_modules(MODULES, _module_depends(files, MODULES))
    agent = compile_agent(work).read_bytes()
    entries = initramfs_entries(
        busybox, agent, _source("init"), ((name, _module_bytes(files[name])) for name in order)
    )
    archive = cpio_newc(entries)
    with open(staged / "initrd.gz", "wb") as out, gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(archive)
    bzimage = kernels[0].read_bytes()
    (staged / "vmlinuz").write_bytes(bzimage)
    kernel = "vmlinuz"
    elf = pvh_kernel(bzimage)
    if elf is not None:
        (staged / "vmlinux").write_bytes(elf)
        kernel = "vmlinux"
    else:
        log.info("%s has no PVH entry point: the guest boots the bzImage (slower under TCG)", kernels[0].name)
    for leaf in ("vmlinuz", "vmlinux", "initrd.gz"):
        if (staged / leaf).exists():
            (staged / leaf).chmod(0o644)
    return kernel_version, order, kernel


def elf_has_pvh_entry(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF carries the Xen PHYS32_ENTRY note (PVH boot)."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        base = phoff + index * phentsize
        if base + 56 > len(elf):
            return False
        (p_type,) = struct.unpack_from("<I", elf, base)
        (offset,) = struct.unpack_from("<Q", elf, base + 8)
        (size,) = struct.unpack_from("<Q", elf, base + 32)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = offset, min(offset + size, len(elf))
        while pos + 12 <= end:
            namesz, descsz, kind = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz]
            if name == b"Xen\0" and kind == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _unxz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _gunzip(data: bytes) -> bytes:
    return zlib.decompressobj(31).decompress(data)


def pvh_kernel(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF inside a bzImage if it can be booted through PVH, else None.

    Finds the payload by its xz or gzip magic and decompresses it; other compressions
    (zstd, lz4, ...) give None and the caller boots the bzImage.
    """
    decoders: tuple[tuple[bytes, Callable[[bytes], bytes]], ...] = (
        (b"\xfd7zXZ\x00", _unxz),
        (b"\x1f\x8b\x08", _gunzip),
    )
    for magic, decompress in decoders:
        start = bzimage.find(magic)
        while start >= 0:
            try:
                elf = decompress(bzimage[start:])
            except (lzma.LZMAError, zlib.error, EOFError):
                elf = b""
            if elf[:4] == b"\x7fELF":
                return elf if elf_has_pvh_entry(elf) else None
            start = bzimage.find(magic, start + 1)
    return None


# -- kernel command line and serial output --------------------------------------------------

_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:/,+-]+$")


def kernel_cmdline(
    mode: str,
    *,
    ip: str | None = None,
    gw: str | None = None,
    mac: str | None = None,
    quiet: bool = True,
    **params: str | int,
) -> str:
    """The ``-append`` string that runs ``mode`` (e.g. ``"udp"`` or ``"count,udp"``).

    ``ip`` is ``ADDR/PREFIX`` for ``eth0``; ``params`` become ``cuju.KEY=VALUE`` words for the
    agent (``peer="198.18.0.1:5000"``, ``pps=300``, ...). ``balloon`` adds ``init_on_alloc=0``
    so that freed pages are not zeroed behind the balloon's back.
    """
    modes = mode.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown guest mode {','.join(unknown)}: choose from {', '.join(MODES)}")
    if ip is not None:
        ipaddress.IPv4Interface(ip)
        if "/" not in ip:
            raise ValueError(f"ip {ip!r} must be ADDR/PREFIX, e.g. 198.18.0.2/24")
    if gw is not None:
        ipaddress.IPv4Address(gw)
    if mac is not None and not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", mac):
        raise ValueError(f"mac {mac!r} must look like 52:54:00:12:34:56")
    words = ["console=ttyS0", "panic=-1"]
    if quiet:
        words.append("quiet")
    if "balloon" in modes:
        words.append("init_on_alloc=0")
    words.append(f"cuju.mode={mode}")
    for key, net_value in (("ip", ip), ("gw", gw), ("mac", mac)):
        if net_value is not None:
            words.append(f"cuju.{key}={net_value}")
    for key, value in params.items():
        text = str(value)
        if not re.fullmatch(r"[a-z_]+", key) or not _VALUE_RE.match(text):
            raise ValueError(
                f"guest parameter {key}={text!r}: keys are lower-case words, values have no spaces"
            )
        words.append(f"cuju.{key}={text}")
    return " ".join(words)


_REPORT_RE = re.compile(r"^cuju-([a-z]+): (.*)$")


def parse_serial(text: str, source: str | None = None) -> list[dict[str, str]]:
    """The guest's report lines (``cuju-SOURCE: KEY=VALUE ...``) as dicts, in order.

    Each dict holds the line's ``KEY=VALUE`` words plus ``"source"`` (``init``, ``count``,
    ``udp``, ...); words without ``=`` are kept under ``"words"``. Only complete lines are
    read; ``source`` keeps the lines of one source.
    """
    reports = []
    for line in text.replace("\r", "").split("\n")[:-1]:
        match = _REPORT_RE.match(line.strip())
        if match is None or (source is not None and match.group(1) != source):
            continue
        report = {"source": match.group(1)}
        loose = []
        for word in match.group(2).split():
            key, sep, value = word.partition("=")
            if sep:
                report[key] = value
            else:
                loose.append(word)
        if loose:
            report["words"] = " ".join(loose)
        reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cuju_libvirt.rig.linux_guest",
        description=(
            "Build (or find in the cache) the Linux test guest: the kernel of the Debian package "
            f"{KERNEL_META_PACKAGE} depends on, and a busybox-static initramfs with the virtio "
            "modules and the cuju workload agent. Prints the kernel and initramfs paths."
        ),
        epilog=(
            f"The cache is ${CACHE_ENV}, default {DEFAULT_CACHE_DIR}. Boot it with: qemu-system-x86_64 "
            "-accel tcg -kernel VMLINUZ -initrd INITRD -append 'console=ttyS0 cuju.mode=count' -nographic"
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the build does")
    parser.add_argument(
        "--boot",
        type=int,
        metavar="N",
        default=0,
        help="then boot it N times under TCG (count mode, no network) and print the seconds from "
        "QEMU's start to /init reporting ready, for the kernel in use and for the bzImage",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        guest = build_linux_guest()
    except RigError as err:
        print(f"linux_guest: {err}", file=sys.stderr)
        return 1
    print(f"kernel  {guest.kernel}")
    print(f"initrd  {guest.initrd}")
    print(f"package {guest.kernel_package} ({guest.kernel_version})")
    print(f"modules {' '.join(guest.modules)}")
    try:
        kernels = [guest.kernel] if guest.kernel == guest.bzimage else [guest.kernel, guest.bzimage]
        for run in range(args.boot):
            for kernel in kernels:
                seconds = boot_seconds(guest, kernel)
                print(f"boot    {run + 1}: {kernel.name} /init ready after {seconds:.2f} s")
    except RigError as err:
        print(f"linux_guest: {err}", file=sys.stderr)
        return 1
    return 0


def boot_seconds(guest: LinuxGuest, kernel: Path | None = None, timeout: float = 120.0) -> float:
    """Boot ``guest`` once under TCG (``count`` mode, no NIC); seconds until /init is ready."""
    from cuju_libvirt.rig.qemu_direct import DirectGuest  # noqa: PLC0415  (only for --boot)

    vm = DirectGuest(
        name="cuju-linux-boot",
        memory_mib=256,
        kernel=kernel or guest.kernel,
        initrd=guest.initrd,
        append=kernel_cmdline("count"),
    )
    started = time.monotonic()
    with vm:
        vm.wait_serial(r"cuju-init: ready", timeout=timeout)
        return time.monotonic() - started


if __name__ == "__main__":
    sys.exit(main())
