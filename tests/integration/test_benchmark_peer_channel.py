"""The peer_channel benchmark runs and reports its keys (a smoke run, not a measurement)."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import peer_channel

pytestmark = pytest.mark.timeout(60)


def test_peer_channel_benchmark_smoke() -> None:
    result = peer_channel.run(argparse.Namespace(requests=50, handshakes=5))
    assert result["requests"] == 50 and result["handshakes"] == 5
    for key in ("handshake", "request", "raw_tcp_pingpong"):
        stats = result[key]
        assert isinstance(stats, dict) and 0 < stats["median_ms"] <= stats["p99_ms"]
    assert isinstance(result["ratio_vs_raw"], float) and result["ratio_vs_raw"] > 0
