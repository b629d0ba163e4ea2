"""``cuju-libvirt xml ...``: exit codes, stdout/stderr contracts, no tracebacks."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cuju_libvirt import domain_xml as dx
from cuju_libvirt.cli import main
from cuju_libvirt.fitness import prepare
from tests.domains import UNFIT, c14n, fixture_names, read_fixture

REPO = Path(__file__).resolve().parents[2]


class Result:
    def __init__(self, code: int, out: bytes, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def text(self) -> str:
        return self.out.decode()


Runner = Callable[..., Result]


@pytest.fixture
def run(capsysbinary: pytest.CaptureFixture[bytes]) -> Runner:
    """Run main() in-process; stdout as bytes (documents are written as bytes), stderr as text."""

    def _run(*argv: str, stdin: bytes | None = None) -> Result:
        if stdin is not None:
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
        try:
            code = main(list(argv))
        finally:
            sys.stdin = sys.__stdin__
        captured = capsysbinary.readouterr()
        return Result(code, captured.out, captured.err.decode())

    return _run


def write(tmp_path: Path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


# --- validate -------------------------------------------------------------------------------


def test_validate_without_element_says_not_protected(run: Runner, tmp_path: Path) -> None:
    result = run("xml", "validate", write(tmp_path, "vm.xml", read_fixture("virt-install-debian.xml")))
    assert result.code == 0
    assert "not protected" in result.text


def test_validate_unfit_lists_one_line_per_problem(run: Runner, tmp_path: Path) -> None:
    data = dx.set_ft(read_fixture("unfit-passthrough.xml"), dx.FTSpec.defaults("hostb"))
    result = run("xml", "validate", write(tmp_path, "vm.xml", data))
    assert result.code == 1
    lines = result.err.strip().splitlines()
    pci = [ln for ln in lines if "<hostdev type='pci'> 0000:65:00.0" in ln]
    assert len(pci) == 1 and "fix: remove the <hostdev>" in pci[0]
    assert any("<hostdev type='usb'> 0x046d:0xc52b" in line for line in lines)
    assert sum(line.startswith("cuju-libvirt: error: ") for line in lines) >= 10
    assert lines[-1].startswith("cuju-libvirt: domain 'gpu-box' cannot be protected as written")
    assert result.out == b""


def test_validate_fit_domain_with_warnings(run: Runner, tmp_path: Path) -> None:
    data = dx.set_ft(read_fixture("qemu-commandline.xml"), dx.FTSpec(peer="hostb", output_commit=False))
    prepared = prepare(data).xml
    result = run("xml", "validate", write(tmp_path, "vm.xml", prepared))
    assert result.code == 0, result.err
    assert "can be protected (peer hostb:7790) (1 warning on stderr)" in result.text
    assert "warning: <cuju:ft output-commit='off'>" in result.err


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"not xml at all", "not well-formed"),
        (b"<network><name>default</name></network>", "not a libvirt domain XML"),
        (b'<!DOCTYPE domain [<!ENTITY a "b">]><domain/>', "DOCTYPE"),
    ],
)
def test_validate_unreadable_exits_2(run: Runner, tmp_path: Path, content: bytes, needle: str) -> None:
    result = run("xml", "validate", write(tmp_path, "bad.xml", content))
    assert result.code == 2
    assert needle in result.err
    assert "Traceback" not in result.err


def test_missing_file_and_directory_exit_2(run: Runner, tmp_path: Path) -> None:
    result = run("xml", "validate", str(tmp_path / "nope.xml"))
    assert result.code == 2 and "No such file or directory" in result.err
    result = run("xml", "show", str(tmp_path))
    assert result.code == 2 and "Is a directory" in result.err


def test_too_large_file_exits_2(run: Runner, tmp_path: Path) -> None:
    path = tmp_path / "big.xml"
    with path.open("wb") as handle:
        handle.write(b"<domain>")
        handle.write(b" " * (11 * 1024 * 1024))
        handle.write(b"</domain>")
    result = run("xml", "validate", str(path))
    assert result.code == 2 and "larger than 10 MiB" in result.err


def test_invalid_element_exits_1(run: Runner, tmp_path: Path) -> None:
    data = read_fixture("virt-install-debian.xml").replace(
        b"</libosinfo:libosinfo>",
        b'</libosinfo:libosinfo><cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/2.0" peer="b"/>',
    )
    result = run("xml", "validate", write(tmp_path, "vm.xml", data))
    assert result.code == 1
    assert "ft/2.0" in result.err and "fix: use https://cuju-ft.github.io/libvirt/ft/1.0" in result.err


# --- enable / disable / show ----------------------------------------------------------------


@pytest.mark.parametrize("name", fixture_names())
def test_enable_disable_round_trip_through_the_cli(run: Runner, tmp_path: Path, name: str) -> None:
    original = read_fixture(name)
    if dx.parse_domain(original) is not None:
        original = dx.remove_ft(original)
    source = write(tmp_path, "vm.xml", original)
    enabled = run("xml", "enable", source, "--peer", "hostb", "--epoch-ms", "30", "--tracker", "scan")
    assert enabled.code == 0, enabled.err
    again = run(
        "xml", "enable", write(tmp_path, "e.xml", enabled.out), "--peer", "hostb", "--epoch-ms", "30",
        "--tracker", "scan",
    )
    assert again.out == enabled.out  # idempotent
    disabled = run("xml", "disable", write(tmp_path, "e2.xml", enabled.out))
    assert disabled.code == 0
    assert c14n(disabled.out) == c14n(original)
    shown = run("xml", "show", write(tmp_path, "e3.xml", enabled.out), "--json")
    assert json.loads(shown.out)["epoch-ms"] == 30
    assert json.loads(shown.out)["tracker"] == "scan"


def test_show_json_echoes_every_option_enable_set(run: Runner, tmp_path: Path) -> None:
    source = write(tmp_path, "vm.xml", read_fixture("tabs.xml"))
    options = {
        "peer": "[2001:db8::7]:7800", "link": "198.18.0.2:7000", "epoch-ms": "12", "tracker": "uffd",
        "output-commit": "off", "serial-commit": "off", "max-epoch-packets": "1000", "failover": "manual",
        "heartbeat-timeout-ms": "900", "on-peer-unavailable": "refuse-start", "epoch-policy": "fixed",
        "max-epoch-ms": "250",
    }
    argv = [arg for key, value in options.items() for arg in (f"--{key}", value)]
    enabled = run("xml", "enable", source, *argv)
    assert enabled.code == 0
    shown = run("xml", "show", "-", "--json", stdin=enabled.out)
    data = json.loads(shown.out)
    assert {k: str(v) for k, v in data.items()} == options


def test_enable_updates_only_the_given_settings(run: Runner, tmp_path: Path) -> None:
    source = write(tmp_path, "vm.xml", read_fixture("existing-ft.xml"))
    result = run("xml", "enable", source, "--epoch-ms", "40")
    assert result.code == 0
    assert dx.parse_domain(result.out) == dx.FTSpec(peer="[2001:db8::2]:7800", epoch_ms=40, tracker="scan")


def test_enable_without_peer_leaves_the_backup_to_the_clusters_placer(run: Runner, tmp_path: Path) -> None:
    result = run("xml", "enable", write(tmp_path, "vm.xml", read_fixture("tabs.xml")))
    assert result.code == 0, result.err
    spec = dx.parse_domain(result.out)
    assert spec is not None and spec.placed and b"peer=" not in result.out
    shown = run("xml", "show", "-", stdin=result.out)
    assert b"placed by the cluster" in shown.out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["--epoch-ms", "2"], "epoch-ms='2'"), (["--epoch-ms", "x"], "not a decimal integer"),
     (["--peer", "bad host"], "peer='bad host'"), (["--max-epoch-packets", "10000"], "100 to 9000")],
)
def test_enable_rejects_bad_values_without_output(
    run: Runner, tmp_path: Path, argv: list[str], needle: str
) -> None:
    source = write(tmp_path, "vm.xml", read_fixture("tabs.xml"))
    result = run("xml", "enable", source, "--peer", "hostb", *argv)
    assert result.code == 1
    assert needle in result.err and result.out == b""


def test_enable_without_prepare_warns_but_changes_nothing_else(run: Runner, tmp_path: Path) -> None:
    original = read_fixture("openstack-nova.xml")
    result = run("xml", "enable", write(tmp_path, "vm.xml", original), "--peer", "hostb")
    assert result.code == 0
    assert "error: <interface type='bridge'> mac fa:16:3e:5a:1b:2c" in result.err
    assert "'--prepare' makes the safe changes" in result.err
    assert c14n(dx.remove_ft(result.out)) == c14n(original)


def test_enable_prepare_output_validates(run: Runner, tmp_path: Path) -> None:
    result = run("xml", "enable", write(tmp_path, "vm.xml", read_fixture("openstack-nova.xml")),
                 "--peer", "hostb", "--prepare")
    assert result.code == 0
    assert "changed: added <memoryBacking>" in result.err
    assert "tainted (custom-argv)" in result.err
    check = run("xml", "validate", write(tmp_path, "p.xml", result.out))
    assert check.code == 0, check.err


@pytest.mark.parametrize("name", sorted(UNFIT))
def test_prepare_refuses_unfit_domains_naming_the_device(run: Runner, tmp_path: Path, name: str) -> None:
    source = write(tmp_path, "vm.xml", read_fixture(name))
    result = run("xml", "enable", source, "--peer", "hostb", "--prepare")
    assert result.code == 1
    assert result.out == b""
    assert "not written" in result.err
    needle = "<hostdev type='pci'>" if name == "unfit-passthrough.xml" else "<domain type='xen'>"
    assert needle in result.err


def test_stdin_works_for_every_command(run: Runner) -> None:
    data = read_fixture("compact.xml")
    enabled = run("xml", "enable", "-", "--peer", "hostb", stdin=data)
    assert enabled.code == 0
    assert run("xml", "show", "-", stdin=enabled.out).text.startswith("domain 'compact': protected")
    assert run("xml", "validate", "-", stdin=data).code == 0
    assert c14n(run("xml", "disable", "-", stdin=enabled.out).out) == c14n(data)


def test_show_without_element(run: Runner, tmp_path: Path) -> None:
    source = write(tmp_path, "vm.xml", read_fixture("tabs.xml"))
    assert json.loads(run("xml", "show", source, "--json").out) is None
    assert "not protected" in run("xml", "show", source).text


def test_disable_without_element_says_so(run: Runner, tmp_path: Path) -> None:
    data = read_fixture("tabs.xml")
    result = run("xml", "disable", write(tmp_path, "vm.xml", data))
    assert result.code == 0 and "unchanged" in result.err
    assert c14n(result.out) == c14n(data)


# --- as a real process ---------------------------------------------------------------------


def cli(*argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "cuju_libvirt.cli", *argv], input=stdin, capture_output=True,
        env=env, cwd=REPO, timeout=60, check=False,
    )


@pytest.mark.timeout(60)
def test_subprocess_exit_codes_and_no_traceback(tmp_path: Path) -> None:
    data = read_fixture("virt-install-debian.xml")
    ok = cli("xml", "enable", "-", "--peer", "hostb", "--prepare", stdin=data)
    assert ok.returncode == 0, ok.stderr
    assert cli("xml", "validate", "-", stdin=ok.stdout).returncode == 0
    bad = cli("xml", "validate", "-", stdin=b"<domain><oops></domain>")
    assert bad.returncode == 2 and b"Traceback" not in bad.stderr
    laughs = b'<!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]><domain>&b;</domain>'
    refused = cli("xml", "show", "-", stdin=laughs)
    assert refused.returncode == 2 and b"DOCTYPE" in refused.stderr and b"Traceback" not in refused.stderr
    usage = cli("xml", "enable")
    assert usage.returncode == 2 and b"usage:" in usage.stderr


@pytest.mark.timeout(60)
def test_debug_shows_a_traceback(tmp_path: Path) -> None:
    quiet = cli("xml", "validate", str(tmp_path / "missing.xml"))
    loud = cli("-v", "xml", "validate", str(tmp_path / "missing.xml"))
    assert quiet.returncode == loud.returncode == 2
    assert b"Traceback" not in quiet.stderr
    assert b"Traceback" in loud.stderr


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["xml", "--help"], ["xml", "validate", "--help"], ["xml", "enable", "--help"],
     ["xml", "disable", "--help"], ["xml", "show", "--help"], ["enable", "--help"], ["disable", "--help"],
     ["show", "--help"]],
)
def test_help_reads_like_a_man_page(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: cuju-libvirt" in out
    assert "exit status" in out.lower()
    if argv != ["--help"]:
        assert "examples:" in out


def test_changing_a_setting_keeps_the_disk_records(run: Runner, tmp_path: Path) -> None:
    """The records hold the originals of the prepared disks: re-enabling must not drop them."""
    original = (
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/img/a.qcow2'/><target dev='vda' bus='virtio'/></disk>"
    )
    spec = dx.FTSpec(peer="hostb", disks=(dx.FTDisk.from_disk(dx.record_element(original, None)),))
    document = dx.set_ft(read_fixture("virt-install-debian.xml"), spec)
    result = run("xml", "enable", write(tmp_path, "vm.xml", document), "--epoch-ms", "10")
    assert result.code == 0, result.err
    assert dx.parse_domain(result.out) == spec.replace(epoch_ms=10)


def test_prepare_serves_the_disks_and_disable_gives_them_back(run: Runner, tmp_path: Path) -> None:
    original = read_fixture("several-disks.xml")
    source = write(tmp_path, "db1.xml", original)
    result = run("xml", "enable", source, "--peer", "hostb", "--prepare", "--serve-disks")
    assert result.code == 0, result.err
    assert result.err.count("changed: serving <disk>") == 5
    socket = "/run/cuju-libvirt/nbd/3f2c6a1e-8b4d-4c1a-9e2f-6d7a8b9c0d1e/sdb.sock"
    assert f"NBD export 'sdb' at {socket}" in result.err
    prepared = write(tmp_path, "db1-ft.xml", result.out)
    # validate: the warning is gone for the prepared disks, still there for the shareable one
    checked = run("xml", "validate", prepared)
    assert checked.code == 0, checked.err
    assert checked.err.count("not epoch-protected") == 1 and "<disk> vdd" in checked.err
    plain = write(tmp_path, "db1-plain.xml", dx.set_ft(original, dx.FTSpec(peer="b")))
    before = run("xml", "validate", plain)
    assert before.err.count("disk writes are not epoch-protected yet") == 5
    disabled = run("xml", "disable", prepared)
    assert disabled.code == 0, disabled.err
    assert disabled.err.count("changed: restored <disk>") == 5
    assert c14n(disabled.out) == c14n(prepare(original).xml)


def test_disk_replica_overrides_and_show(run: Runner, tmp_path: Path) -> None:
    source = write(tmp_path, "db1.xml", read_fixture("several-disks.xml"))
    result = run(
        "xml", "enable", source, "--peer", "hostb", "--prepare", "--serve-disks",
        "--disk-replica", "vda=/srv/r/db1-root.qcow2",
    )
    assert result.code == 0, result.err
    spec = dx.parse_domain(result.out)
    assert spec is not None
    first_two = [(d.target, d.replica) for d in spec.disks[:2]]
    assert first_two == [("vda", "/srv/r/db1-root.qcow2"), ("vdb", None)]
    prepared = write(tmp_path, "db1-ft.xml", result.out)
    # later: change one, reset the other to the default; the other records stay
    again = run("xml", "enable", prepared, "--disk-replica", "sda=/srv/r/wal.img", "--disk-replica", "vda=")
    assert again.code == 0, again.err
    changed = dx.parse_domain(again.out)
    assert changed is not None
    assert {d.target: d.replica for d in changed.disks} == {
        "vda": None, "vdb": None, "sda": "/srv/r/wal.img", "sdb": None, "sdc": None
    }
    shown = json.loads(run("xml", "show", "-", "--json", stdin=again.out).out)
    assert shown["disks"][2] == {
        "target": "sda", "source": "/var/lib/libvirt/images/db1-wal.img", "source_type": "file",
        "format": "raw", "bus": "scsi", "replica": "/srv/r/wal.img",
    }
    table = run("xml", "show", "-", stdin=again.out).text
    assert "disk sdb: qcow2 file /var/lib/libvirt/images/db1-scratch.qcow2 on sata, served over NBD" in table
    # refused: a disk that is not prepared, a relative path, a malformed option
    refused = run("xml", "enable", prepared, "--disk-replica", "vdd=/srv/x")
    assert refused.code == 1 and "disk vdd is not prepared" in refused.err and refused.out == b""
    relative = run("xml", "enable", prepared, "--disk-replica", "vda=x.img")
    assert relative.code == 1 and "not an absolute path" in relative.err
    assert run("xml", "enable", prepared, "--disk-replica", "vda").code == 2
    unprepared = dx.set_ft(read_fixture("several-disks.xml"), dx.FTSpec("b"))
    plain = run("xml", "show", "-", "--json", stdin=unprepared)
    assert "disks" not in json.loads(plain.out)  # no prepared disk: the attributes only
