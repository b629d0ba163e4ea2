"""The AppArmor rules the package adds to libvirt's QEMU profiles parse, are really included
through libvirt's site-local abstraction, and cover the paths cuju-libvirt makes QEMU use.

This machine's kernel has no AppArmor LSM: apparmor_parser only compiles the profiles here
(--skip-kernel-load); loading them into a kernel is not tested (docs/packaging.md)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cuju_libvirt import fitness
from cuju_libvirt.ft_engine import devstate

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "packaging" / "apparmor" / "cuju-libvirt-qemu"
POSTINST = ROOT / "packaging" / "debian" / "postinst"
TMPFILES = ROOT / "packaging" / "tmpfiles.d" / "cuju-libvirt.conf"
LIBVIRT_ABSTRACTION = Path("/etc/apparmor.d/abstractions/libvirt-qemu")

needs_parser = pytest.mark.skipif(shutil.which("apparmor_parser") is None or not LIBVIRT_ABSTRACTION.exists(),
                                  reason="apparmor_parser or libvirt's AppArmor abstraction not installed")


def _include_line() -> str:
    found = re.search(r'^AA_LINE="(.*)"$', POSTINST.read_text(), re.M)
    assert found, "postinst defines the include line it adds"
    return found.group(1)


def _tree(tmp_path: Path, rules: str) -> Path:
    """An include tree like /etc/apparmor.d after the package's postinst, and a domain profile."""
    (tmp_path / "abstractions").mkdir()
    (tmp_path / "abstractions" / "cuju-libvirt-qemu").write_text(rules)
    (tmp_path / "local" / "abstractions").mkdir(parents=True)
    (tmp_path / "local" / "abstractions" / "libvirt-qemu").write_text(_include_line() + "\n")
    profile = tmp_path / "libvirt-test"
    # libvirt's TEMPLATE.qemu, as virt-aa-helper instantiates it for each domain
    profile.write_text("#include <tunables/global>\nprofile libvirt-test flags=(attach_disconnected) {\n"
                       "  #include <abstractions/libvirt-qemu>\n}\n")
    return profile


def _parse(tmp_path: Path, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apparmor_parser", "--skip-kernel-load", "--skip-cache", "--quiet",
         "-I", str(tmp_path), "-I", "/etc/apparmor.d", str(profile)],
        capture_output=True, text=True, timeout=120, check=False)


@needs_parser
def test_rules_parse_inside_libvirts_qemu_profile(tmp_path: Path) -> None:
    result = _parse(tmp_path, _tree(tmp_path, RULES.read_text()))
    assert result.returncode == 0, result.stderr


@needs_parser
def test_profile_really_includes_the_rules(tmp_path: Path) -> None:
    """A broken rule in our file must break the domain profile: the include chain reaches it."""
    result = _parse(tmp_path, _tree(tmp_path, RULES.read_text() + "  /run/cuju-libvirt/x bogus,\n"))
    assert result.returncode != 0
    assert "cuju-libvirt-qemu" in result.stderr


def _rules() -> list[tuple[bool, re.Pattern[str], str]]:
    """(deny, path regex, permissions) of each file rule (AppArmor globs: * within a name, ** across)."""
    out = []
    for line in RULES.read_text().splitlines():
        m = re.match(r"^\s*(deny\s+)?(/\S+)\s+([rwkml]+),\s*(#.*)?$", line)
        if m:
            glob = re.escape(m.group(2)).replace(r"\*\*", "\0").replace(r"\*", "[^/]*").replace("\0", ".*")
            out.append((bool(m.group(1)), re.compile(glob + "$"), m.group(3)))
    return out


def _allows(path: str, perm: str) -> bool:
    rules = _rules()
    if any(deny and rx.match(path) for deny, rx, _p in rules):
        return False
    return any(not deny and rx.match(path) and perm in perms for deny, rx, perms in rules)


def test_rules_cover_the_paths_qemu_is_given() -> None:
    assert _allows(fitness.qmp_socket_path("vm-1"), "w")  # QEMU creates and listens on it

    class DirectQMP:
        path = fitness.qmp_socket_path("vm-1")

    # QEMU writes the per-epoch device state (xen-save-devices-state) where the engine says by default
    assert _allows(devstate.default_path(DirectQMP()), "w")  # type: ignore[arg-type]
    assert _allows("/run/cuju-libvirt/counters/cuju-oc-net0-f1.count", "w")
    assert _allows("/run/cuju-libvirt/devstate/0a1b.devstate", "w")
    assert _allows("/run/cuju-libvirt/nbd/vm-1-vda.sock", "w")
    assert not _allows("/run/cuju-libvirt/cujud.sock", "w"), "QEMU must not reach cujud's control socket"
    assert not _allows("/etc/cuju-libvirt/psk", "r")


def test_tmpfiles_create_every_directory_the_rules_name() -> None:
    made = {line.split()[1] for line in TMPFILES.read_text().splitlines() if line.startswith("d ")}
    named = set(re.findall(r"(/run/cuju-libvirt/[a-z]+)/", RULES.read_text()))
    assert named <= made, sorted(named - made)
    assert fitness.QMP_SOCKET_DIR in made
