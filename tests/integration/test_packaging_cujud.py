"""The systemd unit starts the cujud this package installs, in the way cujud expects."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "systemd" / "cujud.service"


def test_unit_runs_cujud_as_a_notify_service() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["Type"] == "notify"  # cujud sends READY=1 (tested in the integration test)
    assert service["ExecStart"].split()[0] == "/usr/bin/cujud"
    assert "--check-config" in service["ExecStartPre"]
    assert service["RuntimeDirectory"] == "cuju-libvirt"  # the default run_dir
    # QEMU's direct QMP sockets live under it: a cujud restart must not delete them
    assert service["RuntimeDirectoryPreserve"] == "yes"
    assert "cujud = cuju_libvirt.cujud.daemon:main" in (ROOT / "setup.cfg").read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    cujud = shutil.which("cujud") or str(ROOT / ".venv" / "bin" / "cujud")
    if not Path(cujud).exists():
        pytest.skip("cujud is not installed (run scripts/setup.sh)")
    copy = tmp_path / "cujud.service"
    copy.write_text(UNIT.read_text().replace("/usr/bin/cujud", cujud))
    # --man=no: Documentation=man:cujud(8) is installed by the package (test_packaging_build), not here
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True,
                         timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
