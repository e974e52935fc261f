"""The timers of one connection: a table of deadlines, the only place that knows them.

Contract: roles ``arm`` a timer with an absolute deadline (replacing any earlier
one), ``arm_once`` when a running timer must not be pushed back, ``cancel`` it,
and the connection asks ``earliest()`` for its next deadline and ``due(now)`` for
what has expired.  No timer is kept anywhere else, so the next deadline is
computed in exactly one place (aioquic ``get_timer()``).  One small enum names
them (gVisor's timers, smoltcp's ``Timer``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator


class Timer(enum.Enum):
    RETRANSMIT = 1         # RFC 6298 retransmission timeout (also SYN and FIN)
    ZERO_WINDOW_PROBE = 2  # persist timer, RFC 9293 §3.8.6.1 (and the sender SWS override)
    DELAYED_ACK = 3        # RFC 9293 §3.8.6.3
    KEEPALIVE = 4          # RFC 9293 §3.8.4
    TIME_WAIT = 5          # 2 MSL, RFC 9293 §3.10.7.4
    LOSS_PROBE = 6         # RFC 8985 §7 PTO
    FIN_WAIT_2 = 7         # orphaned FIN-WAIT-2 (Linux tcp_fin_timeout)
    REORDER = 8            # RFC 8985 §6.2 step 5 RACK reorder timer

    # Members are singletons compared by identity: hash them by identity too, in C,
    # instead of Enum.__hash__ (a Python-level hash of the name) on every arm/cancel.
    __hash__ = object.__hash__


class TimerTable:
    """Deadlines by timer; at most one deadline per timer."""

    __slots__ = ("_deadlines",)

    def __init__(self) -> None:
        self._deadlines: dict[Timer, float] = {}

    def arm(self, timer: Timer, deadline: float) -> None:
        self._deadlines[timer] = deadline

    def arm_once(self, timer: Timer, deadline: float) -> None:
        """Arm unless already running (a running timer keeps its deadline)."""
        if timer not in self._deadlines:
            self._deadlines[timer] = deadline

    def cancel(self, timer: Timer) -> None:
        self._deadlines.pop(timer, None)

    def clear(self) -> None:
        self._deadlines.clear()

    def deadline(self, timer: Timer) -> float | None:
        return self._deadlines.get(timer)

    def __contains__(self, timer: object) -> bool:
        return timer in self._deadlines

    def armed(self) -> frozenset[Timer]:
        return frozenset(self._deadlines)

    def earliest(self) -> float | None:
        d = self._deadlines
        return min(d.values()) if d else None

    def due(self, now: float) -> Iterator[Timer]:
        """Expired timers in deadline order, each removed as it is yielded.

        A timer re-armed or cancelled by an earlier one's handler is skipped:
        the table is re-checked before each is yielded.
        """
        for timer, deadline in sorted(self._deadlines.items(), key=lambda kv: kv[1]):
            if deadline > now or self._deadlines.get(timer) != deadline:
                continue
            del self._deadlines[timer]
            yield timer
