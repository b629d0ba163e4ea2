"""Pure parts of the Linux guest build: apt output, module order, cpio, command line, serial."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cuju_libvirt.errors import RigError
from cuju_libvirt.rig import linux_guest
from cuju_libvirt.rig.linux_guest import (
    MODULES,
    CpioEntry,
    cpio_newc,
    elf_has_pvh_entry,
    kernel_cmdline,
    module_name,
    order_modules,
    parse_candidate,
    parse_kernel_dependency,
    parse_serial,
    pvh_kernel,
)

# `modinfo -F depends` of Debian 12's 6.1 kernel modules, as read at build time.
DEBIAN_DEPENDS = {
    "virtio_ring": [],
    "virtio": ["virtio_ring"],
    "virtio_pci_modern_dev": [],
    "virtio_pci_legacy_dev": [],
    "virtio_pci": ["virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"],
    "failover": [],
    "net_failover": ["failover"],
    "virtio_net": ["virtio_ring", "virtio", "net_failover"],
    "virtio_blk": ["virtio", "virtio_ring"],
    "virtio_balloon": ["virtio", "virtio_ring"],
    "crc32c_generic": [],
    "jbd2": [],
    "mbcache": [],
    "crc16": [],
    "ext4": ["jbd2", "mbcache", "crc16"],
}


def test_kernel_dependency_and_candidate_from_apt_cache_output() -> None:
    depends = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n"
    assert parse_kernel_dependency(depends) == "linux-image-6.1.0-56-amd64"
    assert parse_kernel_dependency("linux-image-amd64\n") is None
    assert parse_kernel_dependency("x\n  Depends: evil; rm -rf /\n") is None
    policy = "linux-image-6.1.0-56-amd64:\n  Installed: (none)\n  Candidate: 6.1.192-2\n  Version table:\n"
    assert parse_candidate(policy) == "6.1.192-2"
    assert parse_candidate("p:\n  Installed: (none)\n  Candidate: (none)\n") is None


def test_module_order_puts_every_dependency_first() -> None:
    order = order_modules(MODULES, DEBIAN_DEPENDS)
    assert sorted(order) == sorted({*MODULES, "jbd2", "mbcache", "crc16"})  # ext4's, pulled in
    for name in order:
        for dep in DEBIAN_DEPENDS[name]:
            assert order.index(dep) < order.index(name), (dep, name)
    # The order DESIGN.md found by hand is a valid one, and the computed one keeps it.
    assert order[:9] == list(MODULES[:9])


def test_module_order_pulls_in_unlisted_dependencies_and_rejects_bad_graphs() -> None:
    assert order_modules(["virtio_net"], DEBIAN_DEPENDS) == [
        "virtio_ring",
        "virtio",
        "failover",
        "net_failover",
        "virtio_net",
    ]
    with pytest.raises(RigError, match=r"cycle: a -> b -> a"):
        order_modules(["a"], {"a": ["b"], "b": ["a"]})
    with pytest.raises(RigError, match=r"virtio_ring \(needed by virtio\) is not in the kernel package"):
        order_modules(["virtio"], {"virtio": ["virtio_ring"]})


def test_module_names_normalise_dashes_and_compression() -> None:
    assert module_name(Path("drivers/char/hw_random/virtio-rng.ko.xz")) == "virtio_rng"
    assert module_name(Path("virtio_net.ko")) == "virtio_net"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio (Debian package cpio) not installed")
def test_cpio_archive_reads_back_with_gnu_cpio(tmp_path: Path) -> None:
    archive = cpio_newc(
        [
            CpioEntry("bin", stat.S_IFDIR | 0o755),
            CpioEntry("bin/tool", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
            CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"tool"),
            CpioEntry("odd", stat.S_IFREG | 0o644, b"x" * 4097),
        ]
    )
    assert len(archive) % 4 == 0 and b"TRAILER!!!" in archive
    listing = subprocess.run(["cpio", "-itv"], input=archive, capture_output=True, check=True).stdout.decode()
    names = [line.split()[8] for line in listing.splitlines()]
    assert names == ["bin", "bin/tool", "bin/sh", "odd"]
    subprocess.run(["cpio", "-id", "--quiet"], input=archive, cwd=tmp_path, check=True)
    assert (tmp_path / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin" / "sh").readlink() == Path("tool")
    assert (tmp_path / "odd").read_bytes() == b"x" * 4097


def test_kernel_cmdline_for_each_workload() -> None:
    line = kernel_cmdline("count,udp", ip="198.18.0.2/24", gw="198.18.0.1", peer="198.18.0.1:5000", pps=300)
    words = line.split()
    assert words[0] == "console=ttyS0"
    assert {
        "cuju.mode=count,udp",
        "cuju.ip=198.18.0.2/24",
        "cuju.gw=198.18.0.1",
        "cuju.peer=198.18.0.1:5000",
        "cuju.pps=300",
    } <= set(words)
    assert "init_on_alloc=0" in kernel_cmdline("balloon").split()
    assert "init_on_alloc=0" not in kernel_cmdline("count").split()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "dance"}, "unknown guest mode dance"),
        ({"mode": "udp", "ip": "198.18.0.2"}, "ADDR/PREFIX"),
        ({"mode": "udp", "ip": "300.1.1.1/24"}, "300.1.1.1"),
        ({"mode": "udp", "mac": "52:54:00"}, "mac"),
        ({"mode": "udp", "peer": "a b"}, "no spaces"),
    ],
)
def test_kernel_cmdline_rejects_bad_values(kwargs: dict[str, str], message: str) -> None:
    mode = kwargs.pop("mode")
    with pytest.raises(ValueError, match=message):
        kernel_cmdline(mode, **kwargs)


def test_parse_serial_reads_complete_report_lines_only() -> None:
    text = (
        "[    0.000000] Linux version 6.1\r\n"
        "cuju-init: ready uptime=2.51 mode=count ip=-\r\n"
        "cuju-count: n=0\r\ncuju-count: n=1\r\n"
        "cuju-udp: tcp=up\n"
        "cuju-count: n=2"  # still being written
    )
    reports = parse_serial(text)
    assert [r["source"] for r in reports] == ["init", "count", "count", "udp"]
    assert reports[0]["words"] == "ready" and reports[0]["uptime"] == "2.51"
    assert [r["n"] for r in parse_serial(text, "count")] == ["0", "1"]


def fake_elf(note_owner: bytes = b"Xen\0", note_type: int = 18) -> bytes:
    """A minimal ELF64 little-endian image with one PT_NOTE segment."""
    note = struct.pack("<III", len(note_owner), 4, note_type) + note_owner.ljust(4, b"\0") + b"\0\0\x10\0"
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, 120, 0, 0, len(note), len(note), 4)
    return header + phdr + note


def test_pvh_entry_note_is_recognised() -> None:
    assert elf_has_pvh_entry(fake_elf())
    assert not elf_has_pvh_entry(fake_elf(note_type=17))
    assert not elf_has_pvh_entry(fake_elf(note_owner=b"GNU\0"))
    assert not elf_has_pvh_entry(b"\x7fELF" + bytes(60))
    assert not elf_has_pvh_entry(fake_elf()[:100])  # program header cut off


@pytest.mark.parametrize("compress", [lzma.compress, gzip.compress])
def test_pvh_kernel_is_found_inside_a_bzimage(compress: Callable[[bytes], bytes]) -> None:
    elf = fake_elf()
    setup = b"MZ" + bytes(1000) + b"\xfd7zXZ\x00 not a stream" + bytes(100)  # a false magic first
    assert pvh_kernel(setup + compress(elf) + bytes(64)) == elf
    assert pvh_kernel(setup + compress(fake_elf(note_type=1))) is None
    assert pvh_kernel(setup) is None


def test_kernel_resolution_updates_apt_lists_once_then_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[list[str]] = []

    def fake_run(argv: list[str], what: str, cwd: Path | None = None) -> str:
        calls.append(argv)
        return "linux-image-amd64\n" if argv[:2] == ["apt-cache", "depends"] else ""

    monkeypatch.setattr(linux_guest, "_run", fake_run)
    with pytest.raises(RigError, match=r"sources\.list .* apt-get update"):
        linux_guest.resolve_kernel_package()
    assert [argv[:2] for argv in calls] == [
        ["apt-cache", "depends"],
        ["apt-get", "update"],
        ["apt-cache", "depends"],
    ]


def test_kernel_resolution_reads_name_and_version(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {
        "depends": "linux-image-amd64\n  Depends: linux-image-6.1.0-99-amd64\n",
        "policy": "linux-image-6.1.0-99-amd64:\n  Installed: (none)\n  Candidate: 6.1.999-1\n",
    }
    monkeypatch.setattr(linux_guest, "_run", lambda argv, what, cwd=None: answers[argv[1]])
    assert linux_guest.resolve_kernel_package() == ("linux-image-6.1.0-99-amd64", "6.1.999-1")


def test_sweep_removes_only_old_builds_and_leftovers(tmp_path: Path) -> None:
    old = time.time() - 2 * linux_guest.STALE_BUILD_SECONDS
    names = ["linux-guest-old", ".linux-guest-build-old", "linux-guest-new", "boot-counter-old.img"]
    for name in names:
        (tmp_path / name).mkdir()
        if name.endswith("old") or name.endswith("old.img"):
            os.utime(tmp_path / name, (old, old))
    linux_guest._sweep_stale_builds(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boot-counter-old.img", "linux-guest-new"]


def test_failed_download_updates_apt_lists_and_retries_once(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[str] = []
    updates: list[list[str]] = []

    def fake_build(cache: Path | None) -> str:
        attempts.append("build")
        if len(attempts) < 3:
            raise linux_guest.StaleAptLists("404  Not Found")
        return "built"

    monkeypatch.setattr(linux_guest, "_build_linux_guest", fake_build)
    monkeypatch.setattr(linux_guest, "_run", lambda argv, what, cwd=None: updates.append(argv) or "")
    with pytest.raises(linux_guest.StaleAptLists):
        linux_guest.build_linux_guest()  # fails again after the one update: no loop
    assert attempts == ["build", "build"] and updates == [["apt-get", "update", "-qq"]]
    assert linux_guest.build_linux_guest() == "built"
