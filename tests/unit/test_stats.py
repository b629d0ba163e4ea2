"""DomainStats and its histograms against brute-force ground truth."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cuju_libvirt.ft_engine.stats import PAUSE_BUCKETS, DomainStats, Histogram


@given(st.lists(st.floats(min_value=0, max_value=1.0, allow_nan=False), max_size=200))
def test_histogram_matches_brute_force(values: list[float]) -> None:
    hist = Histogram(PAUSE_BUCKETS)
    for v in values:
        hist.observe(v)
    snap = hist.snapshot()
    assert snap.count == len(values)
    assert snap.total == pytest.approx(sum(values))
    for bound, cumulative in zip(snap.bounds, snap.cumulative, strict=True):
        assert cumulative == sum(1 for v in values if v <= bound)


def test_histogram_rejects_unsorted_bounds() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram([1.0, 0.5])


def test_histogram_is_thread_safe() -> None:
    hist = Histogram([1.0])

    def work() -> None:
        for _ in range(10_000):
            hist.observe(0.5)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = hist.snapshot()
    assert snap.count == 40_000 and snap.cumulative == (40_000,)


def test_lag_is_age_of_newest_acked_epoch() -> None:
    now = [100.0]
    stats = DomainStats("vm", "u", "primary", clock=lambda: now[0])
    assert stats.snapshot().replication_lag_s is None
    stats.record_epoch(pause_s=0.004, dirty_pages=300, device_state_bytes=320_000)
    now[0] = 100.010
    stats.record_ack(epoch=1, epoch_end=100.0, pages=300, wire_bytes=1_300_000, saved_bytes=8_000)
    now[0] = 100.5
    snap = stats.snapshot()
    assert snap.replication_lag_s == pytest.approx(0.5)
    assert snap.last_acked_epoch == 1 and snap.epochs_committed == 1
    assert snap.pages_total == 300 and snap.wire_bytes_total == 1_300_000
    assert snap.encoder_saved_bytes_total == 8_000 and snap.device_state_bytes == 320_000
    assert snap.ack_latency_seconds.count == 1 and snap.ack_latency_seconds.total == pytest.approx(0.010)
    assert snap.dirty_pages.count == 1 and snap.pause_seconds.count == 1
    stats.reset_link()
    assert stats.snapshot().replication_lag_s is None


def test_failover_and_progress_are_recorded() -> None:
    stats = DomainStats("vm", "u", "backup")
    stats.set_initial_sync(1.7)
    assert stats.snapshot().initial_sync_ratio == 1.0
    stats.record_failover(0.25)
    stats.set_state("primary-after-failover")
    snap = stats.snapshot()
    assert snap.failovers_total == 1 and snap.last_failover_duration_s == 0.25
    assert snap.last_failover_timestamp is not None and snap.state == "primary-after-failover"


def test_disk_sync_progress_is_kept_per_disk_in_report_order() -> None:
    stats = DomainStats("vm", "u", "primary")
    assert stats.snapshot().disk_sync == ()
    stats.set_disk_sync("vda", 0, 4096)
    stats.set_disk_sync("sdb", 10, 10)
    stats.set_disk_sync("vda", 1024, 4096)
    snap = stats.snapshot()
    assert [(d.target, d.synced_bytes, d.total_bytes) for d in snap.disk_sync] == [
        ("vda", 1024, 4096), ("sdb", 10, 10)
    ]
    assert snap.disk_sync[0].ratio == 0.25 and not snap.disk_sync[0].done and snap.disk_sync[1].done
    with pytest.raises(ValueError, match="disk vda"):
        stats.set_disk_sync("vda", 5000, 4096)


def test_the_generation_travels_into_the_snapshot() -> None:
    from cuju_libvirt.ft_engine.stats import DomainStats  # noqa: PLC0415

    stats = DomainStats("vm", "u", "primary", generation=3)
    assert stats.snapshot().generation == 3
    stats.generation = 5
    assert stats.snapshot().generation == 5
