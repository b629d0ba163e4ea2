"""``cuju-libvirt doctor`` on the rig's hosts (real libvirtd, real QEMU binary, cujud on both):
it passes as the rig is set up, and fails naming the fix when a requirement is taken away."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest

from cuju_libvirt.rig.cujud import HOOK_NAME, Cujud
from cuju_libvirt.rig.hosts import Rig
from cuju_libvirt.rig.nodes import Host

pytestmark = pytest.mark.timeout(300)


def doctor(host: Host, peer: Host, *extra: str) -> tuple[int, dict[str, dict[str, Any]]]:
    proc = host.run([sys.executable, "-m", "cuju_libvirt.cli", "doctor", "--json",
                     "--ft-peer", f"{peer.ft_address}:7791", *extra], check=False, timeout=120)
    report = json.loads(proc.stdout)
    assert report["ok"] == (proc.returncode == 0), proc.stdout
    return proc.returncode, {row["check"]: row for row in report["checks"]}


def test_doctor_passes_on_both_rig_hosts(ft_rig: Rig, cujuds: tuple[Cujud, Cujud]) -> None:
    for host, peer in ((ft_rig.a, ft_rig.b), (ft_rig.b, ft_rig.a)):
        code, rows = doctor(host, peer)
        failed = {k: v for k, v in rows.items() if v["status"] == "fail"}
        assert code == 0 and not failed, json.dumps(failed, indent=1)
        for check in ("libvirt", "libvirt.hook", "libvirt.hook-loaded", "qemu.capabilities", "cujud",
                      "ram-backing-dir", "ptrace", "psk"):
            assert rows[check]["status"] == "ok", rows[check]
        control = rows[f"peer.control {peer.hostname}"]
        assert control["status"] == "ok" and "authenticated ping" in control["detail"]
        assert rows[f"peer.ft-link {peer.ft_address}:7791"]["status"] == "ok"


def test_doctor_names_the_fix_for_each_requirement_removed(ft_rig: Rig, cujuds: tuple[Cujud, Cujud]) -> None:
    a, b = ft_rig.a, ft_rig.b
    hook = a.hooks_dir / HOOK_NAME
    # A hook installed after libvirtd started is not run by it.
    os.utime(hook)
    code, rows = doctor(a, b)
    assert code == 1
    assert rows["libvirt.hook-loaded"]["status"] == "fail"
    assert "restart" in rows["libvirt.hook-loaded"]["fix"]
    a.restart_libvirtd()
    code, rows = doctor(a, b)
    assert code == 0 and rows["libvirt.hook-loaded"]["status"] == "ok", rows["libvirt.hook-loaded"]

    # No hook at all.
    saved = hook.read_bytes()
    hook.unlink()
    try:
        code, rows = doctor(a, b)
        assert code == 1
        assert "install-hooks" in rows["libvirt.hook"]["fix"]
    finally:
        hook.write_bytes(saved)
        hook.chmod(0o755)
        a.restart_libvirtd()

    # The RAM backing directory gone (a path that does not exist stands in for it).
    code, rows = doctor(a, b, "--ram-dir", "/var/lib/libvirt/qemu/no-such-dir")
    assert code == 1 and "mount a tmpfs" in rows["ram-backing-dir"]["fix"]

    # The peer's cujud down: both paths fail, each with its fix.
    _, cb = cujuds
    cb.stop()
    code, rows = doctor(a, b)
    assert code == 1
    control = rows[f"peer.control {b.hostname}"]
    assert control["status"] == "fail" and "psk" in control["fix"]
    ft = rows[f"peer.ft-link {b.ft_address}:7791"]
    assert ft["status"] == "fail" and "ft_listen" in ft["fix"]
