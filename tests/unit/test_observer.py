"""The observer's judges: the rules of the end-to-end failover test, on made-up recordings."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cuju_libvirt.rig.observer import (
    Recording,
    Rules,
    counter_stream,
    decode_datagram,
    encode_datagram,
    epoch_ms_from_rate,
    judge_run,
    one_epoch_packets,
    resume_arrival,
)

KILL = 100.0


def udp_run(numbers: list[int], start: float = 90.0, step: float = 0.005) -> tuple[tuple[int, float], ...]:
    return tuple((n, start + i * step) for i, n in enumerate(numbers))


def failover_run(before: range, after: range, silence: float = 0.4) -> tuple[tuple[int, float], ...]:
    """Numbers of ``before`` arriving up to the kill, those of ``after`` from kill + silence."""
    first = [(n, KILL - 0.005 * (len(before) - i)) for i, n in enumerate(before)]
    second = [(n, KILL + silence + 0.005 * i) for i, n in enumerate(after)]
    return tuple(first + second)


def tcp_ok(count: int = 1000, split_at: float = KILL) -> dict[str, object]:
    data = counter_stream(0, count)
    return {
        "tcp_connections": 1,
        "tcp_data": data,
        "tcp_chunks": ((len(data) // 2, split_at - 1.0), (len(data), split_at + 1.0)),
    }


def test_datagram_round_trip_and_foreign_data() -> None:
    assert decode_datagram(encode_datagram(7, 123, 45)) == (7, 123, 45)
    assert decode_datagram(b"CUJU" + bytes(28)) is None  # version 0
    assert decode_datagram(b"XXXX\x01" + bytes(27)) is None
    assert decode_datagram(encode_datagram(1)[:-1]) is None


def test_clean_run_without_failover_passes() -> None:
    verdict = judge_run(Recording(udp=udp_run(list(range(500))), **tcp_ok()), Rules())  # type: ignore[arg-type]
    assert verdict.ok, verdict.problems
    assert (verdict.udp_received, verdict.udp_first, verdict.udp_last) == (500, 0, 499)
    assert verdict.tcp_counters == 1000


def test_any_gap_without_failover_fails() -> None:
    verdict = judge_run(Recording(udp=udp_run([0, 1, 2, 4, 5])), Rules(tcp=False))
    assert not verdict.ok
    assert "3..3 never arrived" in verdict.problems[0]


@pytest.mark.parametrize(
    ("numbers", "phrase"),
    [([0, 1, 2, 2, 3], "arrived twice"), ([0, 1, 5, 3, 6], "went backwards")],
)
def test_repeats_and_steps_back_fail_even_at_failover(numbers: list[int], phrase: str) -> None:
    udp = failover_run(range(0), range(0)) + udp_run(numbers, start=KILL + 0.5)
    verdict = judge_run(Recording(udp=udp), Rules(max_gap=100, failover_at=KILL, tcp=False))
    assert any(phrase in p for p in verdict.problems), verdict.problems


def test_one_bounded_gap_at_failover_passes_and_failover_time_is_the_silence() -> None:
    udp = failover_run(range(0, 300), range(310, 400), silence=0.25)
    verdict = judge_run(Recording(udp=udp, **tcp_ok()), Rules(max_gap=20, failover_at=KILL))  # type: ignore[arg-type]
    assert verdict.ok, verdict.problems
    assert [g.missing for g in verdict.gaps] == [10]  # 300..309
    assert verdict.failover_ms == pytest.approx(250.0)
    assert verdict.udp_after_failover == 90


def test_gap_larger_than_an_epoch_fails() -> None:
    udp = failover_run(range(0, 300), range(330, 400))
    verdict = judge_run(Recording(udp=udp), Rules(max_gap=20, failover_at=KILL, tcp=False))
    assert any("30 missing" in p for p in verdict.problems), verdict.problems


def test_two_gaps_fail() -> None:
    udp = failover_run(range(0, 300), range(305, 400))
    udp = udp[:100] + udp[101:]  # number 100 lost long before the failover
    verdict = judge_run(Recording(udp=udp), Rules(max_gap=20, failover_at=KILL, tcp=False))
    assert any("2 gaps" in p for p in verdict.problems), verdict.problems
    assert any("not at the failover" in p for p in verdict.problems)


def test_guest_that_does_not_resume_fails() -> None:
    udp = failover_run(range(0, 300), range(0))
    verdict = judge_run(Recording(udp=udp), Rules(max_gap=20, failover_at=KILL, tcp=False))
    assert any("did not resume" in p for p in verdict.problems)


def test_no_datagram_at_all_fails() -> None:
    assert "no UDP datagram" in judge_run(Recording(), Rules(tcp=False)).problems[0]


def test_tcp_reconnect_close_and_corruption_fail() -> None:
    udp = udp_run(list(range(10)))
    base = tcp_ok()
    reconnected = judge_run(Recording(udp=udp, **{**base, "tcp_connections": 2}), Rules())  # type: ignore[arg-type]
    assert any("re-opened" in p for p in reconnected.problems)
    closed = judge_run(Recording(udp=udp, tcp_closed=95.0, **base), Rules())  # type: ignore[arg-type]
    assert any("ended" in p for p in closed.problems)
    data = counter_stream(0, 100) + counter_stream(99, 5)
    repeated = judge_run(Recording(udp=udp, tcp_connections=1, tcp_data=data), Rules())
    assert any("counter 99 where 100" in p and "backwards" in p for p in repeated.problems)
    data = counter_stream(0, 100) + counter_stream(101, 5)
    skipped = judge_run(Recording(udp=udp, tcp_connections=1, tcp_data=data), Rules())
    assert any("skipped ahead" in p for p in skipped.problems)
    never = judge_run(Recording(udp=udp), Rules())
    assert any("never opened" in p for p in never.problems)


def test_tcp_must_carry_data_after_failover() -> None:
    udp = failover_run(range(0, 300), range(305, 400))
    base = tcp_ok(split_at=KILL - 10)  # every chunk arrived before the kill
    verdict = judge_run(Recording(udp=udp, **base), Rules(max_gap=20, failover_at=KILL))  # type: ignore[arg-type]
    assert verdict.problems == ("the TCP stream carried nothing after the failover",)


def test_partial_counter_at_the_end_is_not_an_error() -> None:
    data = counter_stream(0, 10) + b"\x00\x00\x00"
    verdict = judge_run(Recording(udp=udp_run([0]), tcp_connections=1, tcp_data=data), Rules())
    assert verdict.ok and verdict.tcp_counters == 10


def test_resume_arrival_ignores_trickle_right_after_the_kill() -> None:
    udp = ((1, KILL - 0.01), (2, KILL + 0.001), (3, KILL + 0.002), (4, KILL + 0.5), (5, KILL + 0.51))
    assert resume_arrival(udp, KILL) == KILL + 0.5
    assert resume_arrival(udp[:1], KILL) is None


@given(
    total=st.integers(50, 400),
    cut=st.integers(1, 49),
    missing=st.integers(0, 30),
    max_gap=st.integers(0, 30),
)
def test_property_single_gap_at_failover_passes_iff_bounded(
    total: int, cut: int, missing: int, max_gap: int
) -> None:
    udp = failover_run(range(0, cut), range(cut + missing, total + missing))
    verdict = judge_run(Recording(udp=udp), Rules(max_gap=max_gap, failover_at=KILL, tcp=False))
    assert verdict.ok == (missing <= max_gap), verdict.problems


@given(numbers=st.lists(st.integers(0, 50), min_size=2, max_size=60))
def test_property_only_unbroken_sequences_pass_away_from_failover(numbers: list[int]) -> None:
    verdict = judge_run(Recording(udp=udp_run(numbers)), Rules(max_gap=100, failover_at=80.0, tcp=False))
    # Every arrival is long after the failover, so only an unbroken +1 sequence may pass.
    unbroken = all(b == a + 1 for a, b in itertools.pairwise(numbers))
    assert verdict.ok == unbroken, verdict.problems


def test_the_allowed_gap_is_one_epoch_of_datagrams_not_a_fixed_number() -> None:
    """Issue 13 item 11: the judge passed gaps of up to 30 datagrams (100 ms at 300 pps) where
    the claim allows one 20 ms epoch: 6 (7 when a datagram falls on each edge)."""
    assert one_epoch_packets(300, 20) == 7
    assert one_epoch_packets(300, 10) == 4
    assert one_epoch_packets(1000, 20) == 21
    # the epochs as they ran: never shorter than configured, longer when measured so
    assert epoch_ms_from_rate(20, None) == 20
    assert epoch_ms_from_rate(20, 80.0) == 20
    assert epoch_ms_from_rate(20, 25.0) == pytest.approx(40)
    udp = failover_run(range(0, 300), range(330, 400))  # 30 missing: the old fixed limit passed it
    verdict = judge_run(Recording(udp=udp), Rules(max_gap=one_epoch_packets(300, 20), failover_at=KILL,
                                                  tcp=False))
    assert any("30 missing" in p for p in verdict.problems), verdict.problems
    udp = failover_run(range(0, 300), range(306, 400))
    assert judge_run(Recording(udp=udp), Rules(max_gap=one_epoch_packets(300, 20), failover_at=KILL,
                                               tcp=False)).ok
    with pytest.raises(ValueError):
        one_epoch_packets(0, 20)
