"""Congestion window arithmetic: NewReno (RFC 5681, RFC 6582) and CUBIC (RFC 9438).

Contract: loss recovery (``recovery.py`` and its algorithms) owns loss
*detection* -- duplicate-ACK counting, the recover point, partial ACKs,
retransmission, and the temporary cwnd inflation and deflation of NewReno fast
recovery (RFC 6582 §3.2 steps 2-5) and PRR (RFC 6937), which it may apply to
``cwnd`` directly.  This module only moves ``cwnd``/``ssthresh``:

* ``on_ack(acked, now, srtt)`` -- ``acked`` bytes of new data were cumulatively
  acknowledged outside fast recovery;
* ``on_loss(flight_size, now)`` -- fast retransmit entry (three duplicate ACKs);
  sets ``cwnd = ssthresh`` (the caller adds 3*SMSS inflation if it wants it);
* ``on_rto(flight_size, now)`` -- the retransmission timer expired;
* ``on_recovery_exit(now)`` -- a full acknowledgment ended fast recovery.

Both windows are ints in bytes; ``mss`` is the sender's SMSS.  Time is passed
in (seconds); nothing here reads a clock.
"""

from __future__ import annotations

import math
from typing import Protocol

# RFC 5681 §3.1: "the initial value of ssthresh SHOULD be set arbitrarily high".
INITIAL_SSTHRESH = (1 << 31) - 1


class CongestionControl(Protocol):
    cwnd: int
    ssthresh: int

    def on_ack(self, acked: int, now: float, srtt: float | None) -> None: ...
    def on_loss(self, flight_size: int, now: float) -> None: ...
    def on_rto(self, flight_size: int, now: float) -> None: ...
    def on_recovery_exit(self, now: float) -> None: ...


def initial_window(mss: int) -> int:
    """IW = min(10*MSS, max(2*MSS, 14600)) bytes (RFC 6928 §2)."""
    # RFC 6928 §2 raises RFC 5681 §3.1's IW (2-4 segments) to about ten
    # segments, as Linux does; pass initial_window= for the RFC 5681 value.
    return min(10 * mss, max(2 * mss, 14600))


class _Window:
    """Slow start and the shared bookkeeping of both algorithms."""

    __slots__ = ("mss", "cwnd", "ssthresh", "_rto_pending")

    def __init__(self, mss: int, initial_window_: int | None) -> None:
        if mss <= 0:
            raise ValueError("mss must be positive")
        self.mss = mss
        self.cwnd = initial_window(mss) if initial_window_ is None else max(mss, initial_window_)
        self.ssthresh = INITIAL_SSTHRESH
        # True between an RTO and the next new ACK: a repeated timeout of the
        # same segment must not lower ssthresh again (RFC 5681 §3.1: eq. 4
        # applies when "the given segment has not yet been resent by way of
        # the retransmission timer").
        self._rto_pending = False

    @property
    def in_slow_start(self) -> bool:
        # RFC 5681 §3.1: slow start while cwnd < ssthresh.
        return self.cwnd < self.ssthresh

    def _slow_start(self, acked: int) -> int:
        """Grow cwnd for ``acked`` bytes; return bytes left for congestion avoidance."""
        # RFC 5681 §3.1 eq. 2 with RFC 3465 §2.2 Appropriate Byte Counting,
        # limit L = 2*SMSS per ACK.
        inc = min(acked, 2 * self.mss)
        room = self.ssthresh - self.cwnd
        if inc <= room:
            self.cwnd += inc
            return 0
        # Crossing ssthresh: the rest of this ACK counts toward congestion
        # avoidance (as Linux's tcp_slow_start does).
        self.cwnd = self.ssthresh
        return inc - room

    def on_recovery_exit(self, now: float) -> None:
        """Full acknowledgment: deflate to ssthresh (RFC 6582 §3.2 step 3, option 2)."""
        self.cwnd = self.ssthresh


class NewReno(_Window):
    """RFC 5681 slow start / congestion avoidance with RFC 6582 recovery windows."""

    __slots__ = ("bytes_acked",)

    def __init__(self, mss: int, initial_window: int | None = None) -> None:
        super().__init__(mss, initial_window)
        self.bytes_acked = 0  # RFC 5681 §3.1 byte counting in congestion avoidance

    def on_ack(self, acked: int, now: float, srtt: float | None) -> None:
        """New data acknowledged outside recovery."""
        if acked <= 0:
            return
        self._rto_pending = False
        if self.in_slow_start:
            acked = self._slow_start(acked)
            if acked <= 0:
                return
        # RFC 5681 §3.1 (RECOMMENDED byte counting, RFC 3465 §2.1): once the
        # bytes acknowledged reach cwnd, cwnd grows by SMSS -- one SMSS per RTT.
        self.bytes_acked += acked
        while self.bytes_acked >= self.cwnd:
            self.bytes_acked -= self.cwnd
            self.cwnd += self.mss

    def _halve(self, flight_size: int) -> None:
        # RFC 5681 §3.1 eq. 4: ssthresh = max(FlightSize / 2, 2*SMSS).
        self.ssthresh = max(flight_size // 2, 2 * self.mss)
        self.bytes_acked = 0

    def on_loss(self, flight_size: int, now: float) -> None:
        """Fast retransmit: ssthresh per eq. 4, cwnd = ssthresh (RFC 5681 §3.2 step 2, RFC 6582 §3.2)."""
        self._halve(flight_size)
        # RFC 6582 §3.2 step 2 adds 3*SMSS; the connection does that itself.
        self.cwnd = self.ssthresh
        self._rto_pending = False

    def on_rto(self, flight_size: int, now: float) -> None:
        """Retransmission timeout: ssthresh per eq. 4 once, cwnd = LW = 1 SMSS (RFC 5681 §3.1)."""
        if not self._rto_pending:
            self._halve(flight_size)
        self.bytes_acked = 0
        # RFC 5681 §3.1: "cwnd MUST be set to no more than the loss window, LW,
        # which equals 1 full-sized segment".
        self.cwnd = self.mss
        self._rto_pending = True


# RFC 9438 §4.1.1 constants: C = 0.4, beta_cubic = 0.7; §4.3 eq. 3: alpha_cubic.
CUBIC_C = 0.4
BETA_CUBIC = 0.7
ALPHA_CUBIC = 3 * (1 - BETA_CUBIC) / (1 + BETA_CUBIC)


def _cbrt(x: float) -> float:
    return math.copysign(abs(x) ** (1 / 3), x)


class Cubic(_Window):
    """CUBIC (RFC 9438).  Windows inside the algorithm are in segments (floats)."""

    __slots__ = (
        "fast_convergence",
        "w_max",
        "cwnd_prior",
        "k",
        "t_epoch",
        "cwnd_epoch",
        "w_est",
        "_after_rto",
        "_frac",
    )

    def __init__(self, mss: int, initial_window: int | None = None, fast_convergence: bool = True) -> None:
        super().__init__(mss, initial_window)
        self.fast_convergence = fast_convergence
        self.w_max: float | None = None  # segments; cwnd before the last reduction
        self.cwnd_prior: float | None = None  # segments; cwnd when ssthresh was last set
        self.k = 0.0  # seconds
        self.t_epoch: float | None = None  # start of the current congestion avoidance stage
        self.cwnd_epoch = 0.0  # segments
        self.w_est = 0.0  # segments; Reno-friendly estimate
        self._after_rto = False
        self._frac = 0.0  # sub-byte growth carried between ACKs

    def w_cubic(self, t: float) -> float:
        """W_cubic(t) = C*(t-K)^3 + W_max, in segments (RFC 9438 §4.2 eq. 1)."""
        assert self.w_max is not None
        return CUBIC_C * (t - self.k) ** 3 + self.w_max

    def _start_epoch(self, now: float) -> None:
        # RFC 9438 §4.2: a congestion avoidance stage starts at t_epoch with
        # cwnd_epoch; §4.3: W_est starts at cwnd_epoch.
        self.t_epoch = now
        self.cwnd_epoch = self.cwnd / self.mss
        self.w_est = self.cwnd_epoch
        self._frac = 0.0
        if self.w_max is None or self._after_rto:
            # RFC 9438 §4.8: in the first stage after a timeout, K = 0 and
            # W_max = cwnd at the start of the stage.  Leaving slow start with
            # no congestion event yet (cwnd reached a configured ssthresh) is
            # treated the same way -- our choice, the curve starts flat.
            self.w_max = self.cwnd_epoch
            self.k = 0.0
            if self.cwnd_prior is None:
                self.cwnd_prior = self.cwnd_epoch
            self._after_rto = False
        else:
            # RFC 9438 §4.2 eq. 2: K = cubic_root((W_max - cwnd_epoch) / C).
            self.k = _cbrt((self.w_max - self.cwnd_epoch) / CUBIC_C)

    def on_ack(self, acked: int, now: float, srtt: float | None) -> None:
        """New data acknowledged outside recovery."""
        if acked <= 0:
            return
        self._rto_pending = False
        if self.in_slow_start:
            # RFC 9438 §4.10: CUBIC uses standard slow start below ssthresh.
            self.t_epoch = None
            acked = self._slow_start(acked)
            if acked <= 0:
                return
        if self.t_epoch is None:
            self._start_epoch(now)
        assert self.t_epoch is not None and self.cwnd_prior is not None
        mss = self.mss
        cwnd_seg = self.cwnd / mss
        segments_acked = acked / mss
        t = now - self.t_epoch
        # RFC 9438 §4.3 eq. 4: W_est += alpha_cubic * segments_acked / cwnd, with
        # alpha_cubic = 1 once W_est >= cwnd_prior.
        alpha = 1.0 if self.w_est >= self.cwnd_prior else ALPHA_CUBIC
        self.w_est += alpha * segments_acked / cwnd_seg
        if self.w_cubic(t) < self.w_est:
            # RFC 9438 §4.3: Reno-friendly region, cwnd = W_est.
            self.cwnd = max(self.cwnd, int(self.w_est * mss))
            return
        # RFC 9438 §4.2: target = W_cubic(t + RTT) clamped to [cwnd, 1.5*cwnd];
        # §4.4 (concave) and §4.5 (convex): cwnd += (target - cwnd)/cwnd per
        # acknowledged segment.
        rtt = srtt if srtt is not None else 0.0
        target = min(max(self.w_cubic(t + rtt), cwnd_seg), 1.5 * cwnd_seg)
        self._frac += (target - cwnd_seg) / cwnd_seg * segments_acked * mss
        whole = int(self._frac)
        self.cwnd += whole
        self._frac -= whole

    def _reduce(self, flight_size: int) -> None:
        mss = self.mss
        cwnd_seg = self.cwnd / mss
        # RFC 9438 §4.7 fast convergence: a loss before reaching the previous
        # W_max means another flow took bandwidth; release some.
        if self.fast_convergence and self.w_max is not None and cwnd_seg < self.w_max:
            self.w_max = cwnd_seg * (1 + BETA_CUBIC) / 2
        else:
            self.w_max = cwnd_seg
        # RFC 9438 §4.6: ssthresh = flight_size * beta_cubic, at least 2 SMSS;
        # cwnd_prior = cwnd.
        self.cwnd_prior = cwnd_seg
        self.ssthresh = max(int(flight_size * BETA_CUBIC), 2 * mss)
        self.t_epoch = None
        self._frac = 0.0

    def on_loss(self, flight_size: int, now: float) -> None:
        """Fast retransmit: multiplicative decrease by beta_cubic (RFC 9438 §4.6, §4.7)."""
        self._reduce(flight_size)
        # RFC 9438 §4.6: cwnd = max(ssthresh, 2) segments.
        self.cwnd = self.ssthresh
        self._rto_pending = False
        self._after_rto = False

    def on_rto(self, flight_size: int, now: float) -> None:
        """Timeout: ssthresh via beta_cubic, cwnd = 1 SMSS (RFC 9438 §4.8, RFC 5681 §3.1)."""
        if not self._rto_pending:
            self._reduce(flight_size)
        self.cwnd = self.mss
        self.t_epoch = None
        self._rto_pending = True
        self._after_rto = True

    def on_recovery_exit(self, now: float) -> None:
        """Full acknowledgment: cwnd = ssthresh; the next ACK starts a new epoch."""
        self.cwnd = self.ssthresh
        self.t_epoch = None


def make_congestion_control(name: str, mss: int) -> CongestionControl:
    """Build the named algorithm: "newreno" or "cubic"."""
    if name == "newreno":
        return NewReno(mss)
    if name == "cubic":
        return Cubic(mss)
    raise ValueError(f"unknown congestion control {name!r}")
