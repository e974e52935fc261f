"""Retransmission timeout estimation (RFC 6298).

Contract: the caller feeds :meth:`RttEstimator.sample` only *unambiguous*
round-trip measurements -- Karn's rule (RFC 6298 §3) is the caller's job: no
sample from a segment that was retransmitted, unless it comes from a TCP
timestamp echo (RFC 7323 §4) which identifies the transmission.  The caller
calls :meth:`backoff` each time the retransmission timer expires (§5.5) and
reads :attr:`rto` when it (re)arms the timer.  No clock is read here.
"""

from __future__ import annotations

# RFC 6298 §2.3: alpha = 1/8, beta = 1/4; §2.2: K = 4.
ALPHA = 1 / 8
BETA = 1 / 4
K = 4


class RttEstimator:
    """SRTT/RTTVAR/RTO state of one connection (RFC 6298 §2)."""

    __slots__ = ("srtt", "rttvar", "initial_rto", "min_rto", "max_rto", "granularity", "backoffs", "_base_rto", "_rto")

    def __init__(
        self,
        initial_rto: float = 1.0,
        min_rto: float = 0.2,
        max_rto: float = 60.0,
        granularity: float = 0.001,
    ) -> None:
        # RFC 6298 §2.4 asks for a 1 s floor; like Linux (TCP_RTO_MIN = 200 ms)
        # we default to 0.2 s so a lost segment on a LAN does not stall for a
        # second.  Pass min_rto=1.0 for the RFC's conservative value.
        # §2.5: a maximum "MAY be placed ... provided it is at least 60 seconds".
        if not 0 < min_rto <= max_rto:
            raise ValueError("need 0 < min_rto <= max_rto")
        self.srtt: float | None = None
        self.rttvar: float | None = None
        self.initial_rto = initial_rto
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.granularity = granularity
        # §2.1: until a measurement is made, RTO = 1 s (configurable).
        self._base_rto = self._clamp(initial_rto)
        self._rto = self._base_rto
        self.backoffs = 0  # expiries since the last sample

    def _clamp(self, rto: float) -> float:
        # RFC 6298 §2.4 (floor, see __init__) and §2.5 (ceiling).
        return min(self.max_rto, max(self.min_rto, rto))

    @property
    def rto(self) -> float:
        """Current RTO in seconds, including exponential backoff, clamped."""
        return self._rto

    def sample(self, rtt: float) -> None:
        """Take one RTT measurement R (seconds); collapses any backoff."""
        if rtt < 0:
            raise ValueError("negative RTT sample")
        if self.srtt is None or self.rttvar is None:
            # RFC 6298 §2.2: first measurement R.
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            # RFC 6298 §2.3: RTTVAR first, using the old SRTT.
            self.rttvar = (1 - BETA) * self.rttvar + BETA * abs(self.srtt - rtt)
            self.srtt = (1 - ALPHA) * self.srtt + ALPHA * rtt
        # RFC 6298 §2.2/§2.3: RTO = SRTT + max(G, K*RTTVAR).  A new sample
        # recomputes RTO and so "collapses" a backed-off timer (note after §5.7).
        self._base_rto = self._clamp(self.srtt + max(self.granularity, K * self.rttvar))
        self._rto = self._base_rto
        self.backoffs = 0

    def backoff(self) -> None:
        """The retransmission timer expired: double RTO (RFC 6298 §5.5)."""
        # RFC 6298 §5.5, with the §2.5 maximum applied to the doubled value.
        self._rto = min(self.max_rto, self._rto * 2)
        self.backoffs += 1

    def restart(self, initial_rto: float) -> None:
        """Forget every sample: RTO = initial_rto (clamped) until the next one (RFC 6298 §2.1, §5.7)."""
        self.srtt = None
        self.rttvar = None
        self.initial_rto = initial_rto
        self._base_rto = self._clamp(initial_rto)
        self._rto = self._base_rto
        self.backoffs = 0

    def collapse(self) -> None:
        """Drop the exponential backoff: RTO returns to the last computed value."""
        self._rto = self._base_rto
        self.backoffs = 0

    def __repr__(self) -> str:
        return f"RttEstimator(srtt={self.srtt}, rttvar={self.rttvar}, rto={self._rto})"
