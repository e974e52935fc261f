"""The sending half of a connection (gVisor ``snd.go``): sequence space, flight, timers, segments.

Contract: the sender owns what :class:`~workers.tcp.sendstate.SendState` holds
-- SND.UNA, SND.NXT, SND.WND, SND.WL1/WL2 (RFC 9293 §3.3.1), the send buffer
and our FIN's place after it, RTT (RFC 6298) and congestion state -- and the
retransmission, persist and (through recovery) loss-probe timers.  It is the
only writer of those variables, and it transmits every data or FIN segment,
through the connection's outbox (:meth:`_transmit`).  It owns the recovery
object (:mod:`recovery`: NewReno or SACK, chosen when the SYNs agree), reports
ACKs, timeouts and transmissions to it and sends what it decides (``due``).
New data goes out in :meth:`output` under sender SWS avoidance (RFC 9293
§3.8.6.2.1) and Nagle (§3.7.4), up to the right edge recovery allows from
cwnd, the peer's window and the recovery state.  The persist timer
(:meth:`on_persist`) probes a zero window and overrides SWS avoidance.

Timers are decided where their cause is known, once per step: the
retransmission timer runs from a transmission (RFC 6298 §5.1) and restarts on
an ACK of new data or stops when all is acknowledged (§5.2, §5.3), and on a
timeout (§5.6); the loss probe timer (RFC 8985 §7.2) is restarted at the end
of an ACK of new data, of a transmission of new data or of a repair; the
persist timer at the end of :meth:`output`.

ECN (RFC 3168 §6.1.2-§6.1.5): an ECE reduces cwnd once per window of data,
without a retransmission, and the next new data segment carries CWR; only new
data is sent ECT(0) (:meth:`ect`).
"""

from __future__ import annotations

from pipeline.wire.seqnum import seq_add, seq_gt, seq_le, seq_lt, seq_sub
from pipeline.wire.tcp import ECE, Flags, TcpSegment
from workers.tcp.config import TcpConfig
from workers.tcp.counters import Counters
from workers.tcp.options import TS_OPTION_SPACE, Negotiated, ts_clock
from workers.tcp.outbox import Outbox
from workers.tcp.recovery import Recovery
from workers.tcp.reno_recovery import RenoRecovery
from workers.tcp.rtt import RttEstimator
from workers.tcp.sack_recovery import SackRecovery
from workers.tcp.sendstate import SendState
from workers.tcp.timers import Timer, TimerTable

MAX_TS_RTT_MS = 600_000      # an echoed timestamp older than this is bogus, not an RTT
_ACK_PSH = Flags.ACK | Flags.PSH  # built once: each IntFlag | is a Python-level call


class Sender(SendState):
    """Send buffer, segmentation, Nagle/SWS, RTT estimation, the congestion window and recovery."""

    __slots__ = ("recovery", "send_blocked", "rtt_seq", "rtt_time", "rtx_ts", "rto_rtx_end", "retries",
                 "cwr_pending", "ecn_recover", "_ect_new", "_ect_batch")

    def __init__(self, config: TcpConfig, iss: int, timers: TimerTable, stats: Counters, out: Outbox,
                 rtt: RttEstimator) -> None:
        super().__init__(config, iss, timers, stats, out, rtt)
        self.recovery: Recovery = RenoRecovery(self)
        self.send_blocked = False
        self.rtt_seq: int | None = None  # the one timed segment (RFC 6298 §3)
        self.rtt_time = 0.0
        self.rtx_ts: list[tuple[int, int, int]] = []  # (start, end, TSval) of retransmissions, in time order
        self.rto_rtx_end = iss  # end of the last timeout's retransmission
        self.retries = 0
        self.cwr_pending = False  # RFC 3168 §6.1.2: CWR on the next new data segment
        self.ecn_recover = iss  # no second ECE reduction before snd_una passes this
        # New data queued since the last drain (to go out ECT(0)); None, not an empty set, while there is
        # none: most connections never have any, and two empty sets weigh 430 bytes.
        self._ect_new: set[int] | None = None
        self._ect_batch: set[int] | None = None  # the same, for the batch the shell took last

    def negotiated(self, options: Negotiated) -> None:
        """The SYNs agreed: the MSS and congestion controller, and SACK recovery or NewReno."""
        super().negotiated(options)
        self.recovery = SackRecovery(self) if options.sack else RenoRecovery(self)

    # == synchronization ==============================================================

    def open(self, now: float) -> None:
        """Our SYN (or SYN-ACK) goes out: SND.NXT = ISS + 1, timed (RFC 6298 §3), under the RTO."""
        self.snd_nxt = seq_add(self.iss, 1)
        self.start_rtt(self.iss, now)
        self._rto_restart(now)

    def init_window(self, wnd: int, seq: int, ack: int) -> None:
        """The peer's first window: SND.WND, SND.WL1 = SEG.SEQ, SND.WL2 = SEG.ACK (RFC 9293 §3.10.7.3)."""
        self.snd_wnd = wnd
        self.max_snd_wnd = max(self.max_snd_wnd, wnd)
        self.snd_wl1 = seq
        self.snd_wl2 = ack

    def cookie_acked(self, wnd: int, seq: int, ack: int) -> None:
        """A SYN-cookie's final ACK (RFC 4987 §3.6): our SYN-ACK is acknowledged, nothing else sent."""
        self.snd_una = self.snd_nxt = ack
        self.init_window(wnd, seq, ack)

    def established(self) -> None:
        self.retries = 0

    # == the application's side ======================================================

    def queue(self, data: bytes | bytearray | memoryview) -> int:
        """Take up to the free buffer space of data; return how much."""
        n = min(len(data), self.config.send_buffer - len(self.sndbuf))
        if n < len(data):
            self.send_blocked = True
        if n > 0:
            self.sndbuf.append(memoryview(data)[:n])
        return max(n, 0)

    def queue_fin(self) -> None:
        """close() or shutdown(): our FIN follows the data queued (RFC 9293 §3.10.4)."""
        self.fin_queued = True
        self.fin_seq = self.data_end()

    def unblocked(self, space: int) -> bool:
        """send() found the buffer full and ``space`` octets are free now, enough to say so (once)."""
        if self.send_blocked and space >= max(1, self.config.send_buffer // 2):
            self.send_blocked = False
            return True
        return False

    def clear(self) -> None:
        self.sndbuf.clear()

    # == output ======================================================================

    def output(self, now: float, sends: bool) -> None:
        """What recovery decides to resend, new data up to the edge it allows; then the
        persist timer: data held back (zero window, RFC 9293 §3.8.6.1, or sender SWS
        avoidance, §3.8.6.2.1) with nothing outstanding is probed after one RTO."""
        if sends:
            rec = self.recovery
            edge = rec.output(now)
            if rec.due:
                self._send_due(now)
            if edge is not None and self._output_new(edge, now):
                rec.arm_loss_probe(now, True)  # RFC 8985 §7.2: after transmitting new data
        timers = self.timers
        if self.snd_una == self.snd_nxt:
            timers.cancel(Timer.LOSS_PROBE)
            if sends and self.has_unsent():
                timers.arm_once(Timer.ZERO_WINDOW_PROBE, now + self.rtt.rto)
                return
        timers.cancel(Timer.ZERO_WINDOW_PROBE)

    def _output_new(self, edge: int, now: float) -> bool:
        """New data up to edge: sender SWS avoidance (RFC 9293 §3.8.6.2.1) and Nagle (§3.7.4)."""
        cfg = self.config
        sent = False
        while True:
            nxt = self.snd_nxt
            unsent = seq_sub(self.data_end(), nxt)
            fin_pending = self.fin_queued and seq_le(nxt, self.fin_seq)
            usable = seq_sub(edge, nxt)
            if unsent <= 0:
                # RFC 9293 §3.10.4: FIN once all data is segmentized; it needs one octet of window.
                if fin_pending and usable >= 1 and self.snd_wnd > 0:
                    self._transmit(nxt, 1, now, False)
                    self.snd_nxt = seq_add(nxt, 1)
                    return True
                return sent
            full = self.max_payload(0)
            n = min(unsent, usable, full)
            if n <= 0:
                return sent
            last = n == unsent
            if n >= min(self.send_mss, full):
                pass  # a full-sized segment
            elif last and fin_pending:
                pass  # the FIN goes with it: no reason to wait (Linux does the same)
            elif cfg.nagle and nxt != self.snd_una:
                return sent  # RFC 9293 §3.7.4 Nagle: no small segment while data is unacknowledged
            elif last:
                pass  # SWS (2): all pushed data fits
            elif self.max_snd_wnd and n >= self.max_snd_wnd // 2:
                pass  # SWS (3): at least Fs = 1/2 of the largest window the peer offered
            else:
                return sent
            limit = n + 1 if last and fin_pending and usable > n else n
            used = self._transmit(nxt, limit, now, False)
            if used == 0:
                return sent
            sent = True
            self.snd_nxt = seq_add(nxt, used)

    def _send_due(self, now: float) -> int:
        """Transmit what recovery decided to resend; the end of the last segment."""
        end = self.snd_una
        for seq, limit in self.recovery.due:
            end = seq_add(seq, self._transmit(seq, limit, now, True))
        return end

    def _transmit(self, seq: int, limit: int, now: float, rtx: bool) -> int:
        """Emit one segment of up to ``limit`` sequence octets at seq (data, then our FIN).

        Returns the sequence space used (``SendState.cut`` predicts it); the caller moves its own pointer.
        """
        options, option_len = self.out.rcv.segment_options(now)
        off = seq_sub(seq, self.buf_seq)
        avail = len(self.sndbuf) - off
        n = max(0, min(limit, avail, self.max_payload(option_len)))
        fin = self.fin_queued and limit > n and seq_add(seq, n) == self.fin_seq
        if n == 0 and not fin:
            return 0
        payload = self.sndbuf.read(off, n) if n else b""
        flags = _ACK_PSH if n and n == avail else Flags.ACK
        if fin:
            flags |= Flags.FIN
        stats = self.stats
        if rtx:
            stats.retransmissions += 1
            # RFC 6298 §3 (Karn): no sample across a retransmission -- not only of the
            # timed segment: its cumulative ACK also waits for the repaired hole below.
            self.rtt_seq = None
            if self.options.timestamps:
                self.rtx_ts.append((seq, seq_add(seq, n + fin), ts_clock(now)))
        else:
            stats.bytes_sent += n
            self.start_rtt(seq, now)
            if n and self.options.ecn:
                if self.cwr_pending:
                    self.cwr_pending = False
                    flags |= Flags.CWR  # RFC 3168 §6.1.2: on the first new data after the reduction
                if self._ect_new is None:
                    self._ect_new = set()
                self._ect_new.add(seq)
        self.out.send(seq, flags, payload, now, options)
        self.recovery.on_send(seq, seq_add(seq, n + fin), now, rtx)
        self.timers.arm_once(Timer.RETRANSMIT, now + self.rtt.rto)  # RFC 6298 §5.1
        return n + fin

    def ect(self, seg: TcpSegment) -> bool:
        """Send this segment ECT(0)?  New data only (RFC 3168 §6.1.4, §6.1.5)."""
        batch = self._ect_batch
        return batch is not None and bool(seg.payload) and not seg.syn and seg.seq in batch

    def drained(self) -> None:
        """The shell takes a batch: ect() now answers for it (and whatever was queued
        since the previous batch, by receive() or handle_timer() too)."""
        self._ect_batch = self._ect_new
        self._ect_new = None

    def _rto_restart(self, now: float) -> None:
        """RFC 6298 §5.3/§5.6 (and RFC 8985 §7.3): restart the timer to expire after the current RTO."""
        self.timers.arm(Timer.RETRANSMIT, now + self.rtt.rto)

    def start_rtt(self, seq: int, now: float) -> None:
        """Time one segment per RTT (RFC 6298 §3); the fallback when no timestamp echo is usable."""
        if self.rtt_seq is None:
            self.rtt_seq = seq
            self.rtt_time = now

    def lower_path_mss(self, mss: int, now: float, sends: bool) -> bool:
        """The path takes segments of at most mss payload octets (RFC 9293 §3.7.2; RFC 1191 §6.3, RFC 8201 §5).

        Never raised here (RFC 1191 §6.3: only a later probe may raise it; we
        do not probe).  What is in flight was cut for the old size and died on
        the way: recovery resends the first unacknowledged segment at once at
        the new size; the rest is resent as acknowledgments or the timer find it lost.
        """
        if mss >= self.max_segment():
            return False
        self.path_mss = mss
        self.send_mss = min(self.send_mss, mss - (TS_OPTION_SPACE if self.options.timestamps else 0))
        if self.snd_una != self.snd_nxt and sends:
            self.recovery.on_path_mtu()
            self._send_due(now)
        return True

    # == acknowledgments =============================================================

    def on_ack(self, seg: TcpSegment, wnd: int, fin: bool, now: float, sends: bool) -> bool:
        """RFC 9293 §3.10.7.4 fifth, after SYN-RECEIVED: False if SEG.ACK is not acceptable."""
        ack = seg.ack
        una = self.snd_una
        # RFC 5961 §5.2: acceptable iff SND.UNA - MAX.SND.WND <= SEG.ACK <= SND.NXT.
        if seq_gt(ack, self.snd_nxt) or seq_lt(ack, seq_add(una, -self.max_snd_wnd)):
            return False
        # RFC 5681 §2 duplicate ACK: outstanding data, no text, no SYN/FIN, same ACK and window.
        dup = (ack == una and una != self.snd_nxt and not seg.payload and not fin
               and wnd == self.snd_wnd and wnd > 0)
        self._update_window(seg.seq, ack, wnd)
        acked = 0
        advanced = seq_gt(ack, una)
        if advanced:
            acked = seq_sub(ack, una) - (una == self.iss)  # the SYN is no data
            self.ack_advance(seg, now)
        rec = self.recovery
        rec.on_ack(seg, una, acked, dup, now)
        repaired = bool(rec.due)
        if repaired:
            self._send_due(now)
        if self.options.ecn and int(seg.flags) & ECE:
            self.stats.ece_received += 1
            self._on_ece(now)  # RFC 3168 §6.1.2
        if advanced or repaired:
            rec.arm_loss_probe(now, sends)  # RFC 8985 §7.2
        return True

    def _update_window(self, seq: int, ack: int, wnd: int) -> None:
        """RFC 9293 §3.10.7.4: update the send window only from a newer segment (SND.WL1/WL2)."""
        if seq_le(self.snd_una, ack) and (seq_lt(self.snd_wl1, seq)
                                          or (self.snd_wl1 == seq and seq_le(self.snd_wl2, ack))):
            if wnd and self.snd_wnd == 0:
                self.timers.cancel(Timer.ZERO_WINDOW_PROBE)
            self.snd_wnd = wnd
            self.max_snd_wnd = max(self.max_snd_wnd, wnd)
            self.snd_wl1 = seq
            self.snd_wl2 = ack
        if self.snd_wnd == 0:
            self.retries = 0  # RFC 9293 §3.8.6.1: a peer answering probes is alive

    def ack_advance(self, seg: TcpSegment, now: float) -> None:
        """SND.UNA moves to SEG.ACK: free the acknowledged bytes, sample RTT, restart the timer."""
        ack = seg.ack
        old_una = self.snd_una
        self.stats.bytes_acked += seq_sub(ack, old_una)
        n = seq_sub(ack, self.buf_seq)
        if n > 0:
            n = min(n, len(self.sndbuf))
            self.sndbuf.release(n)
            self.buf_seq = seq_add(self.buf_seq, n)
        self.snd_una = ack
        self.retries = 0
        # RTT: from the timestamp echo (RFC 7323 §4.1), else the one timed segment (RFC 6298 §3).
        ts = seg.options.timestamp if self.options.timestamps else None
        timed = self.rtt_seq is not None and seq_gt(ack, self.rtt_seq)
        last_rtx_ts = None  # TSval of the latest retransmission of the data just acknowledged
        if self.rtx_ts:
            for start, end, tsval in self.rtx_ts:
                if seq_lt(start, ack) and seq_gt(end, old_una):
                    last_rtx_ts = tsval  # entries are in time order: the last match wins
            self.rtx_ts = [entry for entry in self.rtx_ts if seq_gt(entry[1], ack)]
        rtt = self.rtt
        if ts is not None and ts[1] != 0 and (ts_clock(now) - ts[1]) & 0xFFFFFFFF <= MAX_TS_RTT_MS:
            # RFC 7323 §4.1: an echo times the transmission it answers, retransmitted
            # or not -- except that an echo older than the latest retransmission of the
            # acknowledged data may answer a duplicate with an earlier TSval (RFC 7323
            # §4.3: our retransmission or probe was spurious, the ACK was lost): that
            # "RTT" includes the RTO or PTO, and SRTT would creep up.  Rejecting only
            # those keeps samples coming under loss, so RTO backoff collapses (RFC
            # 6298 §5.7 note) instead of compounding timeout after timeout.
            stale = last_rtx_ts is not None and seq_lt(ts[1], last_rtx_ts)
            if not stale:
                rtt.sample(((ts_clock(now) - ts[1]) & 0xFFFFFFFF) / 1000)
        elif timed:
            rtt.sample(max(0.0, now - self.rtt_time))
        if timed:
            self.rtt_seq = None
        if rtt.backoffs and seq_lt(old_una, self.rto_rtx_end) and seq_le(self.rto_rtx_end, ack) and self.snd_wnd > 0:
            # The timer's own retransmission was acknowledged: the path delivers within
            # the base RTO.  RFC 6298 §5.7's note collapses the backoff only with a new
            # RTT sample, which go-back-N without timestamps never yields (Karn: every
            # segment below SND.NXT was retransmitted); each further random loss then
            # doubled the RTO again -- 0.2 s became 25 s, a 30 s stall under 5 % loss.
            # Our choice: collapse here (the RTO is still at least min_rto).
            rtt.collapse()
        if old_una == self.iss and self.stats.timeouts:
            # Our SYN or SYN-ACK was lost.  RFC 6298 §5.7: without an RTT sample, start
            # data transfer with RTO = 3 s; RFC 5681 §3.1: with an initial window of 1 SMSS.
            if rtt.srtt is None:
                rtt.restart(max(3.0, self.config.initial_rto))
            self.cc.cwnd = self.send_mss
        self.recovery.advance(ack)
        # RFC 6298 §5.2/§5.3: stop the timer when all is acknowledged, else restart it.
        if ack == self.snd_nxt:
            self.timers.cancel(Timer.RETRANSMIT)
        else:
            self._rto_restart(now)

    def _on_ece(self, now: float) -> None:
        """RFC 3168 §6.1.2: ECN-Echo -- reduce cwnd as for a loss, at most once per window."""
        if seq_lt(self.snd_una, self.ecn_recover) or self.recovery.in_loss_recovery:
            return  # this window was reduced already (a loss reduces it too)
        self.ecn_recover = self.snd_nxt
        self.cc.on_loss(seq_sub(self.snd_nxt, self.snd_una), now)  # ssthresh per RFC 5681 eq. 4, cwnd = ssthresh
        self.cwr_pending = True

    # == timers ======================================================================

    def syn_retransmitted(self, now: float) -> None:
        """Our SYN or SYN-ACK goes out again: no RTT sample from it (Karn), nor from its first echo."""
        self.stats.retransmissions += 1
        self.rtt_seq = None
        self.rtx_ts.append((self.iss, seq_add(self.iss, 1), ts_clock(now)))

    def on_syn_rto(self, now: float) -> bool:
        """RFC 6298 §5.5-§5.6 for our SYN or SYN-ACK; True: the caller resends it, False: give up."""
        if self.retries >= self.config.max_syn_retries:
            return False
        self.retries += 1
        self.stats.timeouts += 1
        self.rtt.backoff()
        self.syn_retransmitted(now)
        self._rto_restart(now)
        return True

    def on_rto(self, now: float, sends: bool) -> bool:
        """RFC 6298 §5.4-§5.6 for data and FIN; False: give up (too many retries)."""
        if self.snd_una == self.snd_nxt or not sends:
            return True
        if self.retries >= self.config.max_retries:
            return False  # RFC 9293 §3.8.3 R2
        self.retries += 1
        self.stats.timeouts += 1
        self.rtt.backoff()  # RFC 6298 §5.5
        rec = self.recovery
        rec.on_rto(now, self.retries)
        self.rto_rtx_end = self._send_due(now)
        self._rto_restart(now)  # RFC 6298 §5.6
        rec.arm_loss_probe(now, True)
        return True

    def on_persist(self, now: float) -> None:
        """The persist timer: data waits, nothing is in flight to bring an ACK.

        Zero window: one octet of new data (RFC 9293 §3.8.6.1).  Small window:
        the sender SWS override timeout (RFC 9293 §3.8.6.2.1), send what fits, so
        a lost window update cannot stall the connection.
        """
        limit = max(1, min(self.snd_wnd, self.cc.cwnd))
        used = self._transmit(self.snd_nxt, limit, now, False)
        if not used:
            return
        self.snd_nxt = seq_add(self.snd_nxt, used)
        if self.snd_wnd == 0:
            self.recovery.probe_sent()
            # The octet is now outstanding: the retransmission timer repeats the
            # probe, backing off exponentially, until the window opens.
            self.rtt.backoff()
        self._rto_restart(now)
        self.recovery.arm_loss_probe(now, True)

    def on_loss_probe(self, now: float, sends: bool) -> None:
        """RFC 8985 §7.3: the PTO expired; send the probe recovery picks, rearm the RTO."""
        rec = self.recovery
        n = rec.on_loss_probe(now, sends)
        if n:
            self.snd_nxt = seq_add(self.snd_nxt, self._transmit(self.snd_nxt, n, now, False))
        elif rec.due:
            self._send_due(now)
        else:
            return
        self._rto_restart(now)
        rec.arm_loss_probe(now, sends)

    def on_reorder_timer(self, now: float, sends: bool) -> None:
        """RFC 8985 §6.2 step 5: RACK looks again; a loss found is repaired now."""
        rec = self.recovery
        rec.on_reorder_timer(now, sends)
        if rec.due:
            self._send_due(now)
            rec.arm_loss_probe(now, sends)
