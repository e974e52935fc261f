"""The receiving half of a connection (gVisor ``rcv.go``): what comes in, what we ACK.

Contract: the receiver owns the receive sequence variables of the TCB (RFC
9293 §3.3.1: ``irs``, ``rcv_nxt``, and ``rcv_adv``, the right edge of the
window we advertised), the receive buffer, the reassembly queue, the peer's FIN
beyond a gap, TS.Recent, ECN-Echo, and when to ACK: ``ack_now`` (send one with
the next output) or the DELAYED_ACK timer.  It decides acceptability (RFC 9293
§3.10.7.4 first, RFC 7323 §5.3 PAWS), takes segment text in order (seventh)
and tells the connection what happened (new data, the FIN reached: eighth --
events and state changes stay with the connection).  It builds no segment:
the outbox (:mod:`outbox`) asks it for the acknowledgment part of every
non-SYN segment -- :meth:`acknowledge` (ACK number, window: honest, never
shrinking, receiver SWS avoidance) and :meth:`segment_options` (timestamps, SACK
blocks).  It knows nothing of the sender but the RTT estimator it reads.

``rcv_adv`` is the right edge of the window we have advertised; RCV.WND is
``rcv_adv - rcv_nxt``.

Receive-buffer autotuning (Linux ``tcp_rcv_space_adjust``, after Fisk and Feng's
Dynamic Right-Sizing): the window is the free space of RCV.BUFF (``rcv_buff``),
which starts at ``config.initial_recv_buffer()`` (64 KiB by default) and grows,
never shrinks, toward ``config.recv_buffer`` (the window scale was chosen from that
maximum at SYN time, RFC 7323 §2.3).  Once per measured round trip -- checked
whenever we send a segment, since that is when the window is advertised -- the
bytes the application read in that round trip are compared with the most it read
in any before (``rcvq_space``, at first half the initial buffer); when more,
RCV.BUFF becomes twice that amount, times its growth over that previous best (at
most two; see ``_space_adjust``).  A slow reader so keeps the small initial buffer
(and the memory its window lets the peer fill); a reader that takes everything
sees its window double per round trip, on average, up to the maximum.  The round
trip is our own receive-side estimate (Linux ``rcv_rtt_est``): from the peer's
timestamp echoes on full-sized segments (RFC 7323 §4: now - TSecr), or without
timestamps the shortest time seen from an ACK that moves our right edge to the
arrival of the first byte past the old edge (which the sender could not send
before that ACK reached it); before any sample, the sender's SRTT (the
handshake's, RFC 6298) stands in.  Linux times the arrival of a whole window from
any segment instead, and feeds those samples even with timestamps; in a burst that
can be far shorter than a round trip, and too short a round trip stalls growth.
"""

from __future__ import annotations

from typing import Final

from pipeline.wire.seqnum import seq_add, seq_ge, seq_gt, seq_in_window, seq_le, seq_lt, seq_sub
from pipeline.wire.tcp import NO_OPTIONS, TcpOptions
from workers.tcp.config import TcpConfig
from workers.tcp.counters import Counters
from workers.tcp.options import DEFAULT, DEFAULT_MSS, TS_OPTION_SPACE, Negotiated, ts_clock
from workers.tcp.reassembly import ReassemblyQueue
from workers.tcp.rtt import RttEstimator
from workers.tcp.timers import Timer, TimerTable

CHALLENGE_ACK_LIMIT = 10     # challenge ACKs per second per connection (RFC 5961 §7)
PAWS_IDLE_LIMIT = 24 * 86400.0  # RFC 7323 §5.5: TS.Recent is invalid after 24 days idle
# What text() found (bits): in-order data to announce (DataReceived), the peer's FIN reached.
NEW_DATA: Final = 1
FIN_REACHED: Final = 2


class Receiver:
    """Receive buffer, reassembly, ACK scheduling and window advertisement."""

    __slots__ = ("config", "timers", "stats", "rtt", "options", "irs", "rcv_nxt", "rcv_adv",
                 "rcvbuf", "reasm", "fin_seq", "ack_now", "unacked_bytes", "seg_max", "data_event_armed",
                 "last_ack_sent", "ts_recent", "ts_recent_time", "ece", "_challenge_start", "_challenge_count",
                 "rcv_buff", "rcvq_space", "rcvq_read", "rcvq_time",
                 "rcv_rtt", "rcv_rtt_seq", "rcv_rtt_time", "rcv_rtt_tsecr")

    def __init__(self, config: TcpConfig, timers: TimerTable, stats: Counters, rtt: RttEstimator,
                 now: float) -> None:
        """``rtt``: the sender's estimator, read (never written) for autotuning before our own sample."""
        self.config = config
        self.timers = timers
        self.stats = stats
        self.rtt = rtt
        self.options = DEFAULT
        # RFC 9293 §3.3.1 receive sequence variables.
        self.irs = self.rcv_nxt = self.rcv_adv = 0
        self.rcvbuf = bytearray()
        self.reasm: ReassemblyQueue | None = None  # built at the first out-of-order segment
        self.fin_seq: int | None = None  # peer FIN seen beyond a gap
        self.ack_now = False
        self.unacked_bytes = 0
        self.seg_max = min(DEFAULT_MSS, config.mss)  # largest segment seen, for "every second full segment"
        self.data_event_armed = True
        self.last_ack_sent = 0
        self.ts_recent = 0
        self.ts_recent_time = now
        self.ece = False  # RFC 3168 §6.1.3: CE received, echo ECE until the peer's CWR
        self._challenge_start = float("-inf")
        self._challenge_count = 0
        # Autotuning (see the module docstring); names after Linux's rcvq_space and rcv_rtt_est.
        self.rcv_buff = config.initial_recv_buffer()  # RCV.BUFF: the window is its free space
        self.rcvq_space = self.rcv_buff // 2  # most bytes read in one measured round trip
        self.rcvq_read = 0  # bytes read when the current measurement began
        self.rcvq_time = now  # when it began
        self.rcv_rtt: float | None = None  # receive-side round-trip estimate (seconds)
        self.rcv_rtt_seq = 0  # without timestamps: the old right edge whose first byte past ends a sample
        self.rcv_rtt_time: float | None = None  # when we advertised past it (None: no sample running)
        self.rcv_rtt_tsecr = 0  # the TSecr of the last echo looked at

    # == synchronization ==============================================================

    def on_syn(self, seq: int) -> None:
        """The peer's SYN: IRS = SEG.SEQ, RCV.NXT = SEG.SEQ + 1 (RFC 9293 §3.10.7.2, §3.10.7.3)."""
        self.irs = seq
        self.rcv_nxt = seq_add(seq, 1)

    def negotiated(self, options: Negotiated, syn_options: TcpOptions, now: float) -> None:
        """The options are known: TS.Recent from the SYN (RFC 7323 §3.2), a full segment's size."""
        self.options = options
        if options.timestamps and syn_options.timestamp is not None:
            self.ts_recent = syn_options.timestamp[0]
            self.ts_recent_time = now
        self.seg_max = min(DEFAULT_MSS, options.rcv_full(self.config))

    def syn_advertised(self, window: int) -> None:
        """Our SYN or SYN-ACK offered ``window`` octets past RCV.NXT (unscaled, RFC 7323 §2.2)."""
        self.rcv_adv = seq_add(self.rcv_nxt, window)
        self.last_ack_sent = self.rcv_nxt

    # == acceptability ===============================================================

    def paws_reject(self, tsval: int, now: float) -> bool:
        """RFC 7323 §5.3 R1: a timestamp older than TS.Recent marks an old duplicate."""
        if now - self.ts_recent_time > PAWS_IDLE_LIMIT:
            return False  # RFC 7323 §5.5: TS.Recent no longer valid
        return seq_lt(tsval, self.ts_recent)  # timestamps compare modulo 2**32 like sequence numbers

    def acceptable(self, seq: int, seg_len: int) -> bool:
        """RFC 9293 §3.10.7.4 first: the four cases of the acceptability test."""
        rcv_nxt = self.rcv_nxt
        wnd = max(0, seq_sub(self.rcv_adv, rcv_nxt))
        if seg_len == 0:
            if wnd == 0:
                return seq == rcv_nxt
            return seq_in_window(seq, rcv_nxt, wnd)
        if wnd == 0:
            # Not acceptable, but "special allowance should be made to accept valid ACKs,
            # URGs, and RSTs": at rcv_nxt we go on with the controls; the text is trimmed away.
            return seq == rcv_nxt
        return seq_in_window(seq, rcv_nxt, wnd) or seq_in_window(seq_add(seq, seg_len - 1), rcv_nxt, wnd)

    def note_timestamp(self, tsval: int, tsecr: int, seq: int, seg_len: int, now: float) -> None:
        """RFC 7323 §4.3 (2): TS.Recent follows the segment that our last ACK covered;
        the echo (TSecr) of a full-sized segment is a receive-side RTT sample."""
        if seq_ge(tsval, self.ts_recent) and seq_le(seq, self.last_ack_sent):
            self.ts_recent = tsval
            self.ts_recent_time = now
        # Linux tcp_rcv_rtt_measure_ts: one sample per new echo, and only from a full
        # segment (a short one may have waited at the sender, Nagle or an idle application).
        if tsecr != self.rcv_rtt_tsecr:
            self.rcv_rtt_tsecr = tsecr
            if seg_len >= self.seg_max:
                rtt = seq_sub(ts_clock(now), tsecr) / 1000  # RFC 7323 §4.1: our TSval clock, in ms
                # 0 ms says only "under a millisecond" (dropped, as Linux does); an echo older
                # than the longest RTO is no round trip (a peer echoing 0, or nonsense).
                if 0 < rtt <= self.config.max_rto:
                    # RFC 6298 §2.3's gain of 1/8 (Linux uses it here too).
                    est = self.rcv_rtt
                    self.rcv_rtt = rtt if est is None else est + (rtt - est) / 8

    def challenge_ack(self, now: float) -> None:
        """RFC 5961 §3.2/§4.2/§5.2 challenge ACK, rate-limited (§7)."""
        if now - self._challenge_start >= 1.0:
            self._challenge_start = now
            self._challenge_count = 0
        if self._challenge_count >= CHALLENGE_ACK_LIMIT:
            self.stats.challenge_acks_suppressed += 1
            return
        self._challenge_count += 1
        self.stats.challenge_acks += 1
        self.ack_now = True

    def ecn_in(self, cwr: bool, ce: bool) -> None:
        """RFC 3168 §6.1.3: the peer's CWR stops our ECE echo; a CE mark (re)starts it."""
        if cwr:
            self.ece = False
        if ce:
            self.stats.ce_received += 1
            self.ece = True

    # == when to ACK =================================================================

    def send_ack(self) -> None:
        """Acknowledge with the next output (an unacceptable segment, a duplicate FIN, ...)."""
        self.ack_now = True

    def restart_time_wait(self, now: float) -> None:
        """TIME-WAIT: a retransmitted FIN is re-ACKed and restarts the 2 MSL timeout (RFC 9293 §3.10.7.4)."""
        self.ack_now = True
        self.timers.arm(Timer.TIME_WAIT, now + 2 * self.config.msl)

    def owes_ack_first(self, seq: int, n: int) -> bool:
        """An out-of-order segment comes while an ACK is owed: that ACK goes out first, without it.

        RFC 5681 §4.2: one duplicate ACK per out-of-order segment, even when several
        arrive before the shell asks for output; the sender counts them.  (Text beyond
        the window we advertised is trimmed and owes an ACK itself.)
        """
        if not n or not seq_gt(seq, self.rcv_nxt) or not seq_lt(seq, self.rcv_adv):
            return False  # in order, or trimmed away entirely
        return self.ack_now or seq_gt(seq_add(seq, n), self.rcv_adv)

    # == text and FIN ================================================================

    def text(self, seq: int, payload: bytes, fin: bool, now: float) -> int:
        """RFC 9293 §3.10.7.4 seventh and eighth: NEW_DATA and FIN_REACHED bits of what happened."""
        n = len(payload)
        result = self._receive_bytes(seq, payload, now) if n else 0
        if fin:
            fin_seq = seq_add(seq, n)
            if seq_le(fin_seq, self.rcv_adv) and seq_ge(fin_seq, self.rcv_nxt):
                self.fin_seq = fin_seq
            elif seq_gt(fin_seq, self.rcv_adv):
                self.ack_now = True  # FIN beyond the window: trimmed away
        if self.fin_seq is not None and self.fin_seq == self.rcv_nxt:
            # RFC 9293 §3.10.7.4 eighth: the FIN takes one sequence number and is ACKed at once.
            self.fin_seq = None
            self.rcv_nxt = seq_add(self.rcv_nxt, 1)
            self.ack_now = True
            result |= FIN_REACHED
        return result

    def _receive_bytes(self, seq: int, payload: bytes, now: float) -> int:
        """Trim to [rcv_nxt, rcv_adv), deliver in order, queue beyond a gap; NEW_DATA or 0."""
        view = memoryview(payload)
        left = seq_sub(self.rcv_nxt, seq)
        if left > 0:
            view = view[left:]  # RFC 9293 §3.10.7.4: trim what was received already
            seq = self.rcv_nxt
        right = seq_sub(seq_add(seq, len(view)), self.rcv_adv)
        if right > 0:
            view = view[:len(view) - right]  # beyond the window we advertised
            self.ack_now = True
        if not view:
            self.ack_now = True
            return 0
        cfg = self.config
        self.seg_max = max(self.seg_max, min(len(payload), self.options.rcv_full(cfg)))
        if seq != self.rcv_nxt:
            # Out of order: hold it, and ACK at once so the sender sees the gap
            # (RFC 5681 §4.2; the SACK blocks ride on that ACK, RFC 2018 §4).
            self.stats.ooo_segments += 1
            reasm = self.reasm
            if reasm is None:
                reasm = self.reasm = ReassemblyQueue(cfg.recv_buffer)
            reasm.add(seq, view, self.rcv_nxt)
            self.ack_now = True
            return 0
        delivered = len(view)
        self.rcvbuf += view
        self.rcv_nxt = seq_add(self.rcv_nxt, delivered)
        reasm = self.reasm
        if reasm is not None and reasm.bytes_held:
            more = reasm.pop(self.rcv_nxt)
            if more:
                self.rcvbuf += more
                self.rcv_nxt = seq_add(self.rcv_nxt, len(more))
                delivered += len(more)
                self.ack_now = True  # RFC 5681 §4.2: ACK at once when a gap is filled
        self.stats.bytes_received += delivered
        start = self.rcv_rtt_time
        if start is not None and seq_gt(self.rcv_nxt, self.rcv_rtt_seq):
            self._rtt_by_window(now - start)
        result = 0
        if self.data_event_armed:
            self.data_event_armed = False
            result = NEW_DATA
        # RFC 9293 §3.8.6.3 / RFC 5681 §4.2: delay ACKs, but ACK at least every second full segment.
        self.unacked_bytes += delivered
        if self.unacked_bytes >= 2 * self.seg_max:
            self.ack_now = True
        else:
            self.timers.arm_once(Timer.DELAYED_ACK, now + cfg.delayed_ack)
        return result

    def _rtt_by_window(self, rtt: float) -> None:
        """Without timestamps (DRS; Linux tcp_rcv_rtt_measure): the first byte past an
        old right edge arrived, ``rtt`` after the ACK that advertised past it."""
        # No byte past the old edge could leave the sender before that ACK got there, so
        # the sample is at least a round trip -- more when the sender was slower than the
        # window allowed: keep the smallest.
        self.rcv_rtt_time = None
        est = self.rcv_rtt
        if rtt > 0 and (est is None or rtt < est):
            self.rcv_rtt = rtt

    def _space_adjust(self, now: float) -> None:
        """Linux tcp_rcv_space_adjust: once per round trip, grow RCV.BUFF if the
        application read more in it than in any round trip before."""
        rtt = self.rcv_rtt
        if rtt is None:
            rtt = self.rtt.srtt  # the sender's (the handshake's sample), until we have our own
        if rtt is None or now - self.rcvq_time < rtt:
            return
        # Bytes the application has read: every byte delivered in order, less those unread.
        read = self.stats.bytes_received - len(self.rcvbuf)
        copied = read - self.rcvq_read
        space = self.rcvq_space
        if copied > space:
            self.rcvq_space = copied
            # Twice what was read: a round trip in flight while the application reads
            # the last one, with slack for a retransmission round (DRS's factor of two).
            # Times its growth over that best round trip (at most 2): what was read here
            # was sent against the window of a round trip ago, and the window we advertise
            # now governs the round trip after next (Linux's "the ACK we are sending now
            # is for the next RTT, not the current one").  Growth only: never retracted.
            target = 2 * copied * min(copied, 2 * space) // space
            self.rcv_buff = min(self.config.recv_buffer, max(self.rcv_buff, target))
        self.rcvq_read = read
        self.rcvq_time = now

    def read(self, max_bytes: int, window_open: bool) -> bytes:
        """The application's recv(): take bytes; ask for a window update if it opens enough."""
        buf = self.rcvbuf
        n = len(buf) if max_bytes < 0 else min(max_bytes, len(buf))
        self.data_event_armed = True
        if n == 0:
            return b""
        data = bytes(buf[:n])
        del buf[:n]
        # RFC 9293 §3.8.6.2.2 / RFC 1122 §4.2.3.3: reading opens the window; send a
        # window update when the right edge can move by two segments or half the
        # buffer (BSD's rule), so a peer stopped by a small window restarts.
        if window_open:
            free = self.rcv_buff - len(buf)
            increase = free - max(0, seq_sub(self.rcv_adv, self.rcv_nxt))
            if increase >= min(2 * self.config.mss, self.rcv_buff // 2):
                self.ack_now = True
        return data

    # == what our segments carry =====================================================

    def segment_options(self, now: float) -> tuple[TcpOptions, int]:
        """Options of a non-SYN segment and their length: TS (RFC 7323 §3), SACK (RFC 2018 §3)."""
        opts = self.options
        ts = (ts_clock(now), self.ts_recent) if opts.timestamps else None
        blocks: tuple[tuple[int, int], ...] = ()
        reasm = self.reasm
        if opts.sack and reasm is not None and reasm.bytes_held:
            # RFC 2018 §3: at most 3 blocks next to a timestamp, 4 without.
            blocks = tuple(reasm.sack_blocks(3 if ts else 4))
        if ts is None and not blocks:
            return NO_OPTIONS, 0
        length = (TS_OPTION_SPACE if ts else 0) + (4 + 8 * len(blocks) if blocks else 0)
        return TcpOptions(sack_blocks=blocks, timestamp=ts), length

    def advertise(self) -> int:
        """The window field to send; moves rcv_adv (honest, never shrinking, SWS-avoiding)."""
        rcv_buff = self.rcv_buff
        free = max(0, rcv_buff - len(self.rcvbuf))  # honest: free buffer space
        cur = max(0, seq_sub(self.rcv_adv, self.rcv_nxt))
        # RFC 9293 §3.8.6.2.2 receiver SWS avoidance: move the right edge only by
        # at least min(RCV.BUFF/2, Eff.snd.MSS); RFC 7323 §2.4: never shrink it.
        win = free if free - cur >= min(rcv_buff // 2, self.config.mss) else cur
        shift = self.options.rcv_wscale
        raw = win >> shift
        if (raw << shift) < cur:
            raw += 1  # rounding down would pull the right edge back
        raw = min(raw, 0xFFFF)
        edge = seq_add(self.rcv_nxt, raw << shift)
        if seq_gt(edge, self.rcv_adv):
            self.rcv_adv = edge
        return raw

    def syn_window(self) -> int:
        """RFC 7323 §2.2: the window of a SYN is unscaled."""
        return min(max(0, self.rcv_buff - len(self.rcvbuf)), 0xFFFF)

    def option_len(self) -> int:
        """Length of :meth:`segment_options` (without building them): what a segment's payload makes room for."""
        opts = self.options
        length = TS_OPTION_SPACE if opts.timestamps else 0
        reasm = self.reasm
        if opts.sack and reasm is not None and reasm.bytes_held:
            length += 4 + 8 * min(len(reasm), 3 if opts.timestamps else 4)  # RFC 2018 §3, as segment_options()
        return length

    def acknowledge(self, now: float) -> int:
        """A segment carrying our ACK of RCV.NXT leaves now: its window field.

        The delayed ACK is off, and autotuning looks at the window first (so
        growth shows at once) and times this ACK if it moves the right edge.
        """
        tuning = self.rcv_buff < self.config.recv_buffer
        if tuning:
            self._space_adjust(now)
        edge = self.rcv_adv
        window = self.advertise()
        if tuning and self.rcv_rtt_time is None and not self.options.timestamps and seq_gt(self.rcv_adv, edge):
            self.rcv_rtt_seq = edge  # time this ACK: until the first byte past the old edge
            self.rcv_rtt_time = now
        self.last_ack_sent = self.rcv_nxt
        self.ack_now = False
        self.unacked_bytes = 0
        self.timers.cancel(Timer.DELAYED_ACK)
        return window

    def clear(self) -> None:
        """CLOSED: nothing more to reassemble or acknowledge."""
        self.reasm = None
        self.ack_now = False
