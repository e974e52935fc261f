"""SACK loss recovery (RFC 6675, RFC 6937 PRR, RFC 8985 RACK-TLP; gVisor ``sack_recovery.go``).

Contract: the :class:`~workers.tcp.recovery.Recovery` interface for connections
that negotiated SACK.  It owns the SACK scoreboard, the RACK state and
sent-segment log (:mod:`rack`, fed by the sender's :meth:`on_send`) and the
tail loss probe (:mod:`tlp`), each built when first needed -- the scoreboard
at the first SACK block, RACK at the first transmission (or first SACK block)
-- so a connection that never sees either never pays for them; until then
``None`` reads as an empty one.

RACK is the loss detector: data is lost once something sent after it was
delivered and RACK.rtt + reo_wnd has passed (a lost retransmission too, and the
data before a delivered tail loss probe); when RACK marks SND.UNA's data lost,
fast recovery starts.  Repair follows RFC 6675: pipe, NextSeg() rules 1, 2 and
4, every lost hole the budget allows in TSO-sized chunks; how much may be sent
per ACK in fast recovery is RFC 6937 Proportional Rate Reduction (PRR-SSRB).
After a timeout the same loop resends what is not SACKed up to the recovery
point, by cwnd (RFC 6675 §5.1, state RTO_RECOVERY).  Outside recovery SACKed
bytes count as gone, so new data keeps flowing (RFC 3042 generalized).  Our
deviations, each commented where it is made: cwnd and the PRR budget are used
in whole segments; a retransmission lost again is probed after the PTO.
"""

from __future__ import annotations

import math

from pipeline.wire.seqnum import seq_add, seq_ge, seq_gt, seq_le, seq_lt, seq_max, seq_min, seq_sub
from pipeline.wire.tcp import TcpSegment
from workers.tcp.rack import Rack
from workers.tcp.recovery import OPEN, RTO, SACK, Recovery
from workers.tcp.scoreboard import SackScoreboard
from workers.tcp.sendstate import SendState
from workers.tcp.timers import Timer
from workers.tcp.tlp import LossProbe


class SackRecovery(Recovery):
    """RFC 6675 recovery driven by RACK, with PRR and tail loss probes."""

    __slots__ = ("scoreboard", "rack", "tlp", "high_rxt", "rescue_done", "relost", "prr_delivered", "prr_out",
                 "recover_fs", "budget", "_sacked_prev")

    def __init__(self, snd: SendState) -> None:
        super().__init__(snd)
        # Built when first needed (need_scoreboard, need_rack); None reads as empty.
        self.scoreboard: SackScoreboard | None = None
        self.rack: Rack | None = None  # RFC 8985 state and the sent-segment log
        self.tlp = LossProbe(snd)
        self.high_rxt = snd.iss  # RFC 6675 HighRxt: end of the highest retransmission
        self.rescue_done = False  # RFC 6675 §4 NextSeg rule 4, once per recovery
        self.relost: list[tuple[int, int]] = []  # retransmissions RACK found lost again
        # RFC 6937 PRR: delivered and sent since fast recovery began, FlightSize then,
        # and what the last ACK allows (sndcnt) still unsent.
        self.prr_delivered = 0
        self.prr_out = 0
        self.recover_fs = 0
        self.budget = 0
        self._sacked_prev = 0  # SACKed bytes after the previous ACK (RFC 6937 DeliveredData)

    def need_scoreboard(self) -> SackScoreboard:
        """The SACK scoreboard, built now if this is the first time it is needed."""
        sb = self.scoreboard
        if sb is None:
            sb = self.scoreboard = SackScoreboard()
        return sb

    def need_rack(self) -> Rack:
        """The RACK state, built now if this is the first time it is needed.

        Positions are anchored at SND.UNA (as ``advance`` keeps them), so one built late
        behaves as one built with the connection: the log had nothing in it until now.
        """
        rack = self.rack
        if rack is None:
            rack = self.rack = Rack(self.snd.snd_una)
        return rack

    def end(self) -> None:
        rack = self.rack
        if rack is not None:  # SACK recovery is entered only by RACK: it exists then
            if self.state is SACK:
                rack.on_recovery_exit()
            rack.forget_retransmissions()
        super().end()
        self.relost.clear()

    def on_send(self, seq: int, end: int, now: float, rtx: bool) -> None:
        """RACK's log of every transmission; PRR's prr_out for new data (§3.1: "sent")."""
        rack = self.rack
        if rack is None:
            rack = self.need_rack()
        rack.on_send(seq, end, now, rtx)
        if not rtx and self.state is SACK:
            n = seq_sub(end, seq)
            self.prr_out += n
            self.budget -= n

    def on_resend(self, used: int) -> None:
        """PRR counts a retransmission when it is decided (RFC 6937 §3.1 prr_out)."""
        if self.state is SACK:
            self.prr_out += used
            self.budget -= used

    def advance(self, ack: int) -> None:
        """SND.UNA moved: RFC 8985 §7.2, the probes start over; the logs forget what is acknowledged."""
        self.tlp.sent = 0
        super().advance(ack)
        sb = self.scoreboard
        if sb is not None:
            sb.advance(ack)
        rack = self.rack
        if rack is not None:
            rack.advance(ack)

    # == ACK processing ==============================================================

    def on_ack(self, seg: TcpSegment, old_una: int, acked: int, dup: bool, now: float) -> None:
        if self.due:
            self.due.clear()
        snd = self.snd
        una, nxt = snd.snd_una, snd.snd_nxt
        blocks = seg.options.sack_blocks
        sb = self.scoreboard
        dsack = False
        if blocks:
            sb = self.need_scoreboard()
            sb.update(blocks, una, nxt)
            dsack = _dsack(seg)
            if dsack:
                self.need_rack().on_dsack(una, nxt)
        if acked > 0 or blocks:
            ts = seg.options.timestamp if snd.options.timestamps else None
            self.need_rack().on_ack(una, old_una, blocks, sb, ts[1] if ts else None, now)
        if self.tlp.end is not None:
            self.tlp.verdict(dsack, snd.cc, self.state is OPEN, now)
        if acked > 0:
            self._on_acked(acked, now)
        elif dup:
            snd.stats.dup_acks += 1
            self.dupacks += 1  # RACK (RFC 8985) decides; a duplicate ACK carries SACK blocks for it
        delivered = max(0, acked) + (sb.sacked_bytes if sb is not None else 0) - self._sacked_prev
        self._detect(now)
        if self.state is SACK:
            self._prr(delivered)
        self._sacked_prev = sb.sacked_bytes if sb is not None else 0

    def _on_acked(self, acked: int, now: float) -> None:
        """New data acknowledged: grow cwnd, or leave recovery (RFC 6675 §5.1, §5 step (A))."""
        snd = self.snd
        if self.state is RTO and seq_ge(snd.snd_una, self.recover):
            self.end()  # RFC 6675 §5.1: the timeout's recovery is over
        if not self.in_fast_recovery:
            self.dupacks = 0
            snd.cc.on_ack(acked, now, snd.rtt.srtt)  # slow start after a timeout too
        elif seq_ge(snd.snd_una, self.recover):
            # Full acknowledgment: recovery ends when HighACK >= RecoveryPoint;
            # deflate to ssthresh.  A partial one changes no window: output() sends by pipe.
            self.end()
            snd.cc.on_recovery_exit(now)

    def _detect(self, now: float) -> None:
        """RFC 8985 §6.2 step 5, and fast recovery when SND.UNA's data is found lost."""
        snd = self.snd
        timers = snd.timers
        rack = self.rack
        if rack is None:  # nothing sent yet: nothing to find lost
            timers.cancel(Timer.REORDER)
            return
        sb = self.scoreboard
        sacked = sb.sacked_bytes if sb is not None else 0
        reo_wnd = rack.reo_wnd(self.state is not OPEN, sacked, snd.send_mss, snd.rtt.srtt)
        relost, deadline = rack.detect(sb, reo_wnd, now)
        una = snd.snd_una
        if relost:
            snd.stats.lost_retransmissions += len(relost)
            self.relost.extend(relost)
            self.relost.sort(key=lambda r: seq_sub(r[0], una))  # in sequence order from SND.UNA, across a wrap
        if deadline is None:
            timers.cancel(Timer.REORDER)
        else:
            timers.arm(Timer.REORDER, max(deadline, now))
        lost = rack.lost_below()
        if (self.state is OPEN and lost is not None and seq_gt(lost, una)
                and seq_ge(una, self.recover) and not (sb is not None and sb.is_sacked(una))):
            self._enter(now)

    def on_reorder_timer(self, now: float, sends: bool) -> None:
        """RFC 8985 §6.2 step 5: the reorder window of a segment has passed; look again."""
        if self.due:
            self.due.clear()
        if self.snd.snd_una != self.snd.snd_nxt and sends:
            self._detect(now)

    def _enter(self, now: float) -> None:
        """Fast retransmit and enter fast recovery (RFC 6675 §5 steps (4.1)-(4.3))."""
        snd = self.snd
        una, nxt = snd.snd_una, snd.snd_nxt
        snd.stats.fast_retransmits += 1
        self.recover = nxt  # RecoveryPoint = HighData
        snd.cc.on_loss(seq_sub(nxt, una), now)
        # Retransmit the first segment now; (4.4) the rest as PRR allows in output().
        # RFC 6937: RecoverFS = snd.nxt - snd.una, nothing delivered or sent yet.
        self.state = SACK
        self.rescue_done = False
        self.relost.clear()
        self.prr_delivered = self.prr_out = self.budget = 0
        self.recover_fs = seq_sub(nxt, una)
        used = self._resend(una, min(seq_sub(nxt, una), snd.send_mss))
        self.high_rxt = seq_add(una, used)

    def _prr(self, delivered: int) -> None:
        """RFC 6937 §3.1 on each ACK in fast recovery: sndcnt, as PRR-SSRB."""
        snd = self.snd
        cc = snd.cc
        self.prr_delivered += delivered
        pipe = self._pipe(self._lost_edge())
        ssthresh = cc.ssthresh
        if pipe > ssthresh:
            # Proportional part: sndcnt = CEIL(prr_delivered * ssthresh / RecoverFS) - prr_out.
            sndcnt = math.ceil(self.prr_delivered * ssthresh / max(1, self.recover_fs)) - self.prr_out
        else:
            # Slow start reduction bound: catch up to ssthresh, at most one SMSS beyond what was delivered.
            limit = max(self.prr_delivered - self.prr_out, delivered) + snd.send_mss
            sndcnt = min(ssthresh - pipe, limit)
        self.budget = max(sndcnt, 0)
        cc.cwnd = pipe + self.budget  # RFC 6937: cwnd = pipe + sndcnt

    # == timeout =====================================================================

    def before_rto_resend(self, now: float) -> None:
        self.tlp.end = None
        super().before_rto_resend(now)

    def after_rto_resend(self, end: int, retries: int) -> None:
        if retries > 1:
            # The same segment timed out again: the receiver may have reneged on what it
            # SACKed (RFC 2018 §8), so stop skipping that data (RFC 6675 §5.1).
            self.scoreboard = None
            self._sacked_prev = 0
        if self.snd.snd_wnd == 0:
            self.probe_sent()
        else:
            # RFC 6675 §5.1: resend what is not SACKed up to the recovery point, by
            # pipe, and do not enter fast recovery again before it is acknowledged.
            self.state = RTO
            self.high_rxt = end
            self.tlp.sent = 0

    # == output ======================================================================

    def output(self, now: float) -> int | None:
        snd = self.snd
        if self.due:
            self.due.clear()
        una, nxt, wnd = snd.snd_una, snd.snd_nxt, snd.snd_wnd
        cwnd = snd.cc.cwnd
        if self.state is SACK or self.state is RTO:
            # RFC 6675 §5 (C): lost segments while cwnd - pipe allows (in whole
            # segments), then new data in what is left (NextSeg rule 2), within rwnd.
            room = self._repair(now)
            if self.state is SACK:
                room = self.budget  # RFC 6937: what PRR still allows after the retransmissions
            edge = seq_add(nxt, max(room, snd.send_mss) if room > 0 else 0)
            wnd_edge = seq_add(una, wnd)
            if seq_gt(edge, wnd_edge):
                edge = wnd_edge
        else:
            sb = self.scoreboard
            sacked = sb.sacked_bytes if sb is not None else 0
            if sacked:
                # SACKed data has left the network (RFC 6675 §4 pipe): a segment goes
                # out for each one, as RFC 3042 limited transmit does for the first
                # two duplicate ACKs; the new data brings the ACKs that reveal a loss.
                cwnd += sacked
            elif self.dupacks and self.state is OPEN:
                cwnd += min(self.dupacks, 2) * snd.send_mss  # RFC 3042 §2 limited transmit
            edge = seq_add(una, min(wnd, cwnd))  # RFC 5681 §3.1: min(cwnd, rwnd)
        if self.rtx_nxt is None:
            return edge
        return self._go_back_n(edge)

    def _lost_edge(self) -> int | None:
        """Un-SACKed data below this sequence number is deemed lost (RFC 8985 §6.2 via RACK)."""
        rack = self.rack
        lost = rack.lost_below() if rack is not None else None
        if self.state is RTO:
            # RFC 6675 §5.1: after a timeout everything outstanding up to the
            # recovery point and not SACKed is presumed lost (go-back-N skipping SACKed).
            lost = self.recover if lost is None else seq_max(lost, self.recover)
        nxt = self.snd.snd_nxt
        if lost is not None and seq_gt(lost, nxt):
            lost = nxt
        return lost

    def _pipe(self, lost: int | None) -> int:
        """RFC 6675 §4 SetPipe(): bytes presumed in flight, in O(SACK ranges)."""
        # Each un-SACKed byte counts once if not IsLost, and once more if it was
        # retransmitted (below HighRxt); retransmissions found lost again count nothing.
        snd = self.snd
        una = snd.snd_una
        sb = self.scoreboard
        pipe = seq_sub(snd.snd_nxt, una) - (sb.sacked_bytes if sb is not None else 0)
        if lost is not None and seq_gt(lost, una):
            pipe -= seq_sub(lost, una) - (sb.sacked_below(lost) if sb is not None else 0)
        high = self.high_rxt
        if seq_gt(high, una):
            pipe += seq_sub(high, una) - (sb.sacked_below(high) if sb is not None else 0)
        for start, end in self.relost:
            pipe -= max(0, seq_sub(end, seq_max(start, una)))
        return max(0, pipe)

    def _resend_hole(self, s: int, e: int, room: int, wnd_edge: int) -> int:
        """Retransmit [s, e) as far as room (at least one SMSS) and the peer's window allow."""
        return self._resend(s, min(seq_sub(e, s), max(self.snd.send_mss, room), seq_sub(wnd_edge, s)))

    def _repair(self, now: float) -> int:
        """RFC 6675 §5 step (C) for retransmissions; returns cwnd - pipe left for new data.

        The loop runs while cwnd - pipe > 0 rather than >= 1 SMSS: cwnd is counted in
        whole segments, as Linux counts packets, so ssthresh = 2.5 SMSS after a small
        flight does not leave a lost retransmission waiting for the RTO.
        """
        snd = self.snd
        mss = snd.send_mss
        una, nxt = snd.snd_una, snd.snd_nxt
        wnd_edge = seq_add(una, snd.snd_wnd)
        lost = self._lost_edge()
        pipe = self._pipe(lost)
        # Fast recovery sends what PRR allows (RFC 6937), after a timeout what cwnd allows.
        cwnd = pipe + self.budget if self.state is SACK else snd.cc.cwnd
        repaired = False
        # Retransmissions lost again (lost-retransmission detection, as RFC 8985
        # RACK finds them: data sent after the retransmission was SACKed) go first.
        relost = self.relost
        while relost and cwnd - pipe > 0:
            start, end = relost[0]
            s, e = self._unsacked_from(seq_max(start, una))
            if seq_gt(e, end):
                e = end
            if seq_ge(s, e):
                relost.pop(0)
                continue
            if seq_ge(s, wnd_edge):
                break
            used = self._resend_hole(s, e, cwnd - pipe, wnd_edge)
            if not used:
                relost.pop(0)
                continue
            repaired = True
            if seq_ge(seq_add(s, used), end):
                relost.pop(0)
            else:
                relost[0] = (seq_add(s, used), end)
            pipe += used
        # NextSeg rule 1: the lowest IsLost un-SACKed data above HighRxt.
        while lost is not None and cwnd - pipe > 0:
            s, e = self._unsacked_from(seq_max(self.high_rxt, una))
            if seq_gt(e, lost):
                e = lost
            if seq_ge(s, e) or seq_ge(s, wnd_edge):
                break
            # As many SMSS-sized segments as cwnd - pipe allows, in one TSO segment if
            # max_send_segment permits (a lost 64 KB segment is ~44 lost packets).
            used = self._resend_hole(s, e, cwnd - pipe, wnd_edge)
            if not used:
                break
            repaired = True
            self.high_rxt = seq_add(s, used)
            pipe += used
        # NextSeg rule 4 (rescue retransmission): nothing new to send in fast
        # recovery, so once per recovery resend the highest outstanding segment;
        # a lost tail then needs no timeout.
        if (self.state is SACK and not self.rescue_done and cwnd - pipe > 0
                and not snd.has_unsent() and relost == []):
            sb = self.scoreboard
            top = sb.highest_sacked if sb is not None else None
            start = seq_max(seq_max(self.high_rxt, una), seq_add(nxt, -mss))
            if (top is None or seq_lt(top, nxt)) and seq_lt(start, nxt) and seq_lt(start, wnd_edge):
                self.rescue_done = True
                pipe += self._resend(start, seq_sub(nxt, start))
        if repaired:
            # Our extension of RFC 8985 §7.2: a repair restarts the PTO, which then
            # probes a retransmission lost again (_recovery_probe).
            self.tlp.arm(now, True, False)
        return cwnd - pipe

    def _unsacked_from(self, start: int) -> tuple[int, int]:
        sb = self.scoreboard
        if sb is not None:
            return sb.unsacked_from(start, self.snd.snd_nxt)
        return start, self.snd.snd_nxt

    def _sacked_below(self, start: int) -> int:
        sb = self.scoreboard
        return sb.sacked_below(start) if sb is not None else 0

    # == tail loss probe =============================================================

    def on_loss_probe(self, now: float, sends: bool) -> int:
        """RFC 8985 §7.3: the PTO expired; probe to elicit an ACK."""
        if self.due:
            self.due.clear()
        tlp = self.tlp
        if not sends or not tlp.may_probe():
            return 0  # a zero window is the persist timer's (RFC 9293 §3.8.6.1)
        if self.state is not OPEN:
            self._recovery_probe()
            return 0
        self.snd.stats.loss_probes += 1
        seq, limit, new = tlp.choose()
        if new:
            return limit
        self._resend(seq, limit)
        return 0

    def _recovery_probe(self) -> None:
        """In recovery, no ACK for 2*SRTT after a retransmission: it was lost again.

        Our extension of RFC 8985: RACK (§6.2) deems a retransmission lost once a
        segment sent after it is delivered and RACK.rtt + reo_wnd has passed; when
        nothing was sent after it (cwnd - pipe < 1 SMSS after a small flight), no
        such segment exists and only the RTO (200 ms or more, cwnd to one segment)
        would notice.  Here the PTO stands in for that evidence: the oldest
        retransmission still unacknowledged is resent once per ACK of new data.
        """
        snd = self.snd
        una = snd.snd_una
        rack = self.rack
        if rack is None:
            return  # no retransmission was ever logged
        for r in list(rack.rtx):
            start, end = rack.seq(r.start), rack.seq(r.end)
            if seq_le(end, una):
                continue
            s, e = self._unsacked_from(seq_max(start, una))
            if seq_ge(s, end):
                continue
            e = seq_min(seq_min(e, end), seq_min(seq_add(s, snd.send_mss), seq_add(una, max(1, snd.snd_wnd))))
            if seq_ge(s, e):
                return
            self.tlp.sent += 1
            snd.stats.loss_probes += 1
            rack.rtx.remove(r)  # the probe is its newest transmission (logged by on_send)
            self._resend(s, seq_sub(e, s))
            return

    def arm_loss_probe(self, now: float, sends: bool) -> None:
        self.tlp.arm(now, sends, self.state is OPEN)


def _dsack(seg: TcpSegment) -> bool:
    """RFC 2883 §4: the first block reports a duplicate (below SEG.ACK, or inside the second)."""
    blocks = seg.options.sack_blocks
    return seq_le(blocks[0][1], seg.ack) or (len(blocks) > 1 and seq_le(blocks[1][0], blocks[0][0])
                                             and seq_le(blocks[0][1], blocks[1][1]))
