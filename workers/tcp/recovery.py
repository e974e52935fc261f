"""Loss recovery (gVisor ``sack_recovery.go`` / ``reno_recovery.go``): what to resend, how much.

Contract: the recovery state is one :class:`RecoveryState`; the connection
reports every acceptable ACK (:meth:`Recovery.on_ack`), the retransmission
timeout (:meth:`on_rto`), the loss-probe timer (:meth:`on_loss_probe`) and the
RACK reorder timer (:meth:`on_reorder_timer`), and before new data goes out asks
:meth:`output` to retransmit what is lost and return the right edge up to which
the sender may send new data.  Sequence variables stay in the connection; the
SACK scoreboard and the RACK sent-segment log (:mod:`rack`) live here, each built
when first needed -- the scoreboard at the first SACK block, RACK at a SACK
connection's first transmission (or first SACK block) -- so a connection that never
sees either never pays for them; until then ``None`` reads as an empty one.

With SACK, RFC 8985 RACK is the loss detector: data is lost once something sent
after it was delivered and RACK.rtt + reo_wnd has passed (a lost retransmission
too, and the data before a delivered tail loss probe); when RACK marks SND.UNA's
data lost, fast recovery starts.  Repair follows RFC 6675: pipe, NextSeg() rules
1, 2 and 4, every lost hole the budget allows in TSO-sized chunks; how much may
be sent per ACK in fast recovery is RFC 6937 Proportional Rate Reduction
(PRR-SSRB).  After a timeout the same loop resends what is not SACKed up to the
recovery point, by cwnd (RFC 6675 §5.1, state RTO_RECOVERY).  Outside recovery
SACKed bytes count as gone, so new data keeps flowing (RFC 3042 generalized).
RFC 8985 §7 tail loss probes: new data, else the last segment, 2*SRTT after the
last send or ACK.  Without SACK: NewReno (RFC 6582) with limited transmit (RFC
3042), and go-back-N after a timeout from ``rtx_nxt`` (the BSD ``snd_nxt``
rewind, without breaking the RFC's ACK acceptability test).  Our deviations, each
commented where it is made: up to two probes per ACK and probes in recovery too;
cwnd and the PRR budget are used in whole segments; a timestamp echo is an RTT
sample even for retransmitted data unless it predates the last timeout.
"""

from __future__ import annotations

import enum
import math
from typing import TYPE_CHECKING

from pipeline.wire.seqnum import seq_add, seq_ge, seq_gt, seq_le, seq_lt, seq_max, seq_min, seq_sub
from pipeline.wire.tcp import TcpSegment
from workers.tcp.rack import Rack
from workers.tcp.scoreboard import SackScoreboard
from workers.tcp.timers import Timer

if TYPE_CHECKING:
    from workers.tcp.connection import Connection

DUP_ACK_THRESHOLD = 3        # RFC 5681 §3.2
WC_DEL_ACK_T = 0.2           # RFC 8985 §7.2 WCDelAckT: worst-case delayed ACK of the peer
MAX_LOSS_PROBES = 2          # probes per ACK of new data before the RTO has to act
PTO_SLACK = 0.002            # added to 2*SRTT for the loss probe timeout (Linux: TCP_TIMEOUT_MIN, 2 ms)


class RecoveryState(enum.Enum):
    OPEN = "open"                    # no loss being repaired (go-back-N after an RTO without SACK too)
    NEWRENO_RECOVERY = "newreno"     # RFC 6582 fast recovery (no SACK)
    SACK_RECOVERY = "sack"           # RFC 6675 §5 fast recovery
    RTO_RECOVERY = "rto"             # RFC 6675 §5.1: after a timeout, with SACK


_OPEN = RecoveryState.OPEN
_NEWRENO = RecoveryState.NEWRENO_RECOVERY
_SACK = RecoveryState.SACK_RECOVERY
_RTO = RecoveryState.RTO_RECOVERY


class Recovery:
    """Recovery state, SACK scoreboard, retransmission log and tail loss probes."""

    __slots__ = ("c", "state", "scoreboard", "rack", "recover", "dupacks", "high_rxt", "rescue_done", "relost",
                 "rtx_nxt", "tlp_out", "tlp_end", "tlp_rearm", "prr_delivered", "prr_out", "recover_fs", "budget",
                 "_sacked_prev")

    def __init__(self, conn: Connection, iss: int) -> None:
        self.c = conn
        self.state = _OPEN
        # Built when first needed (need_scoreboard, need_rack): most connections never see a
        # SACK block, and one that sends nothing never needs RACK; None reads as empty.
        self.scoreboard: SackScoreboard | None = None
        self.rack: Rack | None = None  # RFC 8985 state and the sent-segment log (SACK connections)
        self.recover = iss  # RFC 6582 recover / RFC 6675 RecoveryPoint
        self.dupacks = 0
        self.high_rxt = iss  # RFC 6675 HighRxt: end of the highest retransmission
        self.rescue_done = False  # RFC 6675 §4 NextSeg rule 4, once per recovery
        self.relost: list[tuple[int, int]] = []  # retransmissions RACK found lost again
        self.rtx_nxt: int | None = None  # go-back-N point after a timeout without SACK
        # RFC 8985 §7 tail loss probe (with SACK only): up to MAX_LOSS_PROBES per ACK of new data.
        self.tlp_out = 0  # probes sent since new data was last acknowledged
        self.tlp_end: int | None = None  # end of a retransmitted probe awaiting its verdict
        self.tlp_rearm = False  # new data sent or acknowledged: (re)start the PTO
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
            rack = self.rack = Rack(self.c.snd_una)
        return rack

    @property
    def in_fast_recovery(self) -> bool:
        return self.state is _SACK or self.state is _NEWRENO

    @property
    def in_loss_recovery(self) -> bool:
        return self.state is not _OPEN

    def end(self) -> None:
        rack = self.rack
        if rack is not None:  # SACK recovery is entered only by RACK: it exists then
            if self.state is _SACK:
                rack.on_recovery_exit()
            rack.forget_retransmissions()
        self.state = _OPEN
        self.dupacks = 0
        self.relost.clear()

    def on_send(self, seq: int, end: int, now: float, rtx: bool) -> None:
        """Every transmission (the sender's): RACK's log, and PRR's prr_out."""
        if not self.c.options.sack:
            return
        rack = self.rack
        if rack is None:
            rack = self.need_rack()
        rack.on_send(seq, end, now, rtx)
        if self.state is _SACK:
            n = seq_sub(end, seq)
            self.prr_out += n
            self.budget -= n

    # == ACK processing ==============================================================

    def on_new_ack(self) -> None:
        """SND.UNA moved: RFC 8985 §7.2, the probes start over and the PTO is rearmed."""
        self.tlp_out = 0
        self.tlp_rearm = True

    def advance(self, ack: int) -> None:
        if self.rtx_nxt is not None and seq_lt(self.rtx_nxt, ack):
            self.rtx_nxt = ack
        sb = self.scoreboard
        if sb is not None:
            sb.advance(ack)
        rack = self.rack
        if rack is not None:
            rack.advance(ack)

    def on_ack(self, seg: TcpSegment, old_una: int, acked: int, dup: bool, now: float) -> None:
        """An acceptable ACK after SND.UNA and the window were updated."""
        c = self.c
        sack = c.options.sack
        blocks = seg.options.sack_blocks if sack else ()
        sb = self.scoreboard
        if sack:
            if blocks:
                sb = self.need_scoreboard()
                sb.update(blocks, c.snd_una, c.snd_nxt)
                if self._dsack(seg):
                    self.need_rack().on_dsack(c.snd_una, c.snd_nxt)
            if acked > 0 or blocks:
                ts = seg.options.timestamp if c.options.timestamps else None
                self.need_rack().on_ack(c.snd_una, old_una, blocks, sb, ts[1] if ts else None, now)
        if self.tlp_end is not None:
            self._tlp_verdict(seg, now)
        if acked > 0:
            self._on_acked(acked, now)
        elif dup:
            self._on_dup_ack(now)
        if sack:
            delivered = max(0, acked) + (sb.sacked_bytes if sb is not None else 0) - self._sacked_prev
            self._detect(now)
            if self.state is _SACK:
                self._prr(delivered)
            self._sacked_prev = sb.sacked_bytes if sb is not None else 0

    def _dsack(self, seg: TcpSegment) -> bool:
        """RFC 2883 §4: the first block reports a duplicate (below SEG.ACK, or inside the second)."""
        blocks = seg.options.sack_blocks
        return seq_le(blocks[0][1], seg.ack) or (len(blocks) > 1 and seq_le(blocks[1][0], blocks[0][0])
                                                 and seq_le(blocks[0][1], blocks[1][1]))

    def _detect(self, now: float) -> None:
        """RFC 8985 §6.2 step 5, and fast recovery when SND.UNA's data is found lost."""
        c = self.c
        rack = self.rack
        if rack is None:  # nothing sent yet: nothing to find lost
            c.timers.cancel(Timer.REORDER)
            return
        sb = self.scoreboard
        sacked = sb.sacked_bytes if sb is not None else 0
        reo_wnd = rack.reo_wnd(self.state is not _OPEN, sacked, c.send_mss, c.sender.rtt.srtt)
        relost, deadline = rack.detect(sb, reo_wnd, now)
        if relost:
            c.lost_retransmissions += len(relost)
            self.relost.extend(relost)
            una = c.snd_una
            self.relost.sort(key=lambda r: seq_sub(r[0], una))  # in sequence order from SND.UNA, across a wrap
        if deadline is None:
            c.timers.cancel(Timer.REORDER)
        else:
            c.timers.arm(Timer.REORDER, max(deadline, now))
        lost = rack.lost_below()
        if (self.state is _OPEN and lost is not None and seq_gt(lost, c.snd_una)
                and seq_ge(c.snd_una, self.recover) and not (sb is not None and sb.is_sacked(c.snd_una))):
            self._enter(now)

    def on_reorder_timer(self, now: float) -> None:
        """RFC 8985 §6.2 step 5: the reorder window of a segment has passed; look again."""
        if self.c.snd_una != self.c.snd_nxt and self.c.sends():
            self._detect(now)

    def _prr(self, delivered: int) -> None:
        """RFC 6937 §3.1 on each ACK in fast recovery: sndcnt, as PRR-SSRB."""
        c = self.c
        cc = c.sender.cc
        self.prr_delivered += delivered
        pipe = self._pipe(self._lost_edge())
        ssthresh = cc.ssthresh
        if pipe > ssthresh:
            # Proportional part: sndcnt = CEIL(prr_delivered * ssthresh / RecoverFS) - prr_out.
            sndcnt = math.ceil(self.prr_delivered * ssthresh / max(1, self.recover_fs)) - self.prr_out
        else:
            # Slow start reduction bound: catch up to ssthresh, at most one SMSS beyond what was delivered.
            limit = max(self.prr_delivered - self.prr_out, delivered) + c.send_mss
            sndcnt = min(ssthresh - pipe, limit)
        self.budget = max(sndcnt, 0)
        cc.cwnd = pipe + self.budget  # RFC 6937: cwnd = pipe + sndcnt

    def _on_acked(self, acked: int, now: float) -> None:
        """New data acknowledged: grow cwnd, or NewReno partial/full ACK (RFC 6582 §3.2)."""
        c = self.c
        cc = c.sender.cc
        if self.state is _RTO and seq_ge(c.snd_una, self.recover):
            self.end()  # RFC 6675 §5.1: the timeout's recovery is over
        if not self.in_fast_recovery:
            self.dupacks = 0
            cc.on_ack(acked, now, c.sender.rtt.srtt)  # slow start after a timeout too
            return
        if seq_ge(c.snd_una, self.recover):
            # step 3, full acknowledgment: deflate to ssthresh and leave fast recovery
            # (RFC 6675 §5 step (A): recovery ends when HighACK >= RecoveryPoint).
            self.end()
            cc.on_recovery_exit(now)
            return
        if self.state is _SACK:
            return  # RFC 6675 §5: no window change; output() sends by pipe
        # step 5, partial acknowledgment: retransmit the next hole, deflate by the
        # amount acknowledged, add back one SMSS if that was at least one SMSS.
        mss = c.send_mss
        cc.cwnd = max(mss, cc.cwnd - acked + (mss if acked >= mss else 0))
        self._retransmit_hole(now)

    def _on_dup_ack(self, now: float) -> None:
        """RFC 5681 §3.2 / RFC 6582 §3.2 steps 1, 2 and 4."""
        c = self.c
        c.dup_acks += 1
        self.dupacks += 1
        if self.in_fast_recovery:
            if self.state is _NEWRENO:
                c.sender.cc.cwnd += c.send_mss  # step 4: inflate by one SMSS per duplicate ACK
            return  # with SACK, RFC 6675 counts pipe instead of inflating
        # step 2: only if the ACK covers more than recover (no second reduction per window).
        if c.options.sack:
            return  # RACK (RFC 8985) decides; a duplicate ACK carries SACK blocks for it
        if self.dupacks == DUP_ACK_THRESHOLD and seq_gt(c.snd_una, self.recover):
            self._enter(now)

    def _enter(self, now: float) -> None:
        """Fast retransmit and enter fast recovery (RFC 6582 §3.2 step 2)."""
        c = self.c
        cc = c.sender.cc
        c.fast_retransmits += 1
        self.recover = c.snd_nxt
        cc.on_loss(seq_sub(c.snd_nxt, c.snd_una), now)
        if c.options.sack:
            # RFC 6675 §5 steps (4.1)-(4.3): RecoveryPoint = HighData, retransmit the
            # first segment now; (4.4) the rest as PRR allows in output().  RFC 6937:
            # RecoverFS = snd.nxt - snd.una, nothing delivered or sent yet.
            self.state = _SACK
            self.rescue_done = False
            self.relost.clear()
            self.prr_delivered = self.prr_out = self.budget = 0
            self.recover_fs = seq_sub(c.snd_nxt, c.snd_una)
            used = c.sender.send_range(c.snd_una, min(seq_sub(c.snd_nxt, c.snd_una), c.send_mss), now, rtx=True)
            self.high_rxt = seq_add(c.snd_una, used)
            self.tlp_rearm = True
            return
        self.state = _NEWRENO
        cc.cwnd = cc.ssthresh + DUP_ACK_THRESHOLD * c.send_mss
        self._retransmit_hole(now)

    def _retransmit_hole(self, now: float) -> None:
        """NewReno (no SACK): retransmit the first unacknowledged segment (RFC 6582 §3.2 steps 2, 5)."""
        c = self.c
        start = c.snd_una
        end = c.snd_nxt
        if seq_ge(start, end):
            return
        # One segment (RFC 5681 §3.2 step 3), however large segments may otherwise be.
        c.sender.send_range(start, min(seq_sub(end, start), c.send_mss), now, rtx=True)

    # == timeout =====================================================================

    def on_rto(self, now: float) -> None:
        """RFC 6298 §5.4 for data: resend the first segment; the rest by pipe or go-back-N."""
        c = self.c
        snd = c.sender
        if c.snd_wnd > 0:
            # RFC 5681 §3.1: loss window; RFC 6582 §4: recover = highest sent, leave recovery.
            snd.cc.on_rto(seq_sub(c.snd_nxt, c.snd_una), now)
            self.recover = c.snd_nxt
            self.end()
        snd.rtt.backoff()  # RFC 6298 §5.5
        # §5.4: retransmit the earliest unacknowledged segment now (even into a zero
        # window: then it is the probe of RFC 9293 §3.8.6.1), the rest goes back-N.
        limit = min(seq_sub(c.snd_nxt, c.snd_una), c.send_mss) if c.snd_wnd > 0 else 1
        self.tlp_end = None
        c.timers.cancel(Timer.LOSS_PROBE)
        used = snd.send_range(c.snd_una, limit, now, rtx=True)
        snd.rto_rtx_end = seq_add(c.snd_una, used)
        if snd.retries > 1:
            # The same segment timed out again: the receiver may have reneged on what it
            # SACKed (RFC 2018 §8), so stop skipping that data (RFC 6675 §5.1).
            self.scoreboard = None
            self._sacked_prev = 0
        if c.snd_wnd == 0:
            c.zero_window_probes += 1
            self.probe_sent()
        elif c.options.sack:
            # RFC 6675 §5.1: resend what is not SACKed up to the recovery point, by
            # pipe, and do not enter fast recovery again before it is acknowledged.
            self.state = _RTO
            self.high_rxt = seq_add(c.snd_una, used)
            self.tlp_out = 0
            self.tlp_rearm = True
        else:
            self.rtx_nxt = seq_add(c.snd_una, used)

    def probe_sent(self) -> None:
        """A probe went into a zero window (RFC 9293 §3.8.6.1): resend from SND.UNA when it opens.

        The closed window drops the probe's octet; sending on from after it would
        open the reopened window with a hole, and the duplicate ACKs would end in a
        needless fast recovery.  BSD pulls snd_nxt back to snd_una for this reason.
        """
        self.rtx_nxt = self.c.snd_una

    # == output ======================================================================

    def output(self, now: float) -> int | None:
        """Retransmit what is due; return the right edge for new data (None: send none)."""
        c = self.c
        cc = c.sender.cc
        if self.state is _SACK or self.state is _RTO:
            # 1. RFC 6675 §5 (C): lost segments while cwnd - pipe allows (in whole
            # segments), then new data in what is left (NextSeg rule 2), within rwnd.
            room = self._sack_recovery_output(now)
            if self.state is _SACK:
                room = self.budget  # RFC 6937: what PRR still allows after the retransmissions
            edge = seq_add(c.snd_nxt, max(room, c.send_mss) if room > 0 else 0)
            wnd_edge = seq_add(c.snd_una, c.snd_wnd)
            if seq_gt(edge, wnd_edge):
                edge = wnd_edge
        else:
            edge = seq_add(c.snd_una, min(c.snd_wnd, cc.cwnd))  # RFC 5681 §3.1: min(cwnd, rwnd)
            sb = self.scoreboard
            sacked = sb.sacked_bytes if sb is not None else 0
            if sacked and c.options.sack:
                # SACKed data has left the network (RFC 6675 §4 pipe): a segment goes
                # out for each one, as RFC 3042 limited transmit does for the first
                # two duplicate ACKs; the new data brings the ACKs that reveal a loss.
                edge = seq_add(c.snd_una, min(c.snd_wnd, cc.cwnd + sacked))
            elif self.dupacks and self.state is _OPEN:
                # RFC 3042 §2 limited transmit: new data on the first two duplicate
                # ACKs, up to cwnd + 2*SMSS outstanding.
                extra = min(self.dupacks, 2) * c.send_mss
                edge = seq_add(c.snd_una, min(c.snd_wnd, cc.cwnd + extra))
        # 2. Without SACK, after an RTO, resend from snd_una (go-back-N).
        sb = self.scoreboard
        while self.rtx_nxt is not None:
            start = self.rtx_nxt
            if seq_ge(start, c.snd_nxt):
                self.rtx_nxt = None
                break
            start, end = self._unsacked_from(start)
            if seq_ge(start, end):
                self.rtx_nxt = None
                break
            # In flight: what lies below start and was not SACKed (RFC 6675 §2 "pipe").
            sacked_below = (sb.sacked_bytes - sb.sacked_above(seq_add(start, -1))
                            if sb is not None and sb.sacked_bytes else 0)
            room = min(cc.cwnd - (seq_sub(start, c.snd_una) - sacked_below),
                       seq_sub(seq_add(c.snd_una, c.snd_wnd), start))
            if room <= 0:
                self.rtx_nxt = start
                return None
            used = c.sender.send_range(start, min(seq_sub(end, start), room), now, rtx=True)
            if used == 0:
                self.rtx_nxt = None
                break
            self.rtx_nxt = seq_add(start, used)
        return edge

    def _lost_edge(self) -> int | None:
        """Un-SACKed data below this sequence number is deemed lost (RFC 8985 §6.2 via RACK)."""
        c = self.c
        rack = self.rack
        lost = rack.lost_below() if rack is not None else None
        if self.state is _RTO:
            # RFC 6675 §5.1: after a timeout everything outstanding up to the
            # recovery point and not SACKed is presumed lost (go-back-N skipping SACKed).
            lost = self.recover if lost is None else seq_max(lost, self.recover)
        if lost is not None and seq_gt(lost, c.snd_nxt):
            lost = c.snd_nxt
        return lost

    def _pipe(self, lost: int | None) -> int:
        """RFC 6675 §4 SetPipe(): bytes presumed in flight, in O(SACK ranges)."""
        # Each un-SACKed byte counts once if not IsLost, and once more if it was
        # retransmitted (below HighRxt); retransmissions found lost again count nothing.
        c = self.c
        una = c.snd_una
        sb = self.scoreboard
        pipe = seq_sub(c.snd_nxt, una) - (sb.sacked_bytes if sb is not None else 0)
        if lost is not None and seq_gt(lost, una):
            pipe -= seq_sub(lost, una) - (sb.sacked_below(lost) if sb is not None else 0)
        high = self.high_rxt
        if seq_gt(high, una):
            pipe += seq_sub(high, una) - (sb.sacked_below(high) if sb is not None else 0)
        for start, end in self.relost:
            pipe -= max(0, seq_sub(end, seq_max(start, una)))
        return max(0, pipe)

    def _resend(self, s: int, e: int, room: int, wnd_edge: int, now: float) -> int:
        """Retransmit [s, e) as far as room (at least one SMSS) and the peer's window allow."""
        c = self.c
        used = c.sender.send_range(s, min(seq_sub(e, s), max(c.send_mss, room), seq_sub(wnd_edge, s)), now, rtx=True)
        if used:
            self.tlp_rearm = True
        return used

    def _sack_recovery_output(self, now: float) -> int:
        """RFC 6675 §5 step (C) for retransmissions; returns cwnd - pipe left for new data.

        The loop runs while cwnd - pipe > 0 rather than >= 1 SMSS: cwnd is counted in
        whole segments, as Linux counts packets, so ssthresh = 2.5 SMSS after a small
        flight does not leave a lost retransmission waiting for the RTO.
        """
        c = self.c
        mss = c.send_mss
        una = c.snd_una
        wnd_edge = seq_add(una, c.snd_wnd)
        lost = self._lost_edge()
        pipe = self._pipe(lost)
        # Fast recovery sends what PRR allows (RFC 6937), after a timeout what cwnd allows.
        cwnd = pipe + self.budget if self.state is _SACK else c.sender.cc.cwnd
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
            used = self._resend(s, e, cwnd - pipe, wnd_edge, now)
            if not used:
                relost.pop(0)
                continue
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
            used = self._resend(s, e, cwnd - pipe, wnd_edge, now)
            if not used:
                break
            self.high_rxt = seq_add(s, used)
            pipe += used
        # NextSeg rule 4 (rescue retransmission): nothing new to send in fast
        # recovery, so once per recovery resend the highest outstanding segment;
        # a lost tail then needs no timeout.
        if (self.state is _SACK and not self.rescue_done and cwnd - pipe > 0
                and not c.sender.has_unsent() and relost == []):
            sb = self.scoreboard
            top = sb.highest_sacked if sb is not None else None
            start = seq_max(seq_max(self.high_rxt, una), seq_add(c.snd_nxt, -mss))
            if (top is None or seq_lt(top, c.snd_nxt)) and seq_lt(start, c.snd_nxt) and seq_lt(start, wnd_edge):
                self.rescue_done = True
                used = c.sender.send_range(start, seq_sub(c.snd_nxt, start), now, rtx=True)
                pipe += used
        return cwnd - pipe

    def _unsacked_from(self, start: int) -> tuple[int, int]:
        """The first range at or after start not SACKed by the peer, up to snd_nxt."""
        c = self.c
        sb = self.scoreboard
        if sb is not None and sb.sacked_bytes and c.options.sack:
            hole = sb.next_hole(start, c.snd_nxt)
            if hole is not None:
                return seq_max(hole[0], start), hole[1]
            top = sb.highest_sacked
            if top is not None and seq_lt(start, top):
                start = top
        return start, c.snd_nxt

    # == loss detection beyond DupThresh =============================================

    def _tlp_verdict(self, seg: TcpSegment, now: float) -> None:
        """RFC 8985 §7.4: did the retransmitted probe repair a loss?"""
        c = self.c
        assert self.tlp_end is not None
        if seg.options.sack_blocks and self._dsack(seg):
            self.tlp_end = None  # a D-SACK (RFC 2883 §4): the probe was a duplicate, nothing was lost
        elif seq_ge(c.snd_una, self.tlp_end):
            # §7.4.2: the probe alone repaired a loss -- respond to congestion as for
            # a fast retransmit, without entering recovery.
            self.tlp_end = None
            if self.state is _OPEN:
                c.sender.cc.on_loss(seq_sub(c.snd_nxt, c.snd_una), now)

    # == tail loss probe =============================================================

    def on_loss_probe(self, now: float) -> None:
        """RFC 8985 §7.3: the PTO expired; send one probe to elicit an ACK."""
        c = self.c
        if c.snd_una == c.snd_nxt or not c.sends() or self.tlp_out >= MAX_LOSS_PROBES or c.snd_wnd == 0:
            return  # a zero window is the persist timer's (RFC 9293 §3.8.6.1)
        if self.state is not _OPEN:
            self._recovery_probe(now)
            return
        snd = c.sender
        self.tlp_out += 1
        self.tlp_rearm = True
        c.loss_probes += 1
        una = c.snd_una
        unsent = seq_sub(snd.data_end(), c.snd_nxt)
        room = seq_sub(seq_add(una, c.snd_wnd), c.snd_nxt)
        if unsent > 0 and room > 0:
            # New data if the peer's window allows (cwnd does not limit a probe).
            start = c.snd_nxt
            used = snd.send_range(start, min(unsent, room, c.send_mss), now, rtx=False)
            c.snd_nxt = seq_add(c.snd_nxt, used)
        else:
            # Else the last segment sent, up to SMSS.
            start = seq_max(una, seq_add(c.snd_nxt, -c.send_mss))
            snd.send_range(start, seq_sub(c.snd_nxt, start), now, rtx=True)
            self.tlp_end = c.snd_nxt
        snd.rto_restart(now)  # §7.3: rearm the RTO

    def _recovery_probe(self, now: float) -> None:
        """In recovery, no ACK for 2*SRTT after a retransmission: it was lost again.

        Our extension of RFC 8985: RACK (§6.2) deems a retransmission lost once a
        segment sent after it is delivered and RACK.rtt + reo_wnd has passed; when
        nothing was sent after it (cwnd - pipe < 1 SMSS after a small flight), no
        such segment exists and only the RTO (200 ms or more, cwnd to one segment)
        would notice.  Here the PTO stands in for that evidence: the oldest
        retransmission still unacknowledged is resent once per ACK of new data.
        """
        c = self.c
        una = c.snd_una
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
            e = seq_min(seq_min(e, end), seq_min(seq_add(s, c.send_mss), seq_add(una, max(1, c.snd_wnd))))
            if seq_ge(s, e):
                return
            self.tlp_out += 1
            self.tlp_rearm = True
            c.loss_probes += 1
            rack.rtx.remove(r)  # the probe is its newest transmission (logged by on_send)
            c.sender.send_range(s, seq_sub(e, s), now, rtx=True)
            c.sender.rto_restart(now)  # RFC 8985 §7.3
            return

    def arm_loss_probe(self, now: float) -> None:
        """RFC 8985 §7.2: PTO = 2*SRTT, plus WCDelAckT for a single outstanding segment."""
        c = self.c
        srtt = c.sender.rtt.srtt
        timers = c.timers
        if (not c.options.sack or srtt is None or self.tlp_out >= MAX_LOSS_PROBES or c.snd_wnd == 0
                or c.snd_una == c.snd_nxt or not c.sends()):
            timers.cancel(Timer.LOSS_PROBE)
            return
        pto = 2 * srtt
        if seq_sub(c.snd_nxt, c.snd_una) <= c.send_mss and self.state is _OPEN:
            pto = max(pto, 1.5 * srtt + WC_DEL_ACK_T)
        else:
            pto += PTO_SLACK  # timer granularity and ACK processing on a sub-millisecond path
        # Our extension: RFC 8985 §7 sends one probe per episode; a second one, after
        # twice the PTO, saves a 200 ms RTO when the probe itself is lost (5 % loss on
        # a sub-millisecond path makes that common).  The RTO still bounds them.
        deadline = now + pto * (1 << self.tlp_out)
        rto = timers.deadline(Timer.RETRANSMIT)
        if rto is not None and rto <= deadline:
            timers.cancel(Timer.LOSS_PROBE)  # §7.2: the RTO comes first anyway
            return
        timers.arm(Timer.LOSS_PROBE, deadline)
