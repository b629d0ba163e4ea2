"""The FT state machine: the whole transition table, guarded moves, rollback, listeners, timing."""

from __future__ import annotations

import itertools
import threading

import pytest

from cuju_libvirt.errors import StateError
from cuju_libvirt.ft_engine.state import (
    INITIAL,
    TRANSITIONS,
    Change,
    FTMachine,
    FTState,
    Role,
    allowed,
    require,
)

# The table written out independently of the implementation, one row per source state:
# a change to either side must be made in both places on purpose.
EXPECTED = """
unprotected            -> pairing stopping failed
pairing                -> syncing unprotected degraded stopping failed
syncing                -> protected degraded stopping failed
protected              -> syncing degraded stopping failed
degraded               -> pairing stopping failed
standby_starting       -> standby stopping failed
standby                -> taking_over stopping failed
taking_over            -> primary_after_failover failed
primary_after_failover -> pairing stopping failed
failed                 -> stopping degraded
stopping               -> stopped
stopped                ->
"""


def expected_pairs() -> set[tuple[FTState, FTState]]:
    pairs = set()
    for line in EXPECTED.strip().splitlines():
        src, _, dsts = line.partition("->")
        for dst in dsts.split():
            pairs.add((FTState(src.strip()), FTState(dst)))
    return pairs


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def machine_in(state: FTState, clock: Clock | None = None) -> FTMachine:
    """A machine forced into ``state`` (for table tests only)."""
    role = Role.BACKUP if state.role is Role.BACKUP else Role.PRIMARY
    m = FTMachine("vm1", role, clock=clock or Clock())
    m._state = state
    m._entered[state] = (clock or Clock())()
    return m


def test_expected_table_names_every_state_as_a_source() -> None:
    sources = {line.split("->")[0].strip() for line in EXPECTED.strip().splitlines()}
    assert sources == {s.value for s in FTState}


def test_table_matches_the_specification() -> None:
    assert set(TRANSITIONS) == expected_pairs()


@pytest.mark.parametrize(("old", "new"), list(itertools.product(FTState, FTState)),
                         ids=lambda s: s.value)
def test_every_pair(old: FTState, new: FTState) -> None:
    m = machine_in(old)
    if (old, new) in expected_pairs():
        assert allowed(old, new)
        assert m.move(new) is old
        assert m.state is new
    else:
        assert not allowed(old, new)
        with pytest.raises(StateError, match=f"{old.value} -> {new.value} is not allowed"):
            m.move(new)
        assert m.state is old


def test_stopped_is_final_and_every_state_can_reach_stopped() -> None:
    graph: dict[FTState, set[FTState]] = {s: set() for s in FTState}
    for a, b in TRANSITIONS:
        graph[a].add(b)
    assert graph[FTState.STOPPED] == set()
    for start in FTState:
        seen, todo = {start}, [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert FTState.STOPPED in seen, start


def test_every_transition_has_a_reason_and_initial_states_by_role() -> None:
    assert all(reason.strip() for reason in TRANSITIONS.values())
    assert FTMachine("a", Role.PRIMARY).state is INITIAL[Role.PRIMARY] is FTState.UNPROTECTED
    assert FTMachine("b", Role.BACKUP).state is INITIAL[Role.BACKUP] is FTState.STANDBY_STARTING
    with pytest.raises(ValueError):
        FTMachine("c", Role.ANY)


def test_roles_of_states() -> None:
    backup = {FTState.STANDBY_STARTING, FTState.STANDBY, FTState.TAKING_OVER}
    shared = {FTState.FAILED, FTState.STOPPING, FTState.STOPPED}
    for s in FTState:
        expected = Role.BACKUP if s in backup else Role.ANY if s in shared else Role.PRIMARY
        assert s.role is expected, s
    # a backup only becomes primary through a completed takeover
    for a, b in TRANSITIONS:
        if a.role is Role.BACKUP and b.role is Role.PRIMARY:
            assert (a, b) == (FTState.TAKING_OVER, FTState.PRIMARY_AFTER_FAILOVER)


def test_move_with_expect_checks_the_current_state() -> None:
    m = FTMachine("vm1", Role.PRIMARY)
    with pytest.raises(StateError, match="state is unprotected, expected degraded"):
        m.move(FTState.PAIRING, expect=FTState.DEGRADED)
    assert m.state is FTState.UNPROTECTED
    m.move(FTState.PAIRING, expect=(FTState.DEGRADED, FTState.UNPROTECTED))
    assert m.state is FTState.PAIRING


def test_transition_success_keeps_the_new_state() -> None:
    m = FTMachine("vm1", Role.PRIMARY)
    with m.transition(FTState.UNPROTECTED, FTState.PAIRING) as inside:
        assert inside.state is FTState.PAIRING
    assert m.state is FTState.PAIRING


def test_transition_rolls_back_when_the_body_raises() -> None:
    m = FTMachine("vm1", Role.PRIMARY)
    changes: list[Change] = []
    m.add_listener(lambda _m, c: changes.append(c))
    m.move(FTState.PAIRING)
    m.move(FTState.SYNCING)
    m.move(FTState.DEGRADED)
    with pytest.raises(RuntimeError, match="peer unreachable"), \
            m.transition(FTState.DEGRADED, FTState.PAIRING):
        raise RuntimeError("peer unreachable")
    assert m.state is FTState.DEGRADED
    assert (changes[-1].old, changes[-1].new, changes[-1].rollback) == \
        (FTState.PAIRING, FTState.DEGRADED, True)
    assert "peer unreachable" in changes[-1].reason
    assert not any(c.rollback for c in changes[:-1])


def test_transition_from_the_wrong_state_is_refused_before_the_body() -> None:
    m = FTMachine("vm1", Role.PRIMARY)
    ran = []
    with pytest.raises(StateError), m.transition(FTState.PROTECTED, FTState.DEGRADED):
        ran.append(1)
    assert ran == []
    assert m.state is FTState.UNPROTECTED


def test_rollback_does_not_undo_a_concurrent_move() -> None:
    m = FTMachine("vm1", Role.PRIMARY)
    with pytest.raises(RuntimeError), m.transition(FTState.UNPROTECTED, FTState.PAIRING):
        t = threading.Thread(target=m.move, args=(FTState.STOPPING,))
        t.start()
        t.join()
        raise RuntimeError("pairing aborted")
    assert m.state is FTState.STOPPING


def test_listeners_see_every_change_and_a_failing_listener_is_contained() -> None:
    m = FTMachine("vm1", Role.BACKUP)
    seen: list[tuple[str, str]] = []

    def broken(_m: FTMachine, _c: Change) -> None:
        raise ValueError("listener bug")

    m.add_listener(broken)
    m.add_listener(lambda _m, c: seen.append((c.old.value, c.new.value)))
    m.move(FTState.STANDBY)
    m.move(FTState.TAKING_OVER)
    m.move(FTState.PRIMARY_AFTER_FAILOVER)
    assert seen == [("standby_starting", "standby"), ("standby", "taking_over"),
                    ("taking_over", "primary_after_failover")]
    m.remove_listener(broken)
    assert m.state.role is Role.PRIMARY


def test_indicators_one_hot() -> None:
    m = FTMachine("vm1", Role.PRIMARY)
    m.move(FTState.PAIRING)
    ind = m.indicators()
    assert set(ind) == set(FTState)
    assert [s for s, v in ind.items() if v] == [FTState.PAIRING]
    assert sum(ind.values()) == 1


def test_time_entered_and_time_in_states() -> None:
    clock = Clock()
    m = FTMachine("vm1", Role.PRIMARY, clock=clock)
    clock.now = 101.0
    m.move(FTState.PAIRING)
    clock.now = 103.5
    m.move(FTState.SYNCING)
    clock.now = 104.0
    m.move(FTState.PROTECTED)
    clock.now = 110.0
    assert m.entered_at() == 104.0
    assert m.entered_at(FTState.PAIRING) == 101.0
    assert m.entered_at(FTState.DEGRADED) is None
    assert m.time_in_state() == pytest.approx(6.0)
    assert m.total_time(FTState.UNPROTECTED) == pytest.approx(1.0)
    assert m.total_time(FTState.PAIRING) == pytest.approx(2.5)
    assert m.total_time(FTState.PROTECTED) == pytest.approx(6.0)
    m.move(FTState.DEGRADED)
    clock.now = 111.0
    m.move(FTState.PAIRING)
    clock.now = 112.0
    assert m.total_time(FTState.PAIRING) == pytest.approx(3.5)


class Domain:
    def __init__(self) -> None:
        self.machine = FTMachine("vm1", Role.PRIMARY)

    @require(FTState.PROTECTED, FTState.SYNCING)
    def set_epoch_ms(self, ms: int) -> int:
        return ms * 2


def test_require_guards_methods() -> None:
    d = Domain()
    with pytest.raises(StateError, match="set_epoch_ms needs state protected or syncing, but the state is"):
        d.set_epoch_ms(5)
    d.machine.move(FTState.PAIRING)
    d.machine.move(FTState.SYNCING)
    assert d.set_epoch_ms(5) == 10
    with pytest.raises(ValueError):
        require()
