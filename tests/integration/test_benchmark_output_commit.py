"""The output_commit benchmark runs and reports its keys (a smoke run, not a measurement)."""

from __future__ import annotations

import argparse
import os
import shutil

import pytest

from benchmarks import output_commit

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, tap devices)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 not installed"),
]


def test_output_commit_benchmark_smoke() -> None:
    result = output_commit.run(argparse.Namespace(pings=30, epoch_ms=40.0, ack_ms=10.0))
    assert result["lost"] == {"unprotected": 0, "epochs_only": 0, "held": 0}
    unprotected, held = result["rtt_ms_median_unprotected"], result["rtt_ms_median_held"]
    assert isinstance(unprotected, float) and isinstance(held, float)
    # A reply waits for the end of its epoch plus the acknowledgement: at least the ack delay.
    assert held >= 10.0 and held > unprotected
    epochs = result["epochs"]
    assert isinstance(epochs, dict) and epochs["held"] > 0
    assert isinstance(result["release_toggle_ms_median"], float) and result["release_toggle_ms_median"] > 0
    assert isinstance(result["packets_released"], int) and result["packets_released"] >= 30
