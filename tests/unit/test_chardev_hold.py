"""The per-epoch hold of serial output: what the user sees is exactly what the guest wrote.

A model of one protected chardev: the guest writes bytes, the engine cuts epochs (VM
stopped), the backup acknowledges them in order (the primary may see an acknowledgement
late or never), protection may end and start again, and at any moment the primary may
die and the backup resume from any epoch it committed. The user's output is then what
the primary's :class:`HeldStream` released followed by what the standby writes from the
state it resumed from: it must be the guest's own stream, with no byte twice and none
missing.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuju_libvirt.chardev_hold import HeldStream
from cuju_libvirt.errors import StateError

# One step: write some bytes, cut an epoch, the backup acks the oldest unacked cut (the
# primary sees it or not), the primary sees every ack so far, protection ends here.
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.binary(min_size=1, max_size=40)),
        st.tuples(st.just("cut"), st.integers(1, 3)),
        st.tuples(st.just("backup-acks"), st.booleans()),
        st.tuples(st.just("primary-sees-acks"), st.none()),
        st.tuples(st.just("release-all"), st.none()),
    ),
    max_size=80,
)


class Model:
    """The guest's stream and what the backup and the primary know about its epochs."""

    def __init__(self) -> None:
        self.guest = bytearray()  # everything the guest wrote, in order
        self.released = bytearray()  # what reached the user from the primary
        self.stream = HeldStream()
        self.epoch = 0
        self.cuts: list[tuple[int, int]] = []  # (epoch, guest position at its cut) of this pairing
        self.backup_has: list[int] = []  # epochs the backup committed (acked), in order
        self.primary_acked = 0  # acks the primary has seen (index into backup_has)

    def step(self, kind: str, arg: object) -> None:
        s = self.stream
        if kind == "write":
            assert isinstance(arg, bytes)
            self.guest += arg
            self.released += s.write(arg)
        elif kind == "cut":
            assert isinstance(arg, int)
            self.epoch += arg
            self.released += s.cut(self.epoch)
            self.cuts.append((self.epoch, len(self.guest)))
        elif kind == "backup-acks":
            pending = [e for e, _ in self.cuts if e not in self.backup_has]
            if pending:
                self.backup_has.append(pending[0])
                if arg:
                    self._primary_sees(len(self.backup_has))
        elif kind == "primary-sees-acks":
            self._primary_sees(len(self.backup_has))
        elif kind == "release-all":
            self.released += s.release_all()
            self.cuts, self.backup_has, self.primary_acked = [], [], 0  # a new pairing later
        assert self.guest.startswith(self.released), "released output is not a prefix of the guest's"

    def _primary_sees(self, upto: int) -> None:
        for epoch in self.backup_has[self.primary_acked:upto]:
            self.released += self.stream.commit(epoch)
        self.primary_acked = max(self.primary_acked, upto)


@settings(max_examples=400, deadline=None)
@given(_steps, st.data())
def test_released_output_is_a_prefix_and_a_failover_continues_it_exactly(steps: list[tuple[str, object]],
                                                                         data: st.DataObject) -> None:
    m = Model()
    for kind, arg in steps:
        m.step(kind, arg)
    if not m.backup_has:
        return  # no committed epoch: nothing to fail over to
    # The primary dies; the backup resumes from the last epoch it committed (it applies
    # every epoch it acknowledged), and tells the primary's chardev server which.
    resumed = m.backup_has[-1]
    position = dict(m.cuts)[resumed]
    if data.draw(st.booleans(), label="primary's cujud hears the acks still in flight"):
        m.step("primary-sees-acks", None)
    m.released += m.stream.settle(resumed)
    # The standby runs from the state at that cut: it writes the guest's bytes from there.
    standby = m.guest[position:]
    assert bytes(m.released + standby) == bytes(m.guest), "a byte was lost or seen twice"
    assert m.stream.finished and m.stream.held_bytes == 0
    assert m.stream.write(b"late") == b""  # a settled stream lets nothing more out


def test_passing_stream_releases_at_once_and_the_first_cut_starts_holding() -> None:
    s = HeldStream()
    assert s.write(b"boot\n") == b"boot\n"
    assert s.cut(1) == b""  # nothing written since: nothing to release
    assert s.holding
    assert s.write(b"a") == b"" and s.write(b"b") == b""
    assert s.cut(2) == b"" and s.held_epochs == [2]
    assert s.write(b"c") == b""
    assert s.commit(1) == b""  # epoch 1 closed nothing held
    assert s.commit(2) == b"ab"
    assert s.cut(3) == b"" and s.commit(3) == b"c"
    assert s.released_bytes == len(b"boot\nabc")


def test_settle_drops_the_unacknowledged_tail() -> None:
    s = HeldStream()
    s.cut(1)
    s.write(b"x")
    s.cut(2)
    s.write(b"y")
    s.cut(3)
    s.write(b"z")
    assert s.settle(2) == b"x"
    assert s.dropped_bytes == 2 and s.finished
    with pytest.raises(StateError, match="settled"):
        s.cut(4)


def test_release_all_lets_everything_out_in_order_and_passes_again() -> None:
    s = HeldStream()
    s.cut(1)
    s.write(b"1")
    s.cut(2)
    s.write(b"2")
    assert s.release_all() == b"12"
    assert not s.holding and s.write(b"3") == b"3"
    s.cut(1)  # a new pairing may number its epochs anew
    assert s.holding


def test_epochs_must_increase() -> None:
    s = HeldStream()
    s.cut(5)
    with pytest.raises(StateError, match="must increase"):
        s.cut(5)
