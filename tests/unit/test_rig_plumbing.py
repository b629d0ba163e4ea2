"""The rig's pure parts: path mapping, mountinfo parsing, capability errors, the CLI's usage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cuju_libvirt.errors import RigError
from cuju_libvirt.rig import sandbox
from cuju_libvirt.rig.hosts import HOST_SPECS, Host, Rig
from cuju_libvirt.rig.sandbox import Cgroup, RigUnavailable


def _host(tmp_path: Path) -> Host:
    return Host("abc123", HOST_SPECS[0], tmp_path / "a", Cgroup(tmp_path / "cg"))


def test_outside_maps_each_bound_directory_to_the_rig_root(tmp_path: Path) -> None:
    host = _host(tmp_path)
    root = tmp_path / "a"
    assert host.outside("/run/libvirt/libvirt-sock") == root / "run/libvirt/libvirt-sock"
    assert host.outside("/etc/libvirt/hooks/qemu.d/cuju") == root / "etc/hooks/qemu.d/cuju"
    assert host.outside("/var/lib/libvirt/qemu/ram/libvirt/qemu/1-vm/pc.ram") == (
        root / "lib/qemu/ram/libvirt/qemu/1-vm/pc.ram"
    )
    assert host.outside("/var/log/libvirt/qemu/vm.log") == root / "log/qemu/vm.log"
    assert host.outside("/var/cache/libvirt") == root / "cache"
    assert host.outside("/etc/hosts") == root / "hosts"
    assert host.outside("/etc/cuju-libvirt/cujud.yaml") == root / "cuju/etc/cujud.yaml"
    assert host.outside("/var/lib/cuju-libvirt/state") == root / "cuju/lib/state"
    # Elsewhere in the overlaid trees: where the host's own writes land.
    assert host.outside("/etc/libvirtd.conf") == root / "overlay/etc/upper/libvirtd.conf"
    assert host.outside("/var/lib/libvirtx/f") == root / "overlay/var-lib/upper/libvirtx/f"
    assert host.outside("/var/log/syslog") == root / "overlay/var-log/upper/syslog"
    # Not in the host's own trees: the same file inside and out.
    assert host.outside("/usr/bin/qemu-system-x86_64") == Path("/usr/bin/qemu-system-x86_64")
    assert host.outside("/var/cache/cuju-libvirt/x.img") == Path("/var/cache/cuju-libvirt/x.img")


def test_uri_names_the_hosts_own_socket(tmp_path: Path) -> None:
    assert _host(tmp_path).uri == f"qemu+unix:///system?socket={tmp_path}/a/run/libvirt/libvirt-sock"


def test_mountinfo_paths_are_unescaped() -> None:
    assert sandbox._unescape_mount_path(r"/tmp/with\040space") == "/tmp/with space"
    assert sandbox._unescape_mount_path("/sys/fs/cgroup/unified") == "/sys/fs/cgroup/unified"


def test_missing_capabilities_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sandbox, "find_tool", lambda name: None if name == "libvirtd" else f"/usr/bin/{name}")
    monkeypatch.setattr(sandbox, "cgroup2_mount", lambda: None)
    sandbox.check_capabilities.cache_clear()
    try:
        with pytest.raises(RigUnavailable) as caught:
            sandbox.check_capabilities()
    finally:
        sandbox.check_capabilities.cache_clear()
    reasons = caught.value.reasons
    assert any("not running as root" in r for r in reasons)
    assert any("'libvirtd' not found" in r for r in reasons)
    assert any("no cgroup v2" in r for r in reasons)
    assert str(caught.value).startswith("the two-host rig cannot run here: ")


@pytest.mark.parametrize("bad", ["UPPER", "has-dash", "", "x" * 13])
def test_rig_ids_are_checked(bad: str) -> None:
    with pytest.raises(RigError, match="rig id"):
        Rig(rig_id=bad or "-")


def test_cli_help_reads_like_a_man_page() -> None:
    proc = subprocess.run([sys.executable, "-m", "cuju_libvirt.rig", "--help"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0
    for section in ("FILES", "EXIT STATUS", "EXAMPLES", "up", "down", "status", "demo"):
        assert section in proc.stdout
    assert "_reap" not in proc.stdout


def test_cli_down_without_rigs_is_a_one_line_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "cuju_libvirt.rig", "down"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "cuju_libvirt.rig: name the rigs to remove "
        "(ids from 'python -m cuju_libvirt.rig status') or use --all"
    ]


def test_sweep_removes_only_rigs_of_dead_owners_and_old_stateless_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cuju_libvirt.rig import teardown  # noqa: PLC0415

    me = {"pid": os.getpid(), "start": sandbox.pid_start_time(os.getpid())}
    dead = {"pid": 2**22 + 7, "start": 1}  # above pid_max's default: never a live process
    young = tmp_path / "young"
    young.mkdir()
    rigs = {
        "live": teardown.RigTraces("live", root=tmp_path, state={"owner": me}),
        "dead": teardown.RigTraces("dead", root=tmp_path, state={"owner": dead}),
        "person": teardown.RigTraces("person", root=tmp_path, state={"owner": None}),
        "young": teardown.RigTraces("young", root=young, state=None),
    }
    removed: list[str] = []
    monkeypatch.setattr(teardown, "discover", lambda bases=(): rigs)
    monkeypatch.setattr(teardown, "remove_rig", lambda traces, **kw: removed.append(traces.rig_id))
    assert teardown.sweep_stale(min_age=60) == ["dead"]
    assert teardown.sweep_stale(min_age=0) == ["dead", "young"]
    assert removed == ["dead", "dead", "young"]


def test_host_specs_keep_two_hosts_as_they_were_and_grow_onto_an_ft_bridge() -> None:
    from cuju_libvirt.rig.nodes import FT_PREFIXLEN, FT_SWITCH_PREFIXLEN, host_specs  # noqa: PLC0415

    two = host_specs()
    assert two == HOST_SPECS
    assert [(s.name, s.hostname, s.ft_address, s.lan_address, s.ft_prefixlen) for s in two] == [
        ("a", "cuju-a", "198.18.0.1", "198.19.0.11", FT_PREFIXLEN),
        ("b", "cuju-b", "198.18.0.2", "198.19.0.12", FT_PREFIXLEN),
    ]
    three = host_specs(3)
    assert three[:2] == tuple(s.__class__(s.name, s.hostname, s.ft_address, s.lan_address,
                                          FT_SWITCH_PREFIXLEN) for s in two)
    assert three[2].hostname == "cuju-c" and three[2].ft_address == "198.18.0.3"
    eight = host_specs(8)
    for field in ("name", "hostname", "ft_address", "lan_address"):
        assert len({getattr(s, field) for s in eight}) == 8, field
    assert all(int(s.lan_address.rsplit(".", 1)[1]) < 31 for s in eight)  # etcd members use .31 up
    for bad in (1, 9):
        with pytest.raises(RigError, match="2 to 8 hosts"):
            host_specs(bad)
    assert len(Rig(host_count=3).specs) == 3
