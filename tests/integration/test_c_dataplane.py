"""The plain-C data plane on its own (no Python), under AddressSanitizer and UBSan.

Builds c_ext/tests/test_replicator.c with the data-plane sources and runs its test mode:
replica equality over loopback TCP, an out-of-region index behind guard pages, and 400
mutated frames whose refusal must leave the region untouched. Also builds
c_ext/tests/test_diskjournal.c: the epoch disk journal against a model disk (random writes,
zeroes and trims; replica == model at every epoch), the seal race, hostile disk sections.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

C_EXT = Path(__file__).resolve().parents[2] / "c_ext"
SOURCES = ["tests/test_replicator.c", "checksum.c", "netio.c", "sender.c", "receiver.c", "streamcopy.c",
           "diskjournal.c", "aead.c"]
SANITIZED = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-g", "-O1", "-fno-omit-frame-pointer",
             "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-pthread"]


@pytest.mark.timeout(240)
def test_c_dataplane_under_sanitizers(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed (scripts/debian-packages.txt lists it)")
    binary = tmp_path / "test_replicator"
    build = subprocess.run(
        [gcc, "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-g", "-O1", "-fno-omit-frame-pointer",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-pthread",
         f"-I{C_EXT}", "-o", str(binary), *(str(C_EXT / s) for s in SOURCES), "-lcrypto"],
        capture_output=True, text=True, check=False,
    )
    assert build.returncode == 0, build.stderr
    scratch = Path(tempfile.mkdtemp(prefix="dataplane-ctest-", dir="/dev/shm"))
    try:
        env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "halt_on_error=1"}
        run = subprocess.run(
            [str(binary), "test", str(scratch)],
            capture_output=True, text=True, env=env, timeout=200, check=False,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "ok"
    assert "runtime error" not in run.stderr  # UBSan reports


@pytest.mark.timeout(240)
def test_disk_journal_against_a_model_disk(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed (scripts/debian-packages.txt lists it)")
    binary = tmp_path / "test_diskjournal"
    build = subprocess.run(
        [gcc, *SANITIZED, f"-I{C_EXT}", "-o", str(binary), str(C_EXT / "tests/test_diskjournal.c"),
         str(C_EXT / "diskjournal.c")],
        capture_output=True, text=True, check=False,
    )
    assert build.returncode == 0, build.stderr
    scratch = Path(tempfile.mkdtemp(prefix="diskjournal-ctest-", dir="/dev/shm"))
    try:
        env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "halt_on_error=1"}
        run = subprocess.run([str(binary), str(scratch), "300"], capture_output=True, text=True, env=env,
                             timeout=200, check=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "replica == model" in run.stdout and "none lost or duplicated" in run.stdout
    assert run.stdout.strip().endswith("ok")
    assert "runtime error" not in run.stderr
