"""The libvirt hook against a real cujud control socket (a ControlServer on a temporary
path): what it lets start, what it refuses and with which line, and the shim's fast exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cuju_libvirt import disk_server, fitness
from cuju_libvirt.cujud import records
from cuju_libvirt.cujud.control import ControlServer, Params
from cuju_libvirt.domain_xml import FTSpec, parse_domain, set_ft
from cuju_libvirt.hooks import qemu as hook
from cuju_libvirt.hooks import shim_text
from cuju_libvirt.rig.domains import domain_xml

UUID = "5a1b6c3e-1111-4222-8333-944455556666"


def protected_xml(policy: str = "start-unprotected", *, standby: bool = False) -> bytes:
    xml = domain_xml("hooked", memory_mib=64, kernel="/boot/vmlinuz", uuid=UUID,
                     qemu_args=("-incoming", "defer") if standby else ())
    xml = set_ft(xml, FTSpec(peer="hostb", on_peer_unavailable=policy))  # type: ignore[arg-type]
    return fitness.prepare(xml).xml.encode()


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every path the hook touches moved under tmp_path."""
    monkeypatch.setattr(hook, "CONTROL_SOCKET", tmp_path / "cujud.sock")
    monkeypatch.setattr(hook, "LOG_FILE", tmp_path / "hook.log")
    monkeypatch.setattr(records, "DEFAULT_STATE_DIR", tmp_path / "state")
    made: list[bool] = []
    monkeypatch.setattr(hook, "make_qmp_dir", lambda: made.append(True))
    return tmp_path


@pytest.fixture
def cujud(sandbox: Path) -> Iterator[list[dict[str, Any]]]:
    """A control server answering hook-prepare like a cujud whose peer is connected."""
    calls: list[dict[str, Any]] = []

    def prepare(params: Params) -> dict[str, Any]:
        calls.append({"method": "hook-prepare", **params})
        return {"start": True, "protect": True, "peer": "hostb"}

    def protect(params: Params) -> dict[str, Any]:
        calls.append({"method": "protect", **params})
        return {"scheduled": True}

    server = ControlServer(sandbox / "cujud.sock", {"hook-prepare": prepare, "protect": protect},
                           allowed_uids=frozenset({os.getuid()}))
    try:
        yield calls
    finally:
        server.close()


@pytest.mark.timeout(30)
def test_prepare_with_cujud_and_peer_lets_the_domain_start(cujud: list[dict[str, Any]]) -> None:
    assert hook.run(["hooked", "prepare", "begin", "-"], protected_xml("refuse-start")) == 0
    assert cujud[0]["method"] == "hook-prepare" and cujud[0]["uuid"] == UUID
    assert hook.run(["hooked", "started", "begin", "-"], protected_xml()) == 0
    assert cujud[1]["method"] == "protect" and cujud[1]["name"] == "hooked"


@pytest.mark.timeout(30)
def test_without_cujud_refuse_start_refuses_with_one_line(
    sandbox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hook.run(["hooked", "prepare", "begin", "-"], protected_xml("refuse-start")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to start" in err and "cujud is not running" in err


@pytest.mark.timeout(30)
def test_without_cujud_start_unprotected_starts_and_says_so(
    sandbox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hook.run(["hooked", "prepare", "begin", "-"], protected_xml()) == 0
    assert capsys.readouterr().err == ""
    assert "starting UNPROTECTED" in (sandbox / "hook.log").read_text()


@pytest.mark.timeout(30)
def test_a_ceded_domain_is_refused_even_without_cujud(
    sandbox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records.write(sandbox / "state", records.CEDED, UUID, domain="hooked", peer="hostb", reason="test")
    assert hook.run(["hooked", "prepare", "begin", "-"], protected_xml()) == 1
    assert "ceded it to hostb" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_an_invalid_element_is_refused(sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    xml = protected_xml().replace(b'peer="hostb"', b'peer="hostb" epoch-ms="0"')
    assert b'epoch-ms="0"' in xml
    assert hook.run(["hooked", "prepare", "begin", "-"], xml) == 1
    assert "epoch-ms" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_a_standby_is_left_alone(cujud: list[dict[str, Any]]) -> None:
    xml = protected_xml(standby=True)
    for op in (("prepare", "begin"), ("started", "begin"), ("stopped", "end")):
        assert hook.run(["hooked", *op, "-"], xml) == 0
    assert cujud == []


def _imports(argv: list[str], xml: bytes = b"") -> tuple[subprocess.CompletedProcess[bytes], set[str]]:
    """Run ``python -S -X importtime ARGV``: the process and every module it imported."""
    proc = subprocess.run([sys.executable, "-S", "-X", "importtime", *argv], input=xml, capture_output=True,
                          check=False)
    lines = proc.stderr.decode().splitlines()
    return proc, {line.rsplit("|", 1)[-1].strip() for line in lines
                  if line.startswith("import time:") and not line.rstrip().endswith("imported package")}


@pytest.mark.timeout(60)
def test_the_shim_imports_nothing_for_a_domain_without_the_element(tmp_path: Path) -> None:
    """Every domain on the host pays the hook: a plain one must cost no more than the interpreter.

    Its speed is `python -m benchmarks hook_shim`; here the property behind it: not one module
    is imported beyond the bare interpreter's (-X importtime lists them all), nothing printed.
    """
    shim = tmp_path / "cuju"
    shim.write_text(shim_text(sys.executable))
    shim.chmod(0o755)
    plain = domain_xml("plain", memory_mib=64, kernel="/boot/vmlinuz").encode()
    _, bare = _imports(["-c", "pass"])
    proc, imported = _imports([str(shim), "plain", "prepare", "begin", "-"], plain)
    assert proc.returncode == 0 and proc.stdout == b""
    assert imported - bare == set(), proc.stderr.decode()
    # the check can fail: a protected domain does import the package (for an operation the hook
    # does not act on, so nothing else happens)
    protected = set_ft(plain.decode(), FTSpec(peer="hostb")).encode()
    proc, imported = _imports([str(shim), "plain", "no-such-op", "begin", "-"], protected)
    assert proc.returncode == 0 and "cuju_libvirt.hooks.qemu" in imported


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("nbdkit") is None or not disk_server.PLUGIN.is_file(),
                    reason="needs nbdkit and the plugin (scripts/setup.sh)")
def test_prepare_starts_the_disk_servers_and_release_stops_them(sandbox: Path) -> None:
    """Without cujud: the VM's disks must still be served (it starts unprotected)."""
    image = sandbox / "vda.img"
    with image.open("wb") as f:
        f.truncate(4 << 20)
    xml = domain_xml("hooked", memory_mib=64, kernel="/boot/vmlinuz", disk=image, uuid=UUID)
    xml = set_ft(xml, FTSpec(peer="hostb"))
    prepared = fitness.prepare(xml, disks=True).xml.encode()
    spec = parse_domain(prepared)
    assert spec is not None and [d.target for d in spec.disks] == ["hda"]
    paths = disk_server.ServerPaths.of(UUID, "hda")  # the rig boots from IDE
    try:
        assert hook.run(["hooked", "prepare", "begin", "-"], prepared) == 0
        pid = disk_server.running_pid(paths)
        assert pid is not None and Path(paths.socket).exists()
        assert hook.run(["hooked", "prepare", "begin", "-"], prepared) == 0  # idempotent
        assert disk_server.running_pid(paths) == pid
        io = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 4096",
                             f"nbd+unix:///hda?socket={paths.socket}"],
                            capture_output=True, text=True, timeout=30, check=False)
        assert io.returncode == 0, io.stderr
        assert image.read_bytes()[4096:8192] == b"\x5a" * 4096
        assert hook.run(["hooked", "release", "end", "-"], prepared) == 0
        assert disk_server.running_pid(paths) is None and not Path(paths.socket).exists()
    finally:
        disk_server.stop(paths)
        shutil.rmtree(Path(paths.socket).parent, ignore_errors=True)


def test_virsh_migrate_of_a_protected_domain_is_refused_with_what_to_do(
    sandbox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hook.run(["hooked", "migrate", "begin", "-"], protected_xml()) == 1
    said = capsys.readouterr().err
    assert "refusing virsh migrate" in said and "cuju-libvirt takeover hooked" in said
    assert hook.run(["hooked", "migrate", "begin", "-"], protected_xml(standby=True)) == 0
