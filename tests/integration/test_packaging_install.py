"""The built .deb installs into a clean Debian 12 root with Debian's packages only, its commands
run there (``--version``, ``cujud --help``, the doctor, the hook), and remove/purge leave nothing.

The root is made once by debootstrap (minbase, from the machine's Debian mirror) and cached as a
tarball in $CUJU_CACHE_DIR (default /var/cache/cuju-libvirt), like the test guests; each run
unpacks a fresh copy. Opt-in (slow, CUJU_SLOW=1): ~7.5 min the first time (debootstrap),
~4 min with the cached root; tests/integration/test_packaging_build.py covers the build and
lintian in the default suite. Every chroot command runs in a mount namespace of its own, so /proc and
/dev mounted into the root vanish with it, also when the test fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt import __version__

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("CUJU_CACHE_DIR", "/var/cache/cuju-libvirt"))
TARBALL = CACHE / "debian12-minbase-root.tar"
APT_ARCHIVES = CACHE / "debian12-apt-archives"
MIRROR = "http://deb.debian.org/debian"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap and chroot need root"),
    pytest.mark.skipif(shutil.which("debootstrap") is None, reason="debootstrap not installed (setup.sh)"),
]


def _in_root(root: Path, script: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (sh) chrooted into ``root``, with /proc, /dev and the apt cache mounted in a
    private mount namespace that ends with the command."""
    outer = (
        f'mount -t proc proc "{root}/proc" && mount --rbind /dev "{root}/dev" && '
        f'mount --bind "{APT_ARCHIVES}" "{root}/var/cache/apt/archives" && '
        f'exec chroot "{root}" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin '
        f'DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 /bin/sh -ec "$0"'
    )
    argv = ["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c", outer, script]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _make_tarball() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    work = CACHE / f".debian12-root.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(work), MIRROR],
                       capture_output=True, text=True, timeout=1200, check=True)
        shutil.copy("/etc/resolv.conf", work / "etc" / "resolv.conf")
        (work / "usr" / "sbin" / "policy-rc.d").write_text("#!/bin/sh\nexit 101\n")  # start no service
        (work / "usr" / "sbin" / "policy-rc.d").chmod(0o755)
        APT_ARCHIVES.mkdir(parents=True, exist_ok=True)
        updated = _in_root(work, "apt-get update -qq")
        assert updated.returncode == 0, updated.stderr
        tmp = TARBALL.with_suffix(".tmp")
        subprocess.run(["tar", "--numeric-owner", "-C", str(work), "-cf", str(tmp), "."], check=True,
                       timeout=600)
        tmp.rename(TARBALL)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def clean_root(tmp_path: Path) -> Iterator[Path]:
    if not TARBALL.exists():
        _make_tarball()
    APT_ARCHIVES.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "root"
    root.mkdir()
    try:
        with tarfile.open(TARBALL) as tar:
            tar.extractall(root, numeric_owner=True, filter="fully_trusted")
        shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([str(ROOT / "scripts" / "build-packages.sh"), "--deb"],
                          env={**os.environ, "CUJU_DIST": str(out)}, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out / f"cuju-libvirt_{__version__}_amd64.deb"


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    out, err = result.stdout[-3000:], result.stderr[-3000:]
    assert result.returncode == 0, f"exit {result.returncode}\n{out}\n{err}"
    return result.stdout


@pytest.mark.timeout(2400)
def test_deb_installs_runs_and_purges_cleanly_in_a_clean_debian12_root(clean_root: Path, deb: Path) -> None:
    shutil.copy(deb, clean_root / "tmp" / "cuju-libvirt.deb")
    _ok(_in_root(clean_root, "apt-get install -y -q --no-install-recommends /tmp/cuju-libvirt.deb"))

    assert _ok(_in_root(clean_root, "cuju-libvirt --version")).strip() == f"cuju-libvirt {__version__}"
    assert "usage: cujud" in _ok(_in_root(clean_root, "cujud --help"))
    # A domain without <cuju:ft> leaves the hook at once, with Debian's python3.
    _ok(_in_root(clean_root, "echo '<domain/>' | /etc/libvirt/hooks/qemu.d/cuju vm prepare begin -"))
    _ok(_in_root(clean_root, "test -f /usr/share/man/man8/cujud.8.gz"))
    _ok(_in_root(clean_root, "test -f /usr/lib/tmpfiles.d/cuju-libvirt.conf"))

    # The doctor runs and fails here (no libvirtd, no key), naming the fixes.
    doctor = _in_root(clean_root, "cuju-libvirt doctor --json || echo exit=$?")
    report = json.loads(doctor.stdout.rsplit("exit=", 1)[0])
    assert doctor.stdout.rstrip().endswith("exit=1") and report["ok"] is False
    rows = {row["check"]: row for row in report["checks"]}
    assert rows["libvirt"]["status"] == "fail" and "libvirtd" in rows["libvirt"]["fix"]
    assert rows["psk"]["status"] == "fail" and "urandom" in rows["psk"]["fix"]
    assert rows["kernel.page-size"]["status"] == "ok"

    # remove keeps the configuration (conffiles), purge removes everything of the package.
    _ok(_in_root(clean_root, "apt-get remove -y -q cuju-libvirt"))
    _ok(_in_root(clean_root, "test ! -e /usr/bin/cujud && test -f /etc/cuju-libvirt/cujud.yaml"))
    _ok(_in_root(clean_root, "apt-get purge -y -q cuju-libvirt"))
    status = _in_root(clean_root, "dpkg-query -W -f='${db:Status-Status}' cuju-libvirt || true")
    assert status.stdout.strip() in ("", "not-installed"), status.stdout
    left = _ok(_in_root(clean_root, "find / -xdev -name '*cuju*' ! -path /tmp/cuju-libvirt.deb -print"))
    assert left.split() == [], left
