"""RACK (RFC 8985 §6): time-based loss detection from per-transmission send times.

Contract: the SACK recovery (``sack_recovery.py``) owns it, logs every
transmission the sender reports (:meth:`Rack.on_send`: the range, ``now``, and
whether it was a retransmission), reports each ACK after the SACK scoreboard and
SND.UNA were updated (:meth:`on_ack`) and asks :meth:`detect` which data is lost
now and when to look again (the RACK reorder timer).  Only connections with SACK
use it, built at the first transmission (``SackRecovery.need_rack``), anchored
at SND.UNA then.

The sent-segment log has two parts.  First transmissions leave in sequence
order, so their send times never decrease with the sequence number: they are
three parallel lists (start, end, xmit time) searched by bisection.  A
retransmission is one record (start, end, xmit time, xmit count) in a short list
in send order.  The latest transmission of a byte is its last retransmission,
else its first.  Whether data is SACKed is the scoreboard's to say, so no flag is
copied here; "lost" is an edge: un-SACKed first transmissions below
``lost_edge`` are lost (RFC 8985 §6.2 step 5 marks them in send order, and
first transmissions are in sequence order), and a retransmission found lost is
handed back to the caller and dropped from the log.

Positions are unbounded ints anchored at SND.UNA (as in the scoreboard), so the
wrap at 2**32 needs no special case.  Times compare with a 1 µs tolerance: the
RFC's arithmetic is in microseconds, ours in float seconds.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from pipeline.wire.seqnum import seq_add, seq_lt, seq_sub
from workers.tcp.options import ts_clock
from workers.tcp.scoreboard import SackScoreboard

DUP_THRESH = 3            # RFC 8985 §6.2 step 4 (RFC 6675 DupThresh)
REO_WND_PERSIST = 16      # RFC 8985 §6.2 step 4: recoveries before reo_wnd_mult resets
TIME_EPS = 1e-6           # seconds: the RFC's microsecond granularity
_NEVER = float("-inf")    # RACK.xmit_ts before anything was delivered


class Retransmission:
    """One retransmission: [start, end) as positions, when, and the how-many-th transmission."""

    __slots__ = ("start", "end", "xmit_ts", "xmit_count")

    def __init__(self, start: int, end: int, xmit_ts: float, xmit_count: int) -> None:
        self.start = start
        self.end = end
        self.xmit_ts = xmit_ts
        self.xmit_count = xmit_count


class Rack:
    """RACK state (RFC 8985 §6.1) and the sent-segment log."""

    __slots__ = ("_anchor", "_anchor_abs", "_starts", "_ends", "_times", "rtx",
                 "xmit_ts", "end_seq", "rtt", "min_rtt", "reordering_seen", "reo_wnd_mult", "reo_wnd_persist",
                 "dsack_round", "lost_edge", "fack", "rxt_high")

    def __init__(self, snd_una: int) -> None:
        self._anchor = snd_una
        self._anchor_abs = 0
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._times: list[float] = []
        self.rtx: list[Retransmission] = []  # in send order
        # RFC 8985 §6.1: the most recently sent segment that was delivered.
        self.xmit_ts = _NEVER
        self.end_seq = -1  # a position
        self.rtt = 0.0
        self.min_rtt: float | None = None
        self.reordering_seen = False
        self.reo_wnd_mult = 1
        self.reo_wnd_persist = REO_WND_PERSIST
        self.dsack_round: int | None = None
        self.lost_edge: int | None = None  # un-SACKed first transmissions below this are lost
        self.fack = 0  # RFC 8985 §6.1 RACK.fack: the highest sequence delivered so far (a position)
        self.rxt_high = 0  # end of the highest retransmission ever (a position)

    # == coordinates =================================================================

    def pos(self, seq: int) -> int:
        return self._anchor_abs + seq_sub(seq, self._anchor)

    def seq(self, pos: int) -> int:
        return seq_add(self._anchor, pos - self._anchor_abs)

    def advance(self, snd_una: int) -> None:
        """SND.UNA moved: re-anchor, forget what is cumulatively acknowledged."""
        self._anchor_abs = self.pos(snd_una)
        self._anchor = snd_una
        una = self._anchor_abs
        n = bisect_right(self._ends, una)
        if n:
            del self._starts[:n]
            del self._ends[:n]
            del self._times[:n]
        if self.lost_edge is not None and self.lost_edge <= una:
            self.lost_edge = None

    # == transmissions ===============================================================

    def on_send(self, seq: int, end: int, now: float, rtx: bool) -> None:
        """Record a transmission of [seq, end)."""
        a = self.pos(seq)
        b = self.pos(end)
        if b <= a:
            return
        if not rtx:
            self._starts.append(a)
            self._ends.append(b)
            self._times.append(now)
            return
        if b > self.rxt_high:
            self.rxt_high = b
        count = 2
        for r in self.rtx:
            if r.start < b and a < r.end:
                count = max(count, r.xmit_count + 1)
        self.rtx.append(Retransmission(a, b, now, count))

    def forget_retransmissions(self) -> None:
        self.rtx.clear()

    def first_xmit(self, p: int) -> tuple[float, int] | None:
        """Send time and end position of the first transmission holding position p."""
        k = bisect_right(self._ends, p)
        if k < len(self._ends) and self._starts[k] <= p:
            return self._times[k], self._ends[k]
        return None

    # == ACK processing: RFC 8985 §6.2 steps 1-4 =====================================

    def _update(self, xmit_ts: float, end: int, now: float) -> None:
        """Step 2: a delivered segment; keep the most recently sent one."""
        rtt = now - xmit_ts
        self.rtt_sample(rtt)
        if xmit_ts > self.xmit_ts or (xmit_ts == self.xmit_ts and end > self.end_seq):
            self.xmit_ts = xmit_ts
            self.end_seq = end
            self.rtt = rtt

    def rtt_sample(self, rtt: float) -> None:
        if self.min_rtt is None or rtt < self.min_rtt:
            self.min_rtt = rtt

    def on_ack(self, una: int, old_una: int, blocks: tuple[tuple[int, int], ...], sb: SackScoreboard | None,
               tsecr: int | None, now: float) -> None:
        """Steps 1-3 for one ACK: which transmissions it delivered, and reordering
        (``sb``: the scoreboard, None while no SACK block has come)."""
        una_p = self.pos(una)
        old_p = self.pos(old_una)
        # Step 3: data below RACK.fack delivered, never retransmitted (nothing at or
        # above it was), arrived out of order.
        if una_p > old_p and old_p < self.fack and old_p >= self.rxt_high:
            self.reordering_seen = True
        # Retransmissions delivered (cumulatively or wholly SACKed).  Step 2: an
        # ambiguous one -- the echo predates it, or it came back faster than any
        # RTT -- says nothing about when it was sent.
        if self.rtx:  # none outside loss repair
            keep = []
            for r in self.rtx:
                if r.end <= una_p or (blocks and sb is not None and sb.covers(self.seq(r.start), self.seq(r.end))):
                    if tsecr is not None and seq_lt(tsecr, ts_clock(r.xmit_ts)):
                        continue
                    if self.min_rtt is not None and now - r.xmit_ts < self.min_rtt - TIME_EPS:
                        continue
                    self._update(r.xmit_ts, r.end, now)
                else:
                    keep.append(r)
            self.rtx = keep
        # First transmissions: the highest newly delivered byte was sent last.
        edges = [una_p] if una_p > old_p else []
        for _left, right in blocks:
            p = self.pos(right)
            if una_p < p:
                edges.append(p)
        for p in edges:
            first = self.first_xmit(p - 1)
            if first is not None and not self._retransmitted(p - 1):
                self._update(first[0], first[1], now)
        for p in edges:
            if p > self.fack:
                self.fack = p

    def _retransmitted(self, p: int) -> bool:
        for r in self.rtx:
            if r.start <= p < r.end:
                return True
        return False


    def on_dsack(self, snd_una: int, snd_nxt: int) -> None:
        """Step 4: a D-SACK widens the reordering window, once per round trip."""
        if self.dsack_round is not None and self.pos(snd_una) >= self.dsack_round:
            self.dsack_round = None
        if self.dsack_round is None:
            self.dsack_round = self.pos(snd_nxt)
            self.reo_wnd_mult += 1
            self.reo_wnd_persist = REO_WND_PERSIST

    def on_recovery_exit(self) -> None:
        """Step 4: after REO_WND_PERSIST recoveries without a D-SACK, back to one min_RTT/4."""
        self.reo_wnd_persist -= 1
        if self.reo_wnd_persist <= 0:
            self.reo_wnd_mult = 1

    def reo_wnd(self, in_recovery: bool, sacked_bytes: int, smss: int, srtt: float | None) -> float:
        """Step 4: RACK.reo_wnd; zero while no reordering was seen and loss is likely."""
        if not self.reordering_seen and (in_recovery or sacked_bytes >= DUP_THRESH * smss):
            return 0.0
        min_rtt = self.min_rtt or 0.0
        wnd = min_rtt / 4 * self.reo_wnd_mult
        return min(wnd, srtt) if srtt is not None else wnd

    # == RFC 8985 §6.2 step 5: detect losses ==========================================

    def detect(self, sb: SackScoreboard | None, reo_wnd: float,
               now: float) -> tuple[list[tuple[int, int]], float | None]:
        """Mark lost what was sent before the RACK segment and not delivered within
        RACK.rtt + reo_wnd.  Moves ``lost_edge``; returns retransmissions found lost
        (dropped from the log) and when to look again (the reorder timeout), or None.
        ``sb``: the scoreboard, None while no SACK block has come."""
        if self.xmit_ts == _NEVER or (not self._starts and not self.rtx):
            return [], None  # nothing delivered yet, or nothing outstanding: nothing to mark (the common ACK)
        limit = now - self.rtt - reo_wnd + TIME_EPS  # sent at or before this: lost
        deadline: float | None = None
        times, ends = self._times, self._ends
        # First transmissions sent before the RACK segment: a prefix in sequence order.
        k_rack = bisect_left(times, self.xmit_ts)
        k_rack = bisect_left(ends, self.end_seq, k_rack, bisect_right(times, self.xmit_ts))
        k_lost = min(bisect_right(times, limit), k_rack)
        if k_lost:
            edge = ends[k_lost - 1]
            if self.lost_edge is None or edge > self.lost_edge:
                self.lost_edge = edge
        # The first one not yet lost with a hole in it starts the reorder timer (the
        # scoreboard finds the hole, so SACKed segments cost nothing here).
        if k_lost < k_rack:
            hole = sb.next_hole(self.seq(self._starts[k_lost]), self.seq(ends[k_rack - 1])) if sb is not None else None
            if hole is None and (sb is None or not sb.sacked_bytes):
                hole = (self.seq(self._starts[k_lost]), self.seq(ends[k_rack - 1]))
            if hole is not None:
                k = bisect_right(ends, self.pos(hole[0]), k_lost, k_rack)
                if k < k_rack:
                    deadline = times[k] + self.rtt + reo_wnd
        relost: list[tuple[int, int]] = []
        keep = []
        for r in self.rtx:
            sent_before = r.xmit_ts < self.xmit_ts or (r.xmit_ts == self.xmit_ts and r.end < self.end_seq)
            if sent_before and r.xmit_ts <= limit:
                relost.append((self.seq(r.start), self.seq(r.end)))
                continue
            if sent_before:
                t = r.xmit_ts + self.rtt + reo_wnd
                deadline = t if deadline is None else min(deadline, t)
            keep.append(r)
        self.rtx = keep
        return relost, deadline

    def lost_below(self) -> int | None:
        return None if self.lost_edge is None else self.seq(self.lost_edge)
