"""The engine benchmarks run and report their keys (smoke runs, not measurements)."""

from __future__ import annotations

import argparse
import os
import random
import shutil
from types import ModuleType

import pytest

from benchmarks import epoch_pause, failover, initial_sync, latency, overhead
from benchmarks._engine_pause import tls_vs_plain

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, network namespaces, tap devices)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 not installed"),
]


def args_for(module: ModuleType, **values: object) -> argparse.Namespace:
    """The benchmark's own defaults (its add_arguments), with ``values`` for a short run."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args([])
    unknown = set(values) - set(vars(args))
    assert not unknown, f"{module.__name__} has no options {sorted(unknown)}"
    vars(args).update(values)
    return args


def test_failover_benchmark_smoke() -> None:
    result = failover.run(args_for(failover, runs=1, epoch_ms=20))
    assert result["runs"] == 1 and result["passed"] == 1, result["failures"]
    assert isinstance(result["failover_ms_median"], float) and result["failover_ms_median"] > 0
    assert result["detection_ms_excluded"] is True


def test_latency_benchmark_smoke() -> None:
    result = latency.run(args_for(latency, pings=30, epoch_ms=20))
    plain, ft = result["rtt_ms_median_unprotected"], result["rtt_ms_median_ft"]
    assert isinstance(plain, float) and isinstance(ft, float)
    # A reply in FT mode waits at least for its epoch's pause and acknowledgement.
    assert ft > plain
    assert result["lost_ft"] == 0


def test_initial_sync_benchmark_smoke() -> None:
    result = initial_sync.run(args_for(initial_sync, memory_mib=128, tracker="uffd"))
    assert isinstance(result["seconds"], float) and result["seconds"] > 0
    assert isinstance(result["qemu_migration_seconds"], float) and result["qemu_migration_seconds"] > 0
    # Every page of the filled RAM travels, none as a zero page beyond the few the guest itself cleared.
    assert isinstance(result["pages_sent"], int) and result["pages_sent"] >= 128 * 256


def test_overhead_benchmark_smoke() -> None:
    result = overhead.run(args_for(overhead, seconds=2.0, epoch_ms=20, stress_mb=16))
    for name in ("cpu", "mem"):
        ratio = result[f"ratio_{name}"]
        assert isinstance(ratio, float) and ratio > 0, result
        workload = result["workloads"][name]  # type: ignore[index]
        assert isinstance(workload["epochs"], int) and workload["epochs"] > 10, workload


def test_epoch_pause_engine_smoke() -> None:
    args = args_for(epoch_pause, engine=True, tracker="uffd", epochs=30, memory_mib=64, run_ms=20.0)
    result = epoch_pause.run(args)
    assert result["engine"] is True and result["tracker"] == "uffd"
    assert isinstance(result["epochs"], int) and result["epochs"] >= 30
    assert isinstance(result["median_ms"], float) and result["median_ms"] > 0
    phases = result["phases"]
    assert isinstance(phases, dict) and {"stop", "harvest", "devstate", "cont"} <= set(phases)


def test_tls_comparison_interval_covers_a_real_difference_and_excludes_none() -> None:
    """epoch_pause --tls judges the interval, not a lucky median: a 1 ms shift is seen, and two
    draws from one distribution give an interval around 0."""
    rng = random.Random(4)
    plain = [[0.004 + rng.random() * 0.002 for _ in range(300)] for _ in range(3)]
    same = [[0.004 + rng.random() * 0.002 for _ in range(300)] for _ in range(3)]
    slower = [[x + 0.001 for x in r] for r in same]
    lo, hi = tls_vs_plain(plain, same)["tls_added_ci95_ms"]
    assert lo < 0 < hi and hi - lo < 0.5
    shifted = tls_vs_plain(plain, slower)
    assert 0.7 < shifted["tls_added_ci95_ms"][0] <= shifted["tls_added_ms"] <= shifted["tls_added_ci95_ms"][1]
    assert len(shifted["tls_added_ms_per_round"]) == 3
