"""The fault-tolerance lifecycle of one protected domain, as an explicit state machine.

One :class:`FTMachine` per domain and host. A primary starts ``UNPROTECTED``, a backup
``STANDBY_STARTING``; every move is checked against :data:`TRANSITIONS`::

  primary                                       backup
  UNPROTECTED --> PAIRING --> SYNCING --> PROTECTED     STANDBY_STARTING --> STANDBY
       ^            |  ^        |  ^        |   |                               |
       |            |  |        v  |        |   |                               v
       +------------+  +----- DEGRADED <----+   |                          TAKING_OVER
                    (backup lost; re-pairs with backoff)                        |
                                                                                v
                               PAIRING <---------------------------- PRIMARY_AFTER_FAILOVER

  any active state --> STOPPING --> STOPPED        most active states --> FAILED --> STOPPING

* ``PAIRING``: the peer is creating the paused standby; ``SYNCING``: initial full copy;
  ``PROTECTED``: epochs running, outputs held until acknowledged; ``DEGRADED``: the
  backup was lost, the VM runs unprotected and re-protection is retried.
* ``STANDBY_STARTING``: the standby is being created and receives the initial copy;
  ``STANDBY``: it holds a committed epoch and can take over; ``TAKING_OVER``: the
  primary was declared dead and the standby is being resumed.
* ``PRIMARY_AFTER_FAILOVER``: the former standby runs the VM, unprotected until a new
  backup pairs with it. ``FAILED``: protection broke in a way that needs an operator
  (e.g. a takeover that did not complete). ``STOPPED``: final.

Guarded moves: ``with machine.transition(A, B): body`` enters ``B`` (only from ``A``)
and, if the body raises, returns to ``A`` and re-raises. Methods of an object owning a
machine can be guarded with :func:`require`. Listeners (for metrics and logs) are
called on every change, rollbacks included, outside the machine's lock.
"""

from __future__ import annotations

import enum
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from cuju_libvirt.errors import StateError

LOG = logging.getLogger(__name__)


class Role(enum.Enum):
    PRIMARY = "primary"
    BACKUP = "backup"
    #: STOPPING, STOPPED and FAILED belong to whichever role the domain had.
    ANY = "any"


class FTState(enum.Enum):
    UNPROTECTED = "unprotected"
    PAIRING = "pairing"
    SYNCING = "syncing"
    PROTECTED = "protected"
    DEGRADED = "degraded"
    STANDBY_STARTING = "standby_starting"
    STANDBY = "standby"
    TAKING_OVER = "taking_over"
    PRIMARY_AFTER_FAILOVER = "primary_after_failover"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"

    @property
    def role(self) -> Role:
        return _ROLE[self]

    @property
    def protected(self) -> bool:
        """True where a backup holds a committed epoch the VM could fail over to."""
        return self is FTState.PROTECTED


_ROLE = {
    FTState.UNPROTECTED: Role.PRIMARY,
    FTState.PAIRING: Role.PRIMARY,
    FTState.SYNCING: Role.PRIMARY,
    FTState.PROTECTED: Role.PRIMARY,
    FTState.DEGRADED: Role.PRIMARY,
    FTState.PRIMARY_AFTER_FAILOVER: Role.PRIMARY,
    FTState.STANDBY_STARTING: Role.BACKUP,
    FTState.STANDBY: Role.BACKUP,
    FTState.TAKING_OVER: Role.BACKUP,
    FTState.FAILED: Role.ANY,
    FTState.STOPPING: Role.ANY,
    FTState.STOPPED: Role.ANY,
}

S = FTState

#: Every allowed move, with the reason it exists. Anything not listed is refused.
TRANSITIONS: dict[tuple[FTState, FTState], str] = {
    (S.UNPROTECTED, S.PAIRING): "protection requested (hook 'started' or CLI)",
    (S.UNPROTECTED, S.STOPPING): "domain stopped before it was protected",
    (S.UNPROTECTED, S.FAILED): "an earlier cujud left the VM protected: fenced until the peer answers",
    (S.PAIRING, S.SYNCING): "the peer created the standby; initial copy starts",
    (S.PAIRING, S.UNPROTECTED): "pairing refused or failed on a first attempt",
    (S.PAIRING, S.DEGRADED): "pairing failed on a re-protection attempt; retry later",
    (S.PAIRING, S.STOPPING): "domain stopped while pairing",
    (S.PAIRING, S.FAILED): "pairing left the domain in an unknown state",
    (S.SYNCING, S.PROTECTED): "initial copy committed on the backup",
    (S.SYNCING, S.DEGRADED): "backup lost during the initial copy",
    (S.SYNCING, S.STOPPING): "domain stopped during the initial copy",
    (S.SYNCING, S.FAILED): "initial copy broke the domain",
    (S.PROTECTED, S.SYNCING): "full resync (tracker error, lost event)",
    (S.PROTECTED, S.DEGRADED): "backup lost; the VM runs on unprotected",
    (S.PROTECTED, S.STOPPING): "domain stopped, or protection switched off",
    (S.PROTECTED, S.FAILED): "the epoch engine failed",
    (S.DEGRADED, S.PAIRING): "re-protection attempt",
    (S.DEGRADED, S.STOPPING): "domain stopped while unprotected",
    (S.DEGRADED, S.FAILED): "the domain could not be kept running",
    (S.STANDBY_STARTING, S.STANDBY): "first epoch committed: the standby can take over",
    (S.STANDBY_STARTING, S.STOPPING): "pairing abandoned by the primary",
    (S.STANDBY_STARTING, S.FAILED): "the standby could not be created",
    (S.STANDBY, S.TAKING_OVER): "the primary was declared dead",
    (S.STANDBY, S.STOPPING): "the primary ended protection",
    (S.STANDBY, S.FAILED): "the standby died",
    (S.TAKING_OVER, S.PRIMARY_AFTER_FAILOVER): "the standby runs the VM",
    (S.TAKING_OVER, S.FAILED): "the takeover did not complete",
    (S.PRIMARY_AFTER_FAILOVER, S.PAIRING): "a new backup pairs with the survivor",
    (S.PRIMARY_AFTER_FAILOVER, S.STOPPING): "domain stopped after the failover",
    (S.PRIMARY_AFTER_FAILOVER, S.FAILED): "the domain could not be kept running",
    (S.FAILED, S.STOPPING): "operator or cleanup tears the domain's protection down",
    (S.FAILED, S.DEGRADED): "a fenced primary learned that the peer did not take over; runs unprotected",
    (S.STOPPING, S.STOPPED): "teardown finished",
}

INITIAL = {Role.PRIMARY: S.UNPROTECTED, Role.BACKUP: S.STANDBY_STARTING}


def allowed(old: FTState, new: FTState) -> bool:
    return (old, new) in TRANSITIONS


@dataclass(frozen=True)
class Change:
    """One state change as listeners see it."""

    old: FTState
    new: FTState
    #: True when a guarded transition's body failed and the machine went back.
    rollback: bool
    #: ``time.monotonic()`` at the change.
    at: float
    reason: str


Listener = Callable[["FTMachine", Change], None]


class FTMachine:
    """The FT state of one domain on this host. Thread-safe."""

    def __init__(self, name: str, role: Role, clock: Callable[[], float] = time.monotonic) -> None:
        if role is Role.ANY:
            raise ValueError("a machine starts as primary or backup")
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._state = INITIAL[role]
        now = clock()
        self._entered: dict[FTState, float] = {self._state: now}
        self._time_in: dict[FTState, float] = dict.fromkeys(FTState, 0.0)
        self._listeners: list[Listener] = []
        self.log = LOG.getChild(name.replace(".", "_"))

    # --- reading ---

    @property
    def state(self) -> FTState:
        return self._state

    def entered_at(self, state: FTState | None = None) -> float | None:
        """When ``state`` (default: the current one) was last entered (monotonic clock)."""
        with self._lock:
            return self._entered.get(self._state if state is None else state)

    def time_in_state(self) -> float:
        """Seconds since the current state was entered."""
        with self._lock:
            return self._clock() - self._entered[self._state]

    def total_time(self, state: FTState) -> float:
        """Seconds spent in ``state`` so far, over all visits, the current one included."""
        with self._lock:
            total = self._time_in[state]
            if state is self._state:
                total += self._clock() - self._entered[state]
            return total

    def indicators(self) -> dict[FTState, int]:
        """One 0/1 value per state (the exporter's ``cuju_ft_state{state=...}`` series)."""
        current = self._state
        return {s: int(s is current) for s in FTState}

    # --- listening ---

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.remove(listener)

    # --- moving ---

    def move(self, new: FTState, *, expect: FTState | tuple[FTState, ...] | None = None) -> FTState:
        """Move to ``new`` now; returns the state left. Raises StateError if not allowed.

        ``expect`` additionally requires the current state to be one of those given
        (a check and the move under one lock, so no other thread slips in between).
        """
        with self._lock:
            old = self._state
            if expect is not None:
                wanted = expect if isinstance(expect, tuple) else (expect,)
                if old not in wanted:
                    raise StateError(
                        f"{self.name}: cannot go to {new.value}: state is {old.value}, "
                        f"expected {' or '.join(s.value for s in wanted)}"
                    )
            if not allowed(old, new):
                raise StateError(f"{self.name}: transition {old.value} -> {new.value} is not allowed")
            change = self._set(new, rollback=False, reason=TRANSITIONS[(old, new)])
        self._notify(change)
        return old

    @contextmanager
    def transition(self, old: FTState, new: FTState) -> Iterator[FTMachine]:
        """Enter ``new`` from ``old`` for the duration of the body; back to ``old`` if it raises.

        If another thread moved the machine elsewhere while the body ran (e.g. to
        ``STOPPING``), a failing body does not undo that move.
        """
        self.move(new, expect=old)
        try:
            yield self
        except BaseException as err:
            change = None
            with self._lock:
                if self._state is new:
                    change = self._set(old, rollback=True, reason=f"{type(err).__name__}: {err}")
            if change is not None:
                self.log.info("%s failed, back to %s: %s", new.value, old.value, err)
                self._notify(change)
            else:
                self.log.info(
                    "%s failed while the state moved on to %s: %s", new.value, self._state.value, err
                )
            raise

    def _set(self, new: FTState, *, rollback: bool, reason: str) -> Change:
        # caller holds self._lock
        now = self._clock()
        old = self._state
        self._time_in[old] += now - self._entered[old]
        self._state = new
        self._entered[new] = now
        return Change(old, new, rollback, now, reason)

    def _notify(self, change: Change) -> None:
        self.log.debug(
            "%s -> %s%s (%s)", change.old.value, change.new.value, " [rollback]" if change.rollback else "",
            change.reason,
        )
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(self, change)
            except Exception:  # a broken listener must not break the lifecycle
                self.log.exception("state listener %r failed", listener)


# --- method guards -------------------------------------------------------------------------------


class HasMachine(Protocol):
    @property
    def machine(self) -> FTMachine: ...


P = ParamSpec("P")
R = TypeVar("R")
Owner = TypeVar("Owner", bound=HasMachine)


def require(
    *states: FTState,
) -> Callable[[Callable[Concatenate[Owner, P], R]], Callable[Concatenate[Owner, P], R]]:
    """Decorate a method of an object with a ``machine``: refuse it unless in one of ``states``.

    The check is a precondition only; use :meth:`FTMachine.transition` for a move that
    must happen atomically with the check.
    """
    if not states:
        raise ValueError("require() needs at least one state")

    def decorate(func: Callable[Concatenate[Owner, P], R]) -> Callable[Concatenate[Owner, P], R]:
        @functools.wraps(func)
        def guarded(obj: Owner, /, *args: P.args, **kwargs: P.kwargs) -> R:
            current = obj.machine.state
            if current not in states:
                raise StateError(
                    f"{obj.machine.name}: {func.__name__} needs state "
                    f"{' or '.join(s.value for s in states)}, but the state is {current.value}"
                )
            return func(obj, *args, **kwargs)

        return guarded

    return decorate
