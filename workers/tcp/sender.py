"""The sending half of a connection (gVisor ``snd.go``): send buffer, RTT, cwnd, new data.

Contract: the connection owns the send sequence variables of the TCB
(``iss``, ``snd_una``, ``snd_nxt``, ``snd_wnd``, ``snd_wl1/2``, ``max_snd_wnd``);
the sender reads them and moves ``snd_una`` on an acceptable ACK
(:meth:`ack_advance`).  It owns the send buffer (byte 0 has sequence
``buf_seq``) and our FIN's place after it, the RTT estimator and the congestion
controller, and cuts every data or FIN segment (:meth:`send_range`).  New data
goes out in :meth:`output_new` under sender SWS avoidance (RFC 9293 §3.8.6.2.1)
and Nagle (§3.7.4), up to a right edge that the recovery module computes from
cwnd, the peer's window and the recovery state.  The persist timer
(:meth:`on_persist`) probes a zero window and overrides SWS avoidance.

ECN (RFC 3168 §6.1.2-§6.1.5): an ECE reduces cwnd once per window of data,
without a retransmission, and the next new data segment carries CWR; only new
data is sent ECT(0) (:meth:`ect`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.wire.seqnum import seq_add, seq_gt, seq_le, seq_lt, seq_sub
from pipeline.wire.tcp import Flags, TcpSegment
from workers.tcp.congestion import make_congestion_control
from workers.tcp.events import SendSpace
from workers.tcp.options import TS_OPTION_SPACE
from workers.tcp.receiver import ts_clock
from workers.tcp.rtt import RttEstimator
from workers.tcp.sendbuf import SendBuffer
from workers.tcp.timers import Timer

if TYPE_CHECKING:
    from workers.tcp.connection import Connection

MAX_TS_RTT_MS = 600_000      # an echoed timestamp older than this is bogus, not an RTT
_ACK = Flags.ACK
_ACK_PSH = Flags.ACK | Flags.PSH
_FIN = Flags.FIN
_CWR = Flags.CWR
_F_ECE = 0x40


class Sender:
    """Send buffer, segmentation, Nagle/SWS, RTT estimation and the congestion window."""

    __slots__ = ("c", "sndbuf", "buf_seq", "fin_queued", "fin_seq", "send_blocked", "rtt", "cc", "rtt_seq",
                 "rtt_time", "rtx_ts", "rto_rtx_end", "retries", "cwr_pending", "ecn_recover", "_ect_new", "_ect_batch",
                 "path_mss")

    def __init__(self, conn: Connection, iss: int) -> None:
        cfg = conn.config
        self.c = conn
        self.sndbuf = SendBuffer()  # unacknowledged and unsent data; byte 0 has sequence buf_seq
        self.buf_seq = seq_add(iss, 1)
        self.fin_queued = False
        self.fin_seq = iss  # sequence number of our FIN once close() was called
        self.send_blocked = False
        self.rtt = RttEstimator(cfg.initial_rto, cfg.min_rto, cfg.max_rto)
        self.cc = make_congestion_control(cfg.congestion, conn.send_mss)
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
        self.path_mss: int | None = None  # segment size the path takes (PMTUD), if it said less than the MSS

    def negotiated(self) -> None:
        """The MSS is known: restart the congestion controller with it."""
        self.cc = make_congestion_control(self.c.config.congestion, self.c.send_mss)

    # == the application's side ======================================================

    def queue(self, data: bytes | bytearray | memoryview) -> int:
        """Take up to the free buffer space of data; return how much."""
        n = min(len(data), self.c.config.send_buffer - len(self.sndbuf))
        if n < len(data):
            self.send_blocked = True
        if n > 0:
            self.sndbuf.append(memoryview(data)[:n])
        return max(n, 0)

    def data_end(self) -> int:
        """Sequence number after the last byte the application queued."""
        return seq_add(self.buf_seq, len(self.sndbuf))

    def has_unsent(self) -> bool:
        return seq_gt(self.data_end(), self.c.snd_nxt) or (self.fin_queued and seq_le(self.c.snd_nxt, self.fin_seq))

    def fin_pending(self) -> bool:
        return self.fin_queued and seq_le(self.c.snd_nxt, self.fin_seq)

    # == output ======================================================================

    def output_new(self, edge: int, now: float) -> None:
        """New data up to edge: sender SWS avoidance (RFC 9293 §3.8.6.2.1) and Nagle (§3.7.4)."""
        c = self.c
        cfg = c.config
        while True:
            unsent = seq_sub(self.data_end(), c.snd_nxt)
            fin_pending = self.fin_queued and seq_le(c.snd_nxt, self.fin_seq)
            usable = seq_sub(edge, c.snd_nxt)
            if unsent <= 0:
                # RFC 9293 §3.10.4: FIN once all data is segmentized; it needs one octet of window.
                if fin_pending and usable >= 1 and c.snd_wnd > 0:
                    self.send_range(c.snd_nxt, 1, now, rtx=False)
                    c.snd_nxt = seq_add(c.snd_nxt, 1)
                return
            full = self.max_payload(0)
            n = min(unsent, usable, full)
            if n <= 0:
                return
            last = n == unsent
            if n >= min(c.send_mss, full):
                pass  # a full-sized segment
            elif last and fin_pending:
                pass  # the FIN goes with it: no reason to wait (Linux does the same)
            elif cfg.nagle and c.snd_nxt != c.snd_una:
                return  # RFC 9293 §3.7.4 Nagle: no small segment while data is unacknowledged
            elif last:
                pass  # SWS (2): all pushed data fits
            elif c.max_snd_wnd and n >= c.max_snd_wnd // 2:
                pass  # SWS (3): at least Fs = 1/2 of the largest window the peer offered
            else:
                return
            limit = n + 1 if last and fin_pending and usable > n else n
            used = self.send_range(c.snd_nxt, limit, now, rtx=False)
            if used == 0:
                return
            c.snd_nxt = seq_add(c.snd_nxt, used)

    def max_payload(self, option_len: int) -> int:
        """Largest payload of one emitted segment (RFC 9293 §3.7.1, or the TSO limit)."""
        c = self.c
        if c.config.max_send_segment is not None:
            return c.config.max_send_segment
        return self.max_segment() - option_len

    def max_segment(self) -> int:
        """Payload of a full segment without options: the MSS, or less if the path said so (PMTUD)."""
        c = self.c
        mss = min(c.options.peer_mss, c.config.mss)
        return mss if self.path_mss is None or self.path_mss >= mss else self.path_mss

    def lower_path_mss(self, mss: int, now: float) -> bool:
        """The path takes segments of at most mss payload octets (RFC 9293 §3.7.2; RFC 1191 §6.3, RFC 8201 §5).

        Never raised here (RFC 1191 §6.3: only a later probe may raise it; we
        do not probe). What is in flight was cut for the old size and died on
        the way: the first unacknowledged segment is resent at once at the new
        size, as Linux's tcp_simple_retransmit does, and without a congestion
        response (a smaller MTU says nothing about congestion); the rest is
        resent at the new size as acknowledgments or the timer find it lost.
        """
        c = self.c
        if mss >= self.max_segment():
            return False
        self.path_mss = mss
        c.send_mss = min(c.send_mss, mss - (TS_OPTION_SPACE if c.options.timestamps else 0))
        if c.snd_una != c.snd_nxt and c.sends():
            self.send_range(c.snd_una, min(seq_sub(c.snd_nxt, c.snd_una), c.send_mss), now, rtx=True)
        return True

    def send_range(self, seq: int, limit: int, now: float, rtx: bool) -> int:
        """Emit one segment of up to ``limit`` sequence octets at seq (data, then our FIN).

        Returns the sequence space used; the caller moves its own pointer.
        """
        c = self.c
        rcv = c.receiver
        options, option_len = rcv.options(now)
        off = seq_sub(seq, self.buf_seq)
        avail = len(self.sndbuf) - off
        n = max(0, min(limit, avail, self.max_payload(option_len)))
        fin = self.fin_queued and limit > n and seq_add(seq, n) == self.fin_seq
        if n == 0 and not fin:
            return 0
        payload = self.sndbuf.read(off, n) if n else b""
        flags = _ACK_PSH if n and n == avail else _ACK
        if fin:
            flags |= _FIN
        if rtx:
            c.retransmissions += 1
            # RFC 6298 §3 (Karn): no sample across a retransmission -- not only of the
            # timed segment: its cumulative ACK also waits for the repaired hole below.
            self.rtt_seq = None
            if c.options.timestamps:
                self.rtx_ts.append((seq, seq_add(seq, n + fin), ts_clock(now)))
        else:
            c.bytes_sent += n
            self.start_rtt(seq, now)
            c.recovery.tlp_rearm = True  # RFC 8985 §7.2: after transmitting new data
            if n and c.options.ecn:
                if self.cwr_pending:
                    self.cwr_pending = False
                    flags |= _CWR  # RFC 3168 §6.1.2: on the first new data after the reduction
                if self._ect_new is None:
                    self._ect_new = set()
                self._ect_new.add(seq)
        rcv.emit(seq, flags, payload, now, options)
        c.recovery.on_send(seq, seq_add(seq, n + fin), now, rtx)
        self.rto_start(now)
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

    # RFC 6298 §5: the retransmission timer, armed only through these three.

    def rto_start(self, now: float) -> None:
        """§5.1: start the timer if it is not running."""
        self.c.timers.arm_once(Timer.RETRANSMIT, now + self.rtt.rto)

    def rto_restart(self, now: float) -> None:
        """§5.3/§5.6 (and RFC 8985 §7.3): restart it to expire after the current RTO."""
        self.c.timers.arm(Timer.RETRANSMIT, now + self.rtt.rto)

    def rto_stop(self) -> None:
        """§5.2: all outstanding data acknowledged."""
        self.c.timers.cancel(Timer.RETRANSMIT)

    def start_rtt(self, seq: int, now: float) -> None:
        """Time one segment per RTT (RFC 6298 §3); the fallback when no timestamp echo is usable."""
        if self.rtt_seq is None:
            self.rtt_seq = seq
            self.rtt_time = now

    # == acknowledgments =============================================================

    def on_ack(self, seg: TcpSegment, wnd: int, fin: bool, now: float) -> bool:
        """RFC 9293 §3.10.7.4 fifth, after SYN-RECEIVED: False if SEG.ACK is not acceptable."""
        c = self.c
        ack = seg.ack
        # RFC 5961 §5.2: acceptable iff SND.UNA - MAX.SND.WND <= SEG.ACK <= SND.NXT.
        if seq_gt(ack, c.snd_nxt) or seq_lt(ack, seq_add(c.snd_una, -c.max_snd_wnd)):
            return False
        # RFC 5681 §2 duplicate ACK: outstanding data, no text, no SYN/FIN, same ACK and window.
        dup = (ack == c.snd_una and c.snd_una != c.snd_nxt and not seg.payload and not fin
               and wnd == c.snd_wnd and wnd > 0)
        self.update_window(seg.seq, ack, wnd)
        acked = 0
        old_una = c.snd_una
        if seq_gt(ack, old_una):
            acked = seq_sub(ack, old_una) - (old_una == c.iss)  # the SYN is no data
            self.ack_advance(seg, now)
        c.recovery.on_ack(seg, old_una, acked, dup, now)
        if c.options.ecn and int(seg.flags) & _F_ECE:
            c.ece_received += 1
            self.on_ece(now)  # RFC 3168 §6.1.2
        return True

    def update_window(self, seq: int, ack: int, wnd: int) -> None:
        """RFC 9293 §3.10.7.4: update the send window only from a newer segment (SND.WL1/WL2)."""
        c = self.c
        if seq_le(c.snd_una, ack) and (seq_lt(c.snd_wl1, seq) or (c.snd_wl1 == seq and seq_le(c.snd_wl2, ack))):
            if wnd and c.snd_wnd == 0:
                c.timers.cancel(Timer.ZERO_WINDOW_PROBE)
            c.snd_wnd = wnd
            c.max_snd_wnd = max(c.max_snd_wnd, wnd)
            c.snd_wl1 = seq
            c.snd_wl2 = ack
        if c.snd_wnd == 0:
            self.retries = 0  # RFC 9293 §3.8.6.1: a peer answering probes is alive

    def ack_advance(self, seg: TcpSegment, now: float) -> None:
        """SND.UNA moves to SEG.ACK: free the acknowledged bytes, sample RTT, restart the timer."""
        c = self.c
        ack = seg.ack
        old_una = c.snd_una
        c.bytes_acked += seq_sub(ack, c.snd_una)
        n = seq_sub(ack, self.buf_seq)
        if n > 0:
            n = min(n, len(self.sndbuf))
            self.sndbuf.release(n)
            self.buf_seq = seq_add(self.buf_seq, n)
        c.snd_una = ack
        self.retries = 0
        c.recovery.on_new_ack()
        # RTT: from the timestamp echo (RFC 7323 §4.1), else the one timed segment (RFC 6298 §3).
        ts = seg.options.timestamp if c.options.timestamps else None
        timed = self.rtt_seq is not None and seq_gt(ack, self.rtt_seq)
        last_rtx_ts = None  # TSval of the latest retransmission of the data just acknowledged
        if self.rtx_ts:
            for start, end, tsval in self.rtx_ts:
                if seq_lt(start, ack) and seq_gt(end, old_una):
                    last_rtx_ts = tsval  # entries are in time order: the last match wins
            self.rtx_ts = [entry for entry in self.rtx_ts if seq_gt(entry[1], ack)]
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
                self.rtt.sample(((ts_clock(now) - ts[1]) & 0xFFFFFFFF) / 1000)
        elif timed:
            self.rtt.sample(max(0.0, now - self.rtt_time))
        if timed:
            self.rtt_seq = None
        if self.rtt.backoffs and seq_lt(old_una, self.rto_rtx_end) and seq_le(self.rto_rtx_end, ack) and c.snd_wnd > 0:
            # The timer's own retransmission was acknowledged: the path delivers within
            # the base RTO.  RFC 6298 §5.7's note collapses the backoff only with a new
            # RTT sample, which go-back-N without timestamps never yields (Karn: every
            # segment below SND.NXT was retransmitted); each further random loss then
            # doubled the RTO again -- 0.2 s became 25 s, a 30 s stall under 5 % loss.
            # Our choice: collapse here (the RTO is still at least min_rto).
            self.rtt.collapse()
        if old_una == c.iss and c.timeouts:
            # Our SYN or SYN-ACK was lost.  RFC 6298 §5.7: without an RTT sample, start
            # data transfer with RTO = 3 s; RFC 5681 §3.1: with an initial window of 1 SMSS.
            if self.rtt.srtt is None:
                cfg = c.config
                self.rtt = RttEstimator(max(3.0, cfg.initial_rto), cfg.min_rto, cfg.max_rto)
            self.cc.cwnd = c.send_mss
        c.recovery.advance(ack)
        # RFC 6298 §5.2/§5.3: stop the timer when all is acknowledged, else restart it.
        if ack == c.snd_nxt:
            self.rto_stop()
        else:
            self.rto_restart(now)
        if self.send_blocked and c.send_space >= max(1, c.config.send_buffer // 2):
            self.send_blocked = False
            c._events.append(SendSpace())

    def on_ece(self, now: float) -> None:
        """RFC 3168 §6.1.2: ECN-Echo -- reduce cwnd as for a loss, at most once per window."""
        c = self.c
        if seq_lt(c.snd_una, self.ecn_recover) or c.recovery.in_loss_recovery:
            return  # this window was reduced already (a loss reduces it too)
        self.ecn_recover = c.snd_nxt
        self.cc.on_loss(seq_sub(c.snd_nxt, c.snd_una), now)  # ssthresh per RFC 5681 eq. 4, cwnd = ssthresh
        self.cwr_pending = True

    # == timers ======================================================================

    def on_syn_rto(self, now: float) -> bool:
        """RFC 6298 §5.5-§5.6 for our SYN or SYN-ACK; True: the caller resends it, False: give up."""
        c = self.c
        if self.retries >= c.config.max_syn_retries:
            return False
        self.retries += 1
        c.retransmissions += 1
        c.timeouts += 1
        self.rtt.backoff()
        self.rtt_seq = None
        self.rtx_ts.append((c.iss, seq_add(c.iss, 1), ts_clock(now)))  # no echo sample of the first
        self.rto_restart(now)
        return True

    def on_rto(self, now: float) -> bool:
        """RFC 6298 §5.4-§5.6 for data and FIN; False: give up (too many retries)."""
        c = self.c
        if c.snd_una == c.snd_nxt or not c.sends():
            return True
        if self.retries >= c.config.max_retries:
            return False  # RFC 9293 §3.8.3 R2
        self.retries += 1
        c.timeouts += 1
        c.recovery.on_rto(now)
        self.rto_restart(now)  # RFC 6298 §5.6
        return True


    def rearm(self, now: float, sends: bool) -> None:
        """After a driver call: the retransmission, loss-probe and persist timers match the flight."""
        c = self.c
        timers = c.timers
        idle = c.snd_una == c.snd_nxt
        rto = self.rtt.rto
        # RFC 6298 §5.1/§5.2: the retransmission timer runs while anything is outstanding.
        if idle:
            self.rto_stop()
        else:
            self.rto_start(now)
        rec = c.recovery
        if rec.tlp_rearm:
            rec.tlp_rearm = False
            rec.arm_loss_probe(now)
        elif idle:
            timers.cancel(Timer.LOSS_PROBE)
        # Persist: data held back (zero window, RFC 9293 §3.8.6.1, or sender SWS
        # avoidance, §3.8.6.2.1) with nothing outstanding: probe after one RTO.
        if idle and sends and self.has_unsent():
            timers.arm_once(Timer.ZERO_WINDOW_PROBE, now + rto)
        else:
            timers.cancel(Timer.ZERO_WINDOW_PROBE)

    def keepalive(self, now: float) -> bool:
        """RFC 9293 §3.8.4: probe an idle connection with SEG.SEQ = SND.NXT - 1; False: give up."""
        c = self.c
        cfg = c.config
        assert cfg.keepalive is not None
        idle_deadline = c.last_recv + cfg.keepalive  # the same float as the armed deadline
        if c.ka_probes == 0 and now < idle_deadline:
            c.timers.arm(Timer.KEEPALIVE, idle_deadline)
            return True
        if c.ka_probes >= cfg.keepalive_probes:
            return False
        c.ka_probes += 1
        c.keepalive_probes_sent += 1
        c.receiver.emit(seq_add(c.snd_nxt, -1), _ACK, b"", now)
        c.timers.arm(Timer.KEEPALIVE, now + cfg.keepalive_interval)
        return True

    def on_persist(self, now: float) -> None:
        """The persist timer: data waits, nothing is in flight to bring an ACK.

        Zero window: one octet of new data (RFC 9293 §3.8.6.1).  Small window:
        the sender SWS override timeout (RFC 9293 §3.8.6.2.1), send what fits, so
        a lost window update cannot stall the connection.
        """
        c = self.c
        limit = max(1, min(c.snd_wnd, self.cc.cwnd))
        used = self.send_range(c.snd_nxt, limit, now, rtx=False)
        if not used:
            return
        c.snd_nxt = seq_add(c.snd_nxt, used)
        if c.snd_wnd == 0:
            c.zero_window_probes += 1
            c.recovery.probe_sent()
            # The octet is now outstanding: the retransmission timer repeats the
            # probe, backing off exponentially, until the window opens.
            self.rtt.backoff()
        self.rto_restart(now)
