"""The shipped Prometheus alerting rules are valid and behave as their unit tests say (promtool)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES_DIR = Path(__file__).resolve().parents[2] / "packaging" / "prometheus"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], check=False, cwd=RULES_DIR, capture_output=True, text=True, timeout=60
    )


@pytest.mark.timeout(60)
def test_rules_are_valid() -> None:
    result = _promtool("check", "rules", "cuju-alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


@pytest.mark.timeout(60)
def test_rules_unit_tests_pass() -> None:
    result = _promtool("test", "rules", "tests/cuju-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.timeout(60)
def test_rules_unit_tests_can_fail(tmp_path: Path) -> None:
    """A wrong expectation must make promtool fail, or the test above proves nothing."""
    text = (RULES_DIR / "tests" / "cuju-alerts.test.yml").read_text()
    broken = text.replace("is 3.5s behind", "is 9s behind").replace(
        "../cuju-alerts.yml", str(RULES_DIR / "cuju-alerts.yml")
    )
    assert broken != text
    test_file = tmp_path / "broken.test.yml"
    test_file.write_text(broken)
    result = _promtool("test", "rules", str(test_file))
    assert result.returncode != 0
