"""Tail loss probes (RFC 8985 §7): when to probe, with what, and what a probe's ACK says.

Contract: the SACK recovery (:mod:`sack_recovery`) owns one :class:`LossProbe`
and the LOSS_PROBE timer through it.  :meth:`LossProbe.arm` (re)starts the PTO
-- the sender decides when: after new data was sent or acknowledged, or a loss
repaired -- or cancels it; :meth:`choose` picks the probe when it expires (new
data if the peer's window allows, else the last segment); :meth:`verdict`
judges the ACK of a retransmitted probe (§7.4).  It reads the sender's state
and decides nothing else.  Our deviations: up to ``MAX_LOSS_PROBES`` probes per
ACK of new data (the second after twice the PTO), and probes in recovery too
(the SACK recovery's, for a lost retransmission).
"""

from __future__ import annotations

from typing import Final

from pipeline.wire.seqnum import seq_add, seq_ge, seq_max, seq_sub
from workers.tcp.congestion import CongestionControl
from workers.tcp.sendstate import SendState
from workers.tcp.timers import Timer

WC_DEL_ACK_T: Final = 0.2    # RFC 8985 §7.2 WCDelAckT: worst-case delayed ACK of the peer
MAX_LOSS_PROBES: Final = 2   # probes per ACK of new data before the RTO has to act
PTO_SLACK: Final = 0.002     # added to 2*SRTT for the loss probe timeout (Linux: TCP_TIMEOUT_MIN, 2 ms)


class LossProbe:
    """RFC 8985 §7 state: probes sent since new data was acknowledged, a probe awaiting its verdict."""

    __slots__ = ("snd", "sent", "end")

    def __init__(self, snd: SendState) -> None:
        self.snd = snd
        self.sent = 0  # probes since new data was last acknowledged (TLP's count, §7.2)
        self.end: int | None = None  # end of a retransmitted probe awaiting its verdict

    def may_probe(self) -> bool:
        """Something is outstanding, the window is open and the probes of this flight are not used up."""
        snd = self.snd
        return snd.snd_una != snd.snd_nxt and self.sent < MAX_LOSS_PROBES and snd.snd_wnd > 0

    def choose(self) -> tuple[int, int, bool]:
        """§7.3: the probe as (seq, limit, new data?): new data if the peer's window allows
        (cwnd does not limit a probe), else the last segment sent, up to SMSS."""
        snd = self.snd
        self.sent += 1
        una, nxt = snd.snd_una, snd.snd_nxt
        unsent = seq_sub(snd.data_end(), nxt)
        room = seq_sub(seq_add(una, snd.snd_wnd), nxt)
        if unsent > 0 and room > 0:
            return nxt, min(unsent, room, snd.send_mss), True
        start = seq_max(una, seq_add(nxt, -snd.send_mss))
        self.end = nxt
        return start, seq_sub(nxt, start), False

    def verdict(self, dsack: bool, cc: CongestionControl, is_open: bool, now: float) -> None:
        """§7.4: did the retransmitted probe repair a loss?"""
        snd = self.snd
        assert self.end is not None
        if dsack:
            self.end = None  # a D-SACK (RFC 2883 §4): the probe was a duplicate, nothing was lost
        elif seq_ge(snd.snd_una, self.end):
            # §7.4.2: the probe alone repaired a loss -- respond to congestion as for
            # a fast retransmit, without entering recovery.
            self.end = None
            if is_open:
                cc.on_loss(seq_sub(snd.snd_nxt, snd.snd_una), now)

    def arm(self, now: float, sends: bool, is_open: bool) -> None:
        """§7.2: PTO = 2*SRTT, plus WCDelAckT for a single outstanding segment."""
        snd = self.snd
        srtt = snd.rtt.srtt
        timers = snd.timers
        if (srtt is None or self.sent >= MAX_LOSS_PROBES or snd.snd_wnd == 0 or snd.snd_una == snd.snd_nxt
                or not sends):
            timers.cancel(Timer.LOSS_PROBE)
            return
        pto = 2 * srtt
        if seq_sub(snd.snd_nxt, snd.snd_una) <= snd.send_mss and is_open:
            pto = max(pto, 1.5 * srtt + WC_DEL_ACK_T)
        else:
            pto += PTO_SLACK  # timer granularity and ACK processing on a sub-millisecond path
        # Our extension: RFC 8985 §7 sends one probe per episode; a second one, after
        # twice the PTO, saves a 200 ms RTO when the probe itself is lost (5 % loss on
        # a sub-millisecond path makes that common).  The RTO still bounds them.
        deadline = now + pto * (1 << self.sent)
        rto = timers.deadline(Timer.RETRANSMIT)
        if rto is not None and rto <= deadline:
            timers.cancel(Timer.LOSS_PROBE)  # §7.2: the RTO comes first anyway
            return
        timers.arm(Timer.LOSS_PROBE, deadline)
