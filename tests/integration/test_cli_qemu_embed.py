"""``enable|disable|show DOMAIN`` against libvirt's real QEMU driver, embedded (no daemon).

``qemu:///embed?root=DIR`` runs the QEMU driver inside the calling process with all its state
under DIR, so nothing outside the test's temporary directory is touched and no libvirtd is
needed. Opt-in (CUJU_SLOW=1): on this machine the embedded driver's first QEMU capability
probe and each define take 40-100 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cuju_libvirt import domain_xml as dx
from cuju_libvirt import fitness as ft
from tests.domains import DOMAINS_DIR

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("virsh") is None, reason="virsh is not installed"),
]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=280, check=False)


@pytest.mark.timeout(900)
def test_enable_prepare_show_disable_with_the_qemu_driver(tmp_path: Path) -> None:
    uri = f"qemu:///embed?root={tmp_path / 'xmlcli-embed'}"
    cli = [sys.executable, "-m", "cuju_libvirt.cli"]
    assert run("virsh", "-c", uri, "define", str(DOMAINS_DIR / "openstack-nova.xml")).returncode == 0
    name = "instance-0000002a"

    refused = run(*cli, "enable", name, "--peer", "hostb", "-c", uri)
    assert refused.returncode == 1
    assert "error: <qemu:commandline>" in refused.stderr

    prepared = run(*cli, "enable", name, "--peer", "hostb", "--epoch-ms", "10", "--prepare", "-c", uri)
    assert prepared.returncode == 0, prepared.stderr
    assert "changed: added <memoryBacking>" in prepared.stderr

    # what the QEMU driver stored: fit, element readable from the domain XML
    dumped = run("virsh", "-c", uri, "dumpxml", "--inactive", name).stdout
    assert dx.parse_domain(dumped) == dx.FTSpec(peer="hostb", epoch_ms=10)
    assert ft.errors(ft.check_fitness(dumped)) == []
    shown = run(*cli, "show", name, "--json", "-c", uri)
    assert json.loads(shown.stdout)["epoch-ms"] == 10

    assert run(*cli, "disable", name, "-c", uri).returncode == 0
    assert dx.parse_domain(run("virsh", "-c", uri, "dumpxml", "--inactive", name).stdout) is None
    assert run("virsh", "-c", uri, "undefine", name).returncode == 0
