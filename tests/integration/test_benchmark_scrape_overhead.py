"""The scrape_overhead benchmark runs and reports its keys (a smoke run, not a measurement)."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import scrape_overhead

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("source", ["replication_load", "engine"])
def test_scrape_overhead_benchmark_smoke(source: str) -> None:
    result = scrape_overhead.run(argparse.Namespace(
        pause_source=source, domains=1, blocks=2, block_seconds=1.0, scrape_hz=10.0, epoch_ms=20,
        region_mib=4, tracker="uffd", memory_mib=64))
    assert result["pause_source"] == source and result["domains"] == 1
    assert result["epochs_with_scrapes"] > 5 and result["epochs_without_scrapes"] > 5
    assert 0 < result["pause_median_ms_without_scrapes"] <= result["pause_p99_ms_without_scrapes"]
    assert 0 < result["pause_median_ms_with_scrapes"] <= result["pause_p99_ms_with_scrapes"]
    assert result["ratio_with_scrapes"] == pytest.approx(
        result["pause_median_ms_with_scrapes"] / result["pause_median_ms_without_scrapes"], rel=1e-3)
    assert result["scrapes"] >= 5 and result["scrape_bytes"] > 1000
    assert ("SIGSTOP" if source == "replication_load" else "PrimaryEngine") in result["measured"]
