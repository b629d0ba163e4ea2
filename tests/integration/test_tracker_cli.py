"""``cuju-libvirt tracker check`` on this host (runs the real self-test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cuju_libvirt.ft_engine import trackers as T


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cuju_libvirt.cli", "tracker", "check", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_tmpfs_ram_dir_gets_uffd() -> None:
    if T.host_unfit_reason("/dev/shm") is not None:
        pytest.skip(f"this host cannot use uffd for /dev/shm: {T.host_unfit_reason('/dev/shm')}")
    r = _run("--ram-dir", "/dev/shm", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["tracker"] == "uffd" and report["self_test_ok"] is True
    assert "WP_ASYNC" in report["uffd_features"]


def test_disk_ram_dir_gets_scan_with_the_fix(tmp_path: Path) -> None:
    if T._mount_fstype(tmp_path) in ("tmpfs", "hugetlbfs"):
        pytest.skip("pytest's tmp_path is on tmpfs here")
    r = _run("--ram-dir", str(tmp_path))
    assert r.returncode == 1
    assert "would use: scan" in r.stdout and "memory_backing_dir on tmpfs or hugetlbfs" in r.stdout


def test_missing_ram_dir_is_exit_2_without_traceback(tmp_path: Path) -> None:
    r = _run("--ram-dir", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
