"""The doctor's checks fail, naming the fix, when a requirement is missing (fake /proc, /sys,
/etc trees and a fake QEMU; the real host and rig are in tests/e2e/test_doctor_e2e.py)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

from cuju_libvirt import config
from cuju_libvirt.cli import doctor
from cuju_libvirt.cli.doctor import Host, Status
from cuju_libvirt.cli.doctor_cmd import render
from cuju_libvirt.rig.pki import PKI, PKIUnavailable


def _host(tmp_path: Path, yaml_text: str = "") -> Host:
    tmp_path.mkdir(parents=True, exist_ok=True)
    main = tmp_path / "cujud.yaml"
    main.write_text(yaml_text or "{}\n")
    cfg = config.load(main, tmp_path / "cujud.d")
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "status").write_text("Name:\tx\nCapEff:\t000001ffffffffff\n")
    (proc / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n")
    return Host(cfg=cfg, hooks_dir=tmp_path / "hooks", qemu_conf=tmp_path / "qemu.conf",
                apparmor_dir=tmp_path / "apparmor.d", sys_dir=tmp_path / "sys", proc_dir=proc,
                libvirtd_pidfiles=(tmp_path / "libvirtd.pid",), timeout=0.5)


def test_yama_scope_3_fails_with_the_reboot_fix(tmp_path: Path) -> None:
    host = _host(tmp_path)
    yama = host.proc_dir / "sys" / "kernel" / "yama"
    yama.mkdir(parents=True)
    (yama / "ptrace_scope").write_text("3\n")
    [row] = doctor.check_ptrace(host)
    assert row.status is Status.FAIL
    assert "kernel.yama.ptrace_scope=1" in row.fix and "tracker='scan'" in row.fix


def test_missing_cap_sys_ptrace_fails(tmp_path: Path) -> None:
    host = _host(tmp_path)
    (host.proc_dir / "self" / "status").write_text("CapEff:\t0000000000000000\n")
    [row] = doctor.check_ptrace(host)
    assert row.status is Status.FAIL and "CAP_SYS_PTRACE" in row.detail


def test_swap_warns_and_missing_ram_dir_fails(tmp_path: Path) -> None:
    host = _host(tmp_path)
    (host.proc_dir / "swaps").write_text("Filename Type Size Used Priority\n/dev/sda2 partition 1 0 -2\n")
    (tmp_path / "qemu.conf").write_text('# a comment\nmemory_backing_dir = "/nonexistent/ram"\n')
    swap, ram = doctor.check_memory(host)
    assert swap.status is Status.WARN and "<locked/>" in swap.fix
    assert ram.status is Status.FAIL and "/nonexistent/ram" in ram.detail and "tmpfs" in ram.fix


def test_ram_dir_on_a_disk_file_system_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = _host(tmp_path)
    host.ram_dir = tmp_path
    monkeypatch.setattr(doctor.trackers, "_mount_fstype", lambda _path: "ext4")
    _swap, ram = doctor.check_memory(host)
    assert ram.status is Status.WARN and "on ext4" in ram.detail
    assert f"mount -t tmpfs tmpfs {tmp_path}" in ram.fix


def test_hook_missing_not_ours_and_installed_after_libvirtd(tmp_path: Path) -> None:
    host = _host(tmp_path)
    [row] = doctor.check_hook(host)
    assert row.status is Status.FAIL and "install-hooks" in row.fix
    hook = tmp_path / "hooks" / "qemu.d" / "cuju"
    hook.parent.mkdir(parents=True)
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    [row] = doctor.check_hook(host)
    assert row.status is Status.FAIL and "not cuju-libvirt's hook" in row.detail
    hook.write_text(f"#!{sys.executable} -S\nfrom cuju_libvirt.hooks.qemu import run\n")
    # "libvirtd" is this test process, started before the hook was written
    host.proc_dir = Path("/proc")
    (tmp_path / "libvirtd.pid").write_text(f"{os.getpid()}\n")
    rows = doctor.check_hook(host)
    assert [r.status for r in rows] == [Status.OK, Status.FAIL]
    assert "systemctl restart" in rows[1].fix


def test_apparmor_on_without_the_include_fails(tmp_path: Path) -> None:
    host = _host(tmp_path)
    params = host.sys_dir / "module" / "apparmor" / "parameters"
    params.mkdir(parents=True)
    (params / "enabled").write_text("Y\n")
    [row] = doctor.check_lsm(host)
    assert row.status is Status.FAIL and "reinstall" in row.fix
    (host.apparmor_dir / "abstractions").mkdir(parents=True)
    (host.apparmor_dir / "abstractions" / "cuju-libvirt-qemu").write_text("")
    [row] = doctor.check_lsm(host)
    assert row.status is Status.FAIL and doctor.AA_INCLUDE in row.fix
    local = host.apparmor_dir / "local" / "abstractions"
    local.mkdir(parents=True)
    (local / "libvirt-qemu").write_text(f"include if exists {doctor.AA_INCLUDE}\n")
    [row] = doctor.check_lsm(host)
    assert row.status is Status.OK


def test_qemu_without_a_command_fails_naming_it(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    commands = [{"name": c} for c in doctor.QMP_COMMANDS if c != "xen-save-devices-state"]
    replies = [{"QMP": {}}, {"return": {}}, {"return": commands, "id": "commands"},
               {"return": [{"capability": "x-ignore-shared", "state": False}], "id": "caps"},
               {"return": [{"name": "filter-buffer"}], "id": "types"}]
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.stdin.read()\n"
                    + "".join(f"print({json.dumps(json.dumps(r))})\n" for r in replies))
    fake.chmod(0o755)

    class Conn:
        def getCapabilities(self) -> str:
            return (f"<capabilities><host><cpu><arch>x86_64</arch></cpu></host><guest><arch name='x86_64'>"
                    f"<emulator>{fake}</emulator></arch></guest></capabilities>")

    [row] = doctor.check_qemu(_host(tmp_path), Conn())
    assert row.status is Status.FAIL and "xen-save-devices-state" in row.detail


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_peer_and_etcd_fail_with_fixes(tmp_path: Path) -> None:
    port = _closed_port()
    host = _host(tmp_path, f"node_name: a\npeers:\n  b: 127.0.0.1:{port}\n"
                           f"etcd_endpoints: ['http://127.0.0.1:{port}']\netcd_timeout: 0.5\n")
    rows = doctor.check_peers(host, None, None)
    control = next(r for r in rows if r.check == "peer.control b")
    assert control.status is Status.FAIL and "start cujud on b" in control.fix
    [etcd] = doctor.check_etcd(host)
    assert etcd.status is Status.FAIL and "etcd_endpoints" in etcd.fix


def test_etcd_tls_files_that_cannot_be_used_fail_and_name_the_keys(tmp_path: Path) -> None:
    host = _host(tmp_path, f"node_name: a\netcd_endpoints: ['https://127.0.0.1:{_closed_port()}']\n"
                           f"etcd_ca_file: {tmp_path / 'no-such-ca.pem'}\n")
    [etcd] = doctor.check_etcd(host)
    assert etcd.status is Status.FAIL and "etcd_ca_file" in etcd.detail and "no-such-ca.pem" in etcd.detail
    assert "etcd_ca_file" in etcd.fix


def test_a_check_that_raises_is_one_failed_row_and_the_table_names_the_fix(tmp_path: Path) -> None:
    def boom() -> list[doctor.Result]:
        raise OSError("no such thing")

    [row] = doctor._guarded("kernel", boom)
    assert row.status is Status.FAIL and "OSError: no such thing" in row.detail
    text = render([doctor.Result("swap", Status.OK, "no swap"), row])
    assert "fix: run with --debug" in text
    assert text.rstrip().endswith("1 failed (kernel), 0 warning(s)")
    assert doctor.failed([row]) and not doctor.failed([doctor.Result("x", Status.WARN, "w")])


def test_channels_warn_without_tls_fail_on_missing_certificates_and_pass_with_them(
        tmp_path: Path) -> None:
    plain = doctor.check_channels(_host(tmp_path / "plain"))
    assert [r.status for r in plain] == [Status.WARN]
    assert "NOT encrypted" in plain[0].detail and "peer_tls: 'on'" in plain[0].fix
    missing = doctor.check_channels(
        _host(tmp_path / "missing", f"peer_tls: 'on'\ntls_ca_file: {tmp_path / 'nope.pem'}\n"))
    assert [r.status for r in missing] == [Status.FAIL]
    assert "tls_ca_file" in missing[0].detail and "does not exist" in missing[0].detail
    try:
        creds = PKI(tmp_path / "pki").host("a")
    except PKIUnavailable as err:
        pytest.skip(str(err))
    ok = doctor.check_channels(_host(tmp_path / "ok", (
        f"peer_tls: 'on'\ntls_ca_file: {creds.ca_file}\ntls_cert_file: {creds.cert_file}\n"
        f"tls_key_file: {creds.key_file}\n")))
    assert [r.status for r in ok] == [Status.OK] and "AES-256-GCM" in ok[0].detail
