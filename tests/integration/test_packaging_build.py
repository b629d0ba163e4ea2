"""The Debian package and the RPM build from this checkout with the one documented command,
and lintian / rpmlint accept them (scripts/build-packages.sh; docs/packaging.md)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt import __version__

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="scripts/build-packages.sh runs as root")

#: Files an administrator relies on, where the issue and docs/packaging.md put them.
DEB_FILES = {
    "./usr/bin/cujud", "./usr/bin/cuju-libvirt",
    "./etc/libvirt/hooks/qemu.d/cuju",
    "./lib/systemd/system/cujud.service",
    "./usr/lib/tmpfiles.d/cuju-libvirt.conf",
    "./etc/cuju-libvirt/cujud.yaml",
    "./etc/logrotate.d/cuju-libvirt",
    "./etc/apparmor.d/abstractions/cuju-libvirt-qemu",
    "./usr/share/cuju-libvirt/prometheus/cuju-alerts.yml",
    "./usr/share/cuju-libvirt/grafana/cuju-libvirt.json",
    "./usr/share/man/man8/cujud.8.gz", "./usr/share/man/man1/cuju-libvirt.1.gz",
    "./usr/share/bash-completion/completions/cujud",
    "./usr/share/bash-completion/completions/cuju-libvirt",
    "./usr/lib/python3/dist-packages/cuju_libvirt/libexec/nbdkit-cujudisk-plugin.so",  # name kept
}
DEB_CONFFILES = {
    "/etc/cuju-libvirt/cujud.yaml", "/etc/libvirt/hooks/qemu.d/cuju", "/etc/logrotate.d/cuju-libvirt",
    "/etc/apparmor.d/abstractions/cuju-libvirt-qemu",
}
DEBIAN_PYTHON_DEPENDS = {"python3-libvirt", "python3-lxml", "python3-yaml", "python3-prometheus-client",
                         "python3-tenacity"}
RPM_FILES = {
    "/usr/bin/cujud", "/usr/bin/cuju-libvirt", "/etc/libvirt/hooks/qemu.d/cuju",
    "/usr/lib/systemd/system/cujud.service", "/usr/lib/tmpfiles.d/cuju-libvirt.conf",
    "/etc/cuju-libvirt/cujud.yaml", "/etc/logrotate.d/cuju-libvirt",
    "/usr/share/man/man8/cujud.8.gz", "/usr/share/man/man1/cuju-libvirt.1.gz",
    "/usr/share/cuju-libvirt/prometheus/cuju-alerts.yml",
    "/usr/lib/python3.11/site-packages/cuju_libvirt/libexec/nbdkit-cujudisk-plugin.so",
}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "CUJU_DIST": str(out)}
    proc = subprocess.run([str(ROOT / "scripts" / "build-packages.sh")], env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    yield out


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout


@pytest.mark.timeout(900)
def test_deb_has_the_install_tree_and_lintian_reports_no_error(dist: Path) -> None:
    deb = dist / f"cuju-libvirt_{__version__}_amd64.deb"
    listing = {line.split()[-1] for line in _run("dpkg-deb", "-c", str(deb)).splitlines()}
    assert listing >= DEB_FILES, sorted(DEB_FILES - listing)
    assert not any("/cuju_libvirt/rig/" in p for p in listing), "the test rig is not for hosts"
    assert any(re.search(r"/dist-packages/cuju_libvirt/_cuju\.cpython-3\d+-.*\.so$", p) for p in listing)
    lintian = (dist / "lintian.txt").read_text()
    errors = [line for line in lintian.splitlines() if line.startswith("E:")]
    assert errors == [], errors


@pytest.mark.timeout(900)
def test_deb_depends_on_debians_python_modules_and_keeps_config_as_conffiles(
        dist: Path, tmp_path: Path) -> None:
    deb = dist / f"cuju-libvirt_{__version__}_amd64.deb"
    depends = _run("dpkg-deb", "-f", str(deb), "Depends")
    names = {d.strip().split()[0] for d in depends.split(",")}
    assert names >= DEBIAN_PYTHON_DEPENDS | {"nbdkit"}, depends
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path / "control")], check=True, timeout=60)
    conffiles = set((tmp_path / "control" / "conffiles").read_text().split())
    assert conffiles >= DEB_CONFFILES
    postinst = (tmp_path / "control" / "postinst").read_text()
    assert "systemd-tmpfiles" in postinst and "cujud.service" in postinst
    assert "<abstractions/cuju-libvirt-qemu>" in postinst


@pytest.mark.timeout(900)
def test_rpm_builds_and_rpmlint_reports_no_error(dist: Path) -> None:
    rpms = list(dist.glob(f"cuju-libvirt-{__version__}-1*.x86_64.rpm"))
    assert len(rpms) == 1, list(dist.iterdir())
    files = set(_run("rpm", "-qlp", str(rpms[0])).split())
    assert files >= RPM_FILES, sorted(RPM_FILES - files)
    requires = _run("rpm", "-qp", "--requires", str(rpms[0]))
    for name in ("python3.11-libvirt", "python3.11-lxml", "python3.11-pyyaml", "nbdkit"):
        assert name in requires
    summary = (dist / "rpmlint.txt").read_text()
    assert re.search(r"\b0 errors\b", summary), summary


def test_versions_agree() -> None:
    changelog = (ROOT / "packaging" / "debian" / "changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"cuju-libvirt ({__version__})")
    spec = (ROOT / "packaging" / "rpm" / "cuju-libvirt.spec").read_text()
    assert re.search(rf"^Version:\s+{re.escape(__version__)}$", spec, re.M)
