"""NewReno loss recovery for connections without SACK (RFC 6582; gVisor ``reno_recovery.go``).

Contract: the :class:`~workers.tcp.recovery.Recovery` interface.  Three
duplicate ACKs (RFC 5681 §3.2) start fast recovery: the first unacknowledged
segment is retransmitted, cwnd is inflated by one SMSS per further duplicate
and deflated on a partial ACK, which retransmits the next hole (RFC 6582 §3.2
steps 1-5); a full ACK ends it.  Before the third duplicate, limited transmit
(RFC 3042) lets new data go.  After a timeout the interface's go-back-N resends
the rest.
"""

from __future__ import annotations

from pipeline.wire.seqnum import seq_add, seq_ge, seq_gt, seq_sub
from pipeline.wire.tcp import TcpSegment
from workers.tcp.recovery import DUP_ACK_THRESHOLD, NEWRENO, OPEN, Recovery


class RenoRecovery(Recovery):
    """RFC 6582 NewReno with RFC 3042 limited transmit."""

    __slots__ = ()

    def on_ack(self, seg: TcpSegment, old_una: int, acked: int, dup: bool, now: float) -> None:
        if self.due:
            self.due.clear()
        if acked > 0:
            self._on_acked(acked, now)
        elif dup:
            self._on_dup_ack(now)

    def _on_acked(self, acked: int, now: float) -> None:
        """New data acknowledged: grow cwnd, or NewReno partial/full ACK (RFC 6582 §3.2)."""
        snd = self.snd
        cc = snd.cc
        if not self.in_fast_recovery:
            self.dupacks = 0
            cc.on_ack(acked, now, snd.rtt.srtt)  # slow start after a timeout too
            return
        if seq_ge(snd.snd_una, self.recover):
            # step 3, full acknowledgment: deflate to ssthresh and leave fast recovery.
            self.end()
            cc.on_recovery_exit(now)
            return
        # step 5, partial acknowledgment: retransmit the next hole, deflate by the
        # amount acknowledged, add back one SMSS if that was at least one SMSS.
        mss = snd.send_mss
        cc.cwnd = max(mss, cc.cwnd - acked + (mss if acked >= mss else 0))
        self._retransmit_hole()

    def _on_dup_ack(self, now: float) -> None:
        """RFC 5681 §3.2 / RFC 6582 §3.2 steps 1, 2 and 4."""
        snd = self.snd
        snd.stats.dup_acks += 1
        self.dupacks += 1
        if self.in_fast_recovery:
            snd.cc.cwnd += snd.send_mss  # step 4: inflate by one SMSS per duplicate ACK
            return
        # step 2: only if the ACK covers more than recover (no second reduction per window).
        if self.dupacks == DUP_ACK_THRESHOLD and seq_gt(snd.snd_una, self.recover):
            self._enter(now)

    def _enter(self, now: float) -> None:
        """Fast retransmit and enter fast recovery (RFC 6582 §3.2 step 2)."""
        snd = self.snd
        cc = snd.cc
        snd.stats.fast_retransmits += 1
        self.recover = snd.snd_nxt
        cc.on_loss(seq_sub(snd.snd_nxt, snd.snd_una), now)
        self.state = NEWRENO
        cc.cwnd = cc.ssthresh + DUP_ACK_THRESHOLD * snd.send_mss
        self._retransmit_hole()

    def _retransmit_hole(self) -> None:
        """Retransmit the first unacknowledged segment (RFC 6582 §3.2 steps 2, 5)."""
        snd = self.snd
        start, end = snd.snd_una, snd.snd_nxt
        if seq_ge(start, end):
            return
        # One segment (RFC 5681 §3.2 step 3), however large segments may otherwise be.
        self._resend(start, min(seq_sub(end, start), snd.send_mss))

    def output(self, now: float) -> int | None:
        snd = self.snd
        if self.due:
            self.due.clear()
        una = snd.snd_una
        cwnd = snd.cc.cwnd
        if self.dupacks and self.state is OPEN:
            # RFC 3042 §2 limited transmit: new data on the first two duplicate
            # ACKs, up to cwnd + 2*SMSS outstanding.
            cwnd += min(self.dupacks, 2) * snd.send_mss
        edge = seq_add(una, min(snd.snd_wnd, cwnd))  # RFC 5681 §3.1: min(cwnd, rwnd)
        if self.rtx_nxt is None:
            return edge
        return self._go_back_n(edge)
