"""One TCP connection as a sans-IO state machine (RFC 9293).

Rules of this module (h11 ``_state.py`` style):

* Everything that changes the connection's state lives here; the RTT estimator,
  congestion window, reassembly queue and SACK scoreboard are helpers it drives.
* It never reads a clock or a socket.  Drivers: ``receive(seg, now)``,
  ``handle_timer(now)`` and the application calls ``send``/``recv``/``close``/
  ``abort``.  Outputs: ``segments_to_send(now)`` (drains), ``next_event()`` and
  ``get_timer()`` (earliest deadline).  The shell calls ``segments_to_send`` and
  ``get_timer`` after every driver call; new data and pure ACKs are built there,
  so an ACK rides on data whenever it can.
* Two kinds of error: a misbehaving peer is answered as the RFCs say (ACK,
  challenge ACK, RST, drop) and counted, never raised; misuse by the caller
  raises :class:`InvalidOperation`.
* No logging: the shell compares ``state`` before and after each call and logs
  transitions itself; counters are plain int attributes.
* Every sequence number is a :class:`SeqNum`; ``a - b`` of two is the signed
  distance.  Nothing assumes one MSS per segment: incoming segments may be
  64 KB (GRO/TSO) and outgoing ones up to ``config.max_send_segment``.

Variable names are the RFC's (``snd_una``, ``snd_nxt``, ``rcv_nxt``, ...).
``snd_nxt`` is RFC 9293's SND.NXT, the highest sequence number sent; without
SACK, after a retransmission timeout the go-back-N point is kept separately in
``_rtx_nxt`` (the BSD ``snd_nxt`` rewind, without breaking the RFC's ACK
acceptability test).  ``rcv_adv`` is the right edge of the window we have
advertised; RCV.WND is ``rcv_adv - rcv_nxt``.

Loss recovery.  With SACK: RFC 6675 -- IsLost() with DupThresh counted in bytes,
pipe, NextSeg() rules 1, 2 and 4, one loop that resends every lost hole cwnd
allows, in TSO-sized chunks; after a timeout the same loop resends what is not
SACKed up to the recovery point (RFC 6675 §5.1).  Outside recovery SACKed bytes
count as gone, so new data keeps flowing (RFC 3042 generalized).  From RFC 8985:
a tail loss probe (new data, else the last segment) 2*SRTT after the last
send or ACK, a retransmission found lost again when data sent after it is
SACKed, and the data sent before a SACKed probe is lost.  Without SACK: NewReno
(RFC 6582) with limited transmit (RFC 3042).  Our deviations, each commented
where it is made: up to two probes per ACK and probes in recovery too; cwnd in
recovery is used in whole segments; RTO backoff collapses when the timeout's own
retransmission is acknowledged; a timestamp echo is an RTT sample even for
retransmitted data unless it predates the last timeout.

Timers: one deadline per ``Timer``.  The ZERO_WINDOW_PROBE timer is the persist
timer: it also serves as the sender SWS override (RFC 9293 §3.8.6.2.1), so a lost
window update never stalls a connection that holds back a small segment.
LOSS_PROBE is the RFC 8985 PTO (SACK connections only).

Not implemented: urgent data (URG is ignored and its bytes are ordinary data,
RFC 6093), data in SYN segments (not acknowledged, so the peer resends it), ECN,
a FIN-WAIT-2 timeout, TIME-WAIT reuse by a new SYN.
Once timestamps are negotiated, a segment without one is still accepted (as
Linux does; RFC 7323 §3.2 says SHOULD drop).
"""

from __future__ import annotations

import enum
from collections import deque

from pipeline.wire.seqnum import SeqNum, seq_max
from pipeline.wire.tcp import NO_OPTIONS, Flags, TcpOptions, TcpSegment
from workers.tcp.config import TcpConfig
from workers.tcp.congestion import make_congestion_control
from workers.tcp.events import Closed, Connected, DataReceived, Event, PeerClosed, SendSpace
from workers.tcp.reassembly import ReassemblyQueue
from workers.tcp.rtt import RttEstimator
from workers.tcp.scoreboard import SackScoreboard

DEFAULT_MSS = 536            # RFC 9293 §3.7.1: send MSS when the peer sent no MSS option (IPv4)
MIN_PEER_MSS = 64            # floor for a peer's MSS option (Linux: 48), leaves room for 40 bytes of options
MAX_WINDOW_SHIFT = 14        # RFC 7323 §2.3
TS_OPTION_SPACE = 12         # NOP NOP TS (RFC 7323 Appendix A)
DUP_ACK_THRESHOLD = 3        # RFC 5681 §3.2
CHALLENGE_ACK_LIMIT = 10     # challenge ACKs per second per connection (RFC 5961 §7)
PAWS_IDLE_LIMIT = 24 * 86400.0  # RFC 7323 §5.5: TS.Recent is invalid after 24 days idle
MAX_TS_RTT_MS = 600_000      # an echoed timestamp older than this is bogus, not an RTT
WC_DEL_ACK_T = 0.2           # RFC 8985 §7.2 WCDelAckT: worst-case delayed ACK of the peer
MAX_LOSS_PROBES = 2          # probes per ACK of new data before the RTO has to act
PTO_SLACK = 0.002            # added to 2*SRTT for the loss probe timeout (Linux: TCP_TIMEOUT_MIN, 2 ms)

_ACK = Flags.ACK
_ACK_PSH = Flags.ACK | Flags.PSH
_FIN = Flags.FIN
_SYN = Flags.SYN
_SYN_ACK = Flags.SYN | Flags.ACK
_RST = Flags.RST
_RST_ACK = Flags.RST | Flags.ACK
_F_FIN, _F_SYN, _F_RST, _F_ACK = 0x01, 0x02, 0x04, 0x10


class State(enum.Enum):
    """RFC 9293 §3.3.2 connection states."""

    LISTEN = "LISTEN"
    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"
    CLOSED = "CLOSED"


class Timer(enum.Enum):
    RETRANSMIT = 1
    ZERO_WINDOW_PROBE = 2
    DELAYED_ACK = 3
    KEEPALIVE = 4
    TIME_WAIT = 5
    LOSS_PROBE = 6


class InvalidOperation(RuntimeError):
    """The application called something the connection's state does not allow."""


# RFC 9293 §3.10.7.4 seventh: states in which segment text is delivered.
_RECEIVES_TEXT = frozenset({State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2})
# States in which data or our FIN may be (re)transmitted.
_SENDS = frozenset({State.ESTABLISHED, State.CLOSE_WAIT, State.FIN_WAIT_1, State.CLOSING, State.LAST_ACK})
# States in which the application may queue data (RFC 9293 §3.10.2).
_APP_SEND = frozenset({State.SYN_SENT, State.SYN_RECEIVED, State.ESTABLISHED, State.CLOSE_WAIT})
# RFC 9293 §3.10.5 ABORT: states that send a RST.
_ABORT_RST = frozenset({State.SYN_RECEIVED, State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2,
                        State.CLOSE_WAIT})
# RFC 9293 §3.10.7.4 second: a RST here closes without a "connection reset" signal.
_CLOSED_BY_USER = frozenset({State.CLOSING, State.LAST_ACK, State.TIME_WAIT})
_KEEPALIVE_STATES = frozenset({State.ESTABLISHED, State.CLOSE_WAIT, State.FIN_WAIT_2})


def window_shift(recv_buffer: int) -> int:
    """Smallest shift that lets a 16-bit window field cover recv_buffer (RFC 7323 §2.3)."""
    shift = 0
    while (recv_buffer >> shift) > 0xFFFF and shift < MAX_WINDOW_SHIFT:
        shift += 1
    return shift


def ts_clock(now: float) -> int:
    """TSval: milliseconds, 32 bits (RFC 7323 §5.4: 1 ms - 1 s per tick)."""
    return int(now * 1000) & 0xFFFFFFFF


class Connection:
    """A TCP connection; create with :meth:`accept`, :meth:`connect` or :meth:`from_cookie`."""

    __slots__ = (
        "config", "local_port", "remote_port", "state", "passive",
        # RFC 9293 §3.3.1 send sequence variables
        "iss", "snd_una", "snd_nxt", "snd_wnd", "snd_wl1", "snd_wl2", "max_snd_wnd", "snd_wscale",
        # receive sequence variables
        "irs", "rcv_nxt", "rcv_adv", "rcv_wscale",
        # negotiated options
        "peer_mss", "send_mss", "ws_ok", "sack_ok", "ts_ok", "ts_recent", "_ts_recent_time", "_last_ack_sent",
        # buffers
        "_sndbuf", "_buf_seq", "_fin_queued", "_fin_seq", "_rcvbuf", "_reasm", "_rcv_fin_seq", "peer_fin",
        # retransmission, RTT, congestion
        "_rtt", "_cc", "_scoreboard", "_rtx_nxt", "_retries", "_rtt_seq", "_rtt_time",
        "_rtx_ts", "_rto_rtx_end",
        "_in_recovery", "_recover", "_dupacks", "_rto_recovery", "_high_rxt", "_rescue_done", "_rtx_log", "_relost",
        "_tlp_out", "_tlp_end", "_tlp_rearm", "_probe_seqs", "_probe_lost",
        # timers, output, events
        "_timers", "_out", "_events", "_ack_now", "_unacked_bytes", "_rcv_seg_max", "_last_recv",
        "_ka_probes", "_challenge_start", "_challenge_count", "_data_event_armed", "_send_blocked",
        # counters
        "segments_in", "segments_out", "retransmissions", "timeouts", "fast_retransmits", "dup_acks",
        "challenge_acks", "challenge_acks_suppressed", "invalid_segments", "paws_rejected", "ooo_segments",
        "zero_window_probes", "keepalive_probes_sent", "bytes_sent", "bytes_received", "bytes_acked",
        "loss_probes", "lost_retransmissions",
    )

    def __init__(self, local_port: int, remote_port: int, iss: SeqNum, config: TcpConfig, now: float) -> None:
        """Internal: use accept(), connect() or from_cookie()."""
        iss = SeqNum(iss)
        self.config = config
        self.local_port = local_port
        self.remote_port = remote_port
        self.state = State.CLOSED
        self.passive = False
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss
        self.snd_wnd = 0
        self.snd_wl1 = SeqNum(0)
        self.snd_wl2 = iss
        self.max_snd_wnd = 0
        self.snd_wscale = 0  # shift applied to the peer's window field
        self.irs = SeqNum(0)
        self.rcv_nxt = SeqNum(0)
        self.rcv_adv = SeqNum(0)
        self.rcv_wscale = 0  # shift applied to our window field
        self.peer_mss = DEFAULT_MSS
        self.send_mss = min(DEFAULT_MSS, config.mss)
        self.ws_ok = False
        self.sack_ok = False
        self.ts_ok = False
        self.ts_recent = 0
        self._ts_recent_time = now
        self._last_ack_sent = SeqNum(0)
        self._sndbuf = bytearray()  # unacknowledged and unsent data; byte 0 has sequence _buf_seq
        self._buf_seq = iss + 1
        self._fin_queued = False
        self._fin_seq = iss  # sequence number of our FIN once close() was called
        self._rcvbuf = bytearray()
        self._reasm = ReassemblyQueue(config.recv_buffer)
        self._rcv_fin_seq: SeqNum | None = None  # peer FIN seen beyond a gap
        self.peer_fin = False
        self._rtt = RttEstimator(config.initial_rto, config.min_rto, config.max_rto)
        self._cc = make_congestion_control(config.congestion, self.send_mss)
        self._scoreboard = SackScoreboard()
        self._rtx_nxt: SeqNum | None = None
        self._retries = 0
        self._rtt_seq: SeqNum | None = None
        self._rtt_time = 0.0
        self._rtx_ts: list[tuple[SeqNum, SeqNum, int]] = []  # (start, end, TSval) of retransmissions, in time order
        self._rto_rtx_end = iss  # end of that timeout's retransmission
        self._in_recovery = False
        self._recover = iss
        self._dupacks = 0
        # RFC 6675 state, used when SACK was negotiated: fast recovery (_in_recovery)
        # or the loss recovery after a timeout (_rto_recovery), both up to _recover.
        self._rto_recovery = False
        self._high_rxt = iss  # RFC 6675 HighRxt: end of the highest retransmission
        self._rescue_done = False  # RFC 6675 §4 NextSeg rule 4, once per recovery
        self._rtx_log: list[tuple[SeqNum, SeqNum, SeqNum]] = []  # (start, end, SND.NXT) of retransmissions
        self._relost: list[tuple[SeqNum, SeqNum]] = []  # retransmissions found lost again
        # RFC 8985 §7 tail loss probe (with SACK only): up to MAX_LOSS_PROBES per ACK of new data.
        self._tlp_out = 0  # probes sent since new data was last acknowledged
        self._tlp_end: SeqNum | None = None  # end of a retransmitted probe awaiting its verdict
        self._tlp_rearm = False  # new data sent or acknowledged: (re)start the PTO
        self._probe_seqs: list[SeqNum] = []  # starts of new-data probes not yet acknowledged
        self._probe_lost: SeqNum | None = None  # un-SACKed data below this was sent before a delivered probe
        self._timers: dict[Timer, float] = {}
        self._out: list[TcpSegment] = []
        self._events: deque[Event] = deque()
        self._ack_now = False
        self._unacked_bytes = 0
        self._rcv_seg_max = min(DEFAULT_MSS, config.mss)
        self._last_recv = now
        self._ka_probes = 0
        self._challenge_start = float("-inf")
        self._challenge_count = 0
        self._data_event_armed = True
        self._send_blocked = False
        self.segments_in = self.segments_out = self.retransmissions = self.timeouts = 0
        self.fast_retransmits = self.dup_acks = self.challenge_acks = self.challenge_acks_suppressed = 0
        self.invalid_segments = self.paws_rejected = self.ooo_segments = 0
        self.zero_window_probes = self.keepalive_probes_sent = 0
        self.bytes_sent = self.bytes_received = self.bytes_acked = 0
        self.loss_probes = self.lost_retransmissions = 0

    # == creation ====================================================================

    @classmethod
    def accept(cls, local_port: int, remote_port: int, syn: TcpSegment, iss: SeqNum, config: TcpConfig,
               now: float) -> Connection:
        """Passive open from a SYN the listener validated: SYN-RECEIVED, SYN-ACK queued."""
        if not syn.syn or syn.ack_flag or syn.rst:
            raise InvalidOperation("accept() needs a plain SYN")
        c = cls(local_port, remote_port, iss, config, now)
        c.passive = True
        # RFC 9293 §3.10.7.2 (LISTEN, third: SYN): RCV.NXT = SEG.SEQ+1, IRS = SEG.SEQ.
        c.irs = syn.seq
        c.rcv_nxt = syn.seq + 1
        c._negotiate(syn.options, now)
        c.state = State.SYN_RECEIVED
        # RFC 7323 §2.2: the window field of a SYN is never scaled.
        c.snd_wnd = c.max_snd_wnd = syn.window
        c.snd_wl1 = syn.seq
        c.snd_nxt = c.iss + 1
        c._send_syn(now)
        c._start_rtt(c.iss, now)
        c._timers[Timer.RETRANSMIT] = now + c._rtt.rto
        return c

    @classmethod
    def connect(cls, local_port: int, remote_port: int, iss: SeqNum, config: TcpConfig,
                now: float) -> Connection:
        """Active open: SYN-SENT with the SYN queued (RFC 9293 §3.10.1)."""
        c = cls(local_port, remote_port, iss, config, now)
        c.state = State.SYN_SENT
        c.snd_nxt = c.iss + 1
        c._send_syn(now)
        c._start_rtt(c.iss, now)
        c._timers[Timer.RETRANSMIT] = now + c._rtt.rto
        return c

    @classmethod
    def from_cookie(cls, local_port: int, remote_port: int, ack: TcpSegment, iss: SeqNum, peer_mss: int,
                    config: TcpConfig, now: float) -> Connection:
        """The final ACK of a SYN-cookie handshake (RFC 4987 §3.6): ESTABLISHED at once.

        Cookies keep only the MSS, so window scaling, SACK and timestamps are off.
        """
        iss = SeqNum(iss)
        if not ack.ack_flag or ack.syn or ack.rst or ack.ack != iss + 1:
            raise InvalidOperation("from_cookie() needs the ACK of the cookie SYN-ACK")
        c = cls(local_port, remote_port, iss, config, now)
        c.passive = True
        c.irs = ack.seq - 1
        c.rcv_nxt = ack.seq
        c.peer_mss = max(peer_mss or DEFAULT_MSS, MIN_PEER_MSS)
        c._set_send_mss()
        c.snd_una = c.snd_nxt = iss + 1
        c.snd_wnd = c.max_snd_wnd = ack.window
        c.snd_wl1 = ack.seq
        c.snd_wl2 = ack.ack
        # The cookie SYN-ACK advertised min(recv_buffer, 65535), unscaled.
        c.rcv_adv = c.rcv_nxt + min(config.recv_buffer, 0xFFFF)
        c.segments_in += 1
        c._last_recv = now
        c._established()
        c._process_text(ack.seq, ack.payload, ack.fin, now)
        return c

    def _negotiate(self, opts: TcpOptions, now: float) -> None:
        """Options of the peer's SYN (RFC 9293 §3.7.1, RFC 7323 §2.2/§3.2, RFC 2018 §2)."""
        cfg = self.config
        self.peer_mss = max(opts.mss or DEFAULT_MSS, MIN_PEER_MSS)
        # RFC 7323 §2.2: scaling only if both sides sent the option; §2.3: clamp to 14.
        if cfg.window_scaling and opts.window_scale is not None:
            self.ws_ok = True
            self.snd_wscale = min(opts.window_scale, MAX_WINDOW_SHIFT)
            self.rcv_wscale = window_shift(cfg.recv_buffer)
        # RFC 2018 §2: SACK only if both sent SACK-permitted.
        self.sack_ok = cfg.sack and opts.sack_permitted
        # RFC 7323 §3.2: timestamps only if both SYNs carry them.
        if cfg.timestamps and opts.timestamp is not None:
            self.ts_ok = True
            self.ts_recent = opts.timestamp[0]
            self._ts_recent_time = now
        self._set_send_mss()

    def _set_send_mss(self) -> None:
        # RFC 9293 §3.7.1: Eff.snd.MSS = min(SendMSS+20, MMS_S) - TCPhdrsize - IPoptionsize;
        # our MMS_S - 20 is config.mss, and timestamps take 12 bytes of every header.
        self.send_mss = min(self.peer_mss, self.config.mss) - (TS_OPTION_SPACE if self.ts_ok else 0)
        self._rcv_seg_max = min(DEFAULT_MSS, self._rcv_full())
        self._cc = make_congestion_control(self.config.congestion, self.send_mss)

    def _rcv_full(self) -> int:
        """Payload of a full-sized segment from the peer."""
        return self.config.mss - (TS_OPTION_SPACE if self.ts_ok else 0)

    # == application API =============================================================

    @property
    def send_space(self) -> int:
        """Free send-buffer bytes."""
        if self.state not in _APP_SEND or self._fin_queued:
            return 0
        return max(0, self.config.send_buffer - len(self._sndbuf))

    @property
    def readable(self) -> int:
        """Bytes waiting in the receive buffer."""
        return len(self._rcvbuf)

    @property
    def rto(self) -> float:
        return self._rtt.rto

    @property
    def srtt(self) -> float | None:
        return self._rtt.srtt

    @property
    def cwnd(self) -> int:
        return self._cc.cwnd

    @property
    def ssthresh(self) -> int:
        return self._cc.ssthresh

    @property
    def in_recovery(self) -> bool:
        return self._in_recovery

    def send(self, data: bytes) -> int:
        """Queue up to send_space bytes; return how many were accepted (0 = buffer full)."""
        if self.state not in _APP_SEND or self._fin_queued:
            raise InvalidOperation(f"send() in {self.state.value}{' after close()' if self._fin_queued else ''}")
        n = min(len(data), self.config.send_buffer - len(self._sndbuf))
        if n < len(data):
            self._send_blocked = True
        if n > 0:
            self._sndbuf += memoryview(data)[:n]
        return max(n, 0)

    def recv(self, max_bytes: int = -1) -> bytes:
        """Take up to max_bytes (all if negative) from the receive buffer; b"" if none."""
        buf = self._rcvbuf
        n = len(buf) if max_bytes < 0 else min(max_bytes, len(buf))
        self._data_event_armed = True
        if n == 0:
            return b""
        data = bytes(buf[:n])
        del buf[:n]
        # RFC 9293 §3.8.6.2.2 / RFC 1122 §4.2.3.3: reading opens the window; send a
        # window update when the right edge can move by two segments or half the
        # buffer (BSD's rule), so a peer stopped by a small window restarts.
        if self.state in _RECEIVES_TEXT:
            free = self.config.recv_buffer - len(buf)
            increase = free - max(0, self.rcv_adv - self.rcv_nxt)
            if increase >= min(2 * self.config.mss, self.config.recv_buffer // 2):
                self._ack_now = True
        return data

    def close(self) -> None:
        """Send FIN after the queued data (RFC 9293 §3.10.4); receiving continues (half-close)."""
        st = self.state
        if st in (State.SYN_SENT, State.LISTEN):
            # RFC 9293 §3.10.4: SYN-SENT: delete the TCB.
            self._close("closed")
            return
        if st not in (State.SYN_RECEIVED, State.ESTABLISHED, State.CLOSE_WAIT) or self._fin_queued:
            return  # already closing or closed: close() is idempotent
        self._fin_queued = True
        self._fin_seq = self._data_end()
        if st is State.ESTABLISHED:
            self.state = State.FIN_WAIT_1
        elif st is State.CLOSE_WAIT:
            self.state = State.LAST_ACK  # RFC 9293 §3.10.4 (RFC 793 said CLOSING, a known erratum)
        # SYN-RECEIVED: the FIN waits for ESTABLISHED (RFC 9293 §3.10.4).

    def abort(self) -> None:
        """Reset the connection now (RFC 9293 §3.10.5)."""
        if self.state in _ABORT_RST:
            self._send_rst(self.snd_nxt)
        if self.state is not State.CLOSED:
            self._close("aborted")

    def next_event(self) -> Event | None:
        """The next application event, or None."""
        return self._events.popleft() if self._events else None

    # == output ======================================================================

    def segments_to_send(self, now: float) -> list[TcpSegment]:
        """Everything to transmit now: retransmissions, new data, FIN, ACKs."""
        if self.state in _SENDS:
            self._output(now)
        if self._ack_now:
            if self.state not in (State.CLOSED, State.LISTEN, State.SYN_SENT):
                self._segment(self.snd_nxt, _ACK, b"", now)
            self._ack_now = False
        self._update_timers(now)
        out = self._out
        self._out = []
        self.segments_out += len(out)
        return out

    def get_timer(self) -> float | None:
        """The earliest deadline, or None."""
        return min(self._timers.values()) if self._timers else None

    def _data_end(self) -> SeqNum:
        """Sequence number after the last byte the application queued."""
        return self._buf_seq + len(self._sndbuf)

    def _has_unsent(self) -> bool:
        return (self._data_end() - self.snd_nxt) > 0 or (self._fin_queued and self.snd_nxt <= self._fin_seq)

    def _output(self, now: float) -> None:
        """Send what the windows allow: retransmissions first, then new data."""
        if self._in_recovery and self.sack_ok or self._rto_recovery:
            # 1. RFC 6675 §5 (C): lost segments while cwnd - pipe allows (in whole
            # segments), then new data in what is left (NextSeg rule 2), within rwnd.
            room = self._sack_recovery_output(now)
            edge = self.snd_nxt + (max(room, self.send_mss) if room > 0 else 0)
            wnd_edge = self.snd_una + self.snd_wnd
            if edge > wnd_edge:
                edge = wnd_edge
        else:
            edge = self.snd_una + min(self.snd_wnd, self._cc.cwnd)  # RFC 5681 §3.1: min(cwnd, rwnd)
            sacked = self._scoreboard.sacked_bytes
            if sacked and self.sack_ok:
                # SACKed data has left the network (RFC 6675 §4 pipe): a segment goes
                # out for each one, as RFC 3042 limited transmit does for the first
                # two duplicate ACKs; the new data brings the ACKs that reveal a loss.
                edge = self.snd_una + min(self.snd_wnd, self._cc.cwnd + sacked)
            elif self._dupacks and not self._in_recovery:
                # RFC 3042 §2 limited transmit: new data on the first two duplicate
                # ACKs, up to cwnd + 2*SMSS outstanding.
                extra = min(self._dupacks, 2) * self.send_mss
                edge = self.snd_una + min(self.snd_wnd, self._cc.cwnd + extra)
        # 1. Without SACK, after an RTO, resend from snd_una (go-back-N).
        sb = self._scoreboard
        while self._rtx_nxt is not None:
            start = self._rtx_nxt
            if start >= self.snd_nxt:
                self._rtx_nxt = None
                break
            start, end = self._unsacked_from(start)
            if start >= end:
                self._rtx_nxt = None
                break
            # In flight: what lies below start and was not SACKed (RFC 6675 §2 "pipe").
            sacked_below = sb.sacked_bytes - sb.sacked_above(start - 1) if sb.sacked_bytes else 0
            room = min(self._cc.cwnd - (start - self.snd_una - sacked_below), self.snd_una + self.snd_wnd - start)
            if room <= 0:
                self._rtx_nxt = start
                return
            used = self._send_range(start, min(end - start, room), now, rtx=True)
            if used == 0:
                self._rtx_nxt = None
                break
            self._rtx_nxt = start + used
        # 2. New data: sender SWS avoidance (RFC 9293 §3.8.6.2.1) and Nagle (§3.7.4).
        cfg = self.config
        while True:
            unsent = self._data_end() - self.snd_nxt
            fin_pending = self._fin_queued and self.snd_nxt <= self._fin_seq
            usable = edge - self.snd_nxt
            if unsent <= 0:
                # RFC 9293 §3.10.4: FIN once all data is segmentized; it needs one octet of window.
                if fin_pending and usable >= 1 and self.snd_wnd > 0:
                    self._send_range(self.snd_nxt, 1, now, rtx=False)
                    self.snd_nxt += 1
                return
            full = self._max_payload(0)
            n = min(unsent, usable, full)
            if n <= 0:
                return
            last = n == unsent
            if n >= min(self.send_mss, full):
                pass  # a full-sized segment
            elif last and fin_pending:
                pass  # the FIN goes with it: no reason to wait (Linux does the same)
            elif cfg.nagle and self.snd_nxt != self.snd_una:
                return  # RFC 9293 §3.7.4 Nagle: no small segment while data is unacknowledged
            elif last:
                pass  # SWS (2): all pushed data fits
            elif self.max_snd_wnd and n >= self.max_snd_wnd // 2:
                pass  # SWS (3): at least Fs = 1/2 of the largest window the peer offered
            else:
                return
            limit = n + 1 if last and fin_pending and usable > n else n
            used = self._send_range(self.snd_nxt, limit, now, rtx=False)
            if used == 0:
                return
            self.snd_nxt += used

    # == RFC 6675 loss recovery ======================================================

    def _lost_edge(self) -> SeqNum | None:
        """Un-SACKed data below this sequence number is deemed lost (RFC 6675 §4 IsLost)."""
        sb = self._scoreboard
        lost = sb.lost_edge(self.send_mss) if sb.sacked_bytes else None
        probe = self._probe_lost
        if probe is not None:
            if probe <= self.snd_una:
                self._probe_lost = None
            elif lost is None or lost < probe:
                lost = probe
        if self._rto_recovery:
            # RFC 6675 §5.1: after a timeout everything outstanding up to the
            # recovery point and not SACKed is presumed lost (go-back-N skipping SACKed).
            lost = self._recover if lost is None else seq_max(lost, self._recover)
        if lost is not None and lost > self.snd_nxt:
            lost = self.snd_nxt
        return lost

    def _pipe(self, lost: SeqNum | None) -> int:
        """RFC 6675 §4 SetPipe(): bytes presumed in flight, in O(SACK ranges)."""
        # Each un-SACKed byte counts once if not IsLost, and once more if it was
        # retransmitted (below HighRxt); retransmissions found lost again count nothing.
        una = self.snd_una
        sb = self._scoreboard
        pipe = (self.snd_nxt - una) - sb.sacked_bytes
        if lost is not None and lost > una:
            pipe -= (lost - una) - sb.sacked_below(lost)
        high = self._high_rxt
        if high > una:
            pipe += (high - una) - sb.sacked_below(high)
        for start, end in self._relost:
            pipe -= max(0, end - seq_max(start, una))
        return max(0, pipe)

    def _sack_recovery_output(self, now: float) -> int:
        """RFC 6675 §5 step (C) for retransmissions; returns cwnd - pipe left for new data.

        The loop runs while cwnd - pipe > 0 rather than >= 1 SMSS: cwnd is counted in
        whole segments, as Linux counts packets, so ssthresh = 2.5 SMSS after a small
        flight does not leave a lost retransmission waiting for the RTO.
        """
        mss = self.send_mss
        cwnd = self._cc.cwnd
        una = self.snd_una
        wnd_edge = una + self.snd_wnd
        lost = self._lost_edge()
        pipe = self._pipe(lost)
        # Retransmissions lost again (lost-retransmission detection, as RFC 8985
        # RACK finds them: data sent after the retransmission was SACKed) go first.
        relost = self._relost
        while relost and cwnd - pipe > 0:
            start, end = relost[0]
            s, e = self._unsacked_from(seq_max(start, una))
            if e > end:
                e = end
            if s >= e:
                relost.pop(0)
                continue
            if s >= wnd_edge:
                break
            used = self._send_range(s, min(e - s, max(mss, cwnd - pipe), wnd_edge - s), now, rtx=True)
            if not used:
                relost.pop(0)
                continue
            self._rtx_log.append((s, s + used, self.snd_nxt))
            self._tlp_rearm = True
            if s + used >= end:
                relost.pop(0)
            else:
                relost[0] = (s + used, end)
            pipe += used
        # NextSeg rule 1: the lowest IsLost un-SACKed data above HighRxt.
        while lost is not None and cwnd - pipe > 0:
            s, e = self._unsacked_from(seq_max(self._high_rxt, una))
            if e > lost:
                e = lost
            if s >= e or s >= wnd_edge:
                break
            # As many SMSS-sized segments as cwnd - pipe allows, in one TSO segment if
            # max_send_segment permits (a lost 64 KB segment is ~44 lost packets).
            used = self._send_range(s, min(e - s, max(mss, cwnd - pipe), wnd_edge - s), now, rtx=True)
            if not used:
                break
            self._high_rxt = s + used
            self._rtx_log.append((s, s + used, self.snd_nxt))
            self._tlp_rearm = True
            pipe += used
        # NextSeg rule 4 (rescue retransmission): nothing new to send in fast
        # recovery, so once per recovery resend the highest outstanding segment;
        # a lost tail then needs no timeout.
        if (self._in_recovery and not self._rescue_done and cwnd - pipe > 0
                and not self._has_unsent() and relost == []):
            top = self._scoreboard.highest_sacked
            start = seq_max(seq_max(self._high_rxt, una), self.snd_nxt - mss)
            if (top is None or top < self.snd_nxt) and start < self.snd_nxt and start < wnd_edge:
                self._rescue_done = True
                used = self._send_range(start, self.snd_nxt - start, now, rtx=True)
                pipe += used
        return cwnd - pipe

    def _detect_lost_retransmissions(self) -> None:
        """A retransmission is lost if data sent after it was SACKed and it was not."""
        top = self._scoreboard.highest_sacked
        if top is None:
            return
        una = self.snd_una
        keep = []
        found = False
        for entry in self._rtx_log:
            start, end, nxt = entry
            if end <= una:
                continue
            if top > nxt:
                s, e = self._unsacked_from(seq_max(start, una))
                if s < end:
                    self._relost.append((s, end))
                    self.lost_retransmissions += 1
                    found = True
                continue
            keep.append(entry)
        self._rtx_log = keep
        if found:
            self._relost.sort()

    def _tlp_verdict(self, seg: TcpSegment, now: float) -> None:
        """RFC 8985 §7.4: did the retransmitted probe repair a loss?"""
        blocks = seg.options.sack_blocks
        assert self._tlp_end is not None
        if blocks and (blocks[0][1] <= seg.ack or (len(blocks) > 1 and blocks[1][0] <= blocks[0][0]
                                                    and blocks[0][1] <= blocks[1][1])):
            self._tlp_end = None  # a D-SACK (RFC 2883 §4): the probe was a duplicate, nothing was lost
        elif self.snd_una >= self._tlp_end:
            # §7.4.2: the probe alone repaired a loss -- respond to congestion as for
            # a fast retransmit, without entering recovery.
            self._tlp_end = None
            if not (self._in_recovery or self._rto_recovery):
                self._cc.on_loss(self.snd_nxt - self.snd_una, now)

    def _probe_delivered(self) -> None:
        """RFC 8985 §6.2 (RACK), for probes only: data sent before a delivered probe is lost.

        A new-data probe leaves at least a PTO (2*SRTT) after everything below it,
        more than RACK's reordering window, so once it is SACKed, the un-SACKed data
        below it is lost -- even when too little is SACKed for RFC 6675 IsLost()
        (one lost TSO segment followed by a one-SMSS probe).
        """
        top = self._scoreboard.highest_sacked
        if top is None:
            return
        una = self.snd_una
        keep = []
        for start in self._probe_seqs:
            if start < una:
                continue
            if start < top and self._scoreboard.is_sacked(start):
                if self._probe_lost is None or self._probe_lost < start:
                    self._probe_lost = start
                continue
            keep.append(start)
        self._probe_seqs = keep

    def _on_loss_probe(self, now: float) -> None:
        """RFC 8985 §7.3: the PTO expired; send one probe to elicit an ACK."""
        if (self.snd_una == self.snd_nxt or self.state not in _SENDS or self._tlp_out >= MAX_LOSS_PROBES
                or self.snd_wnd == 0):  # a zero window is the persist timer's (RFC 9293 §3.8.6.1)
            return
        if self._in_recovery or self._rto_recovery:
            self._recovery_probe(now)
            return
        self._tlp_out += 1
        self._tlp_rearm = True
        self.loss_probes += 1
        una = self.snd_una
        unsent = self._data_end() - self.snd_nxt
        room = una + self.snd_wnd - self.snd_nxt
        if unsent > 0 and room > 0:
            # New data if the peer's window allows (cwnd does not limit a probe).
            start = self.snd_nxt
            used = self._send_range(start, min(unsent, room, self.send_mss), now, rtx=False)
            self.snd_nxt += used
            if used:
                self._probe_seqs.append(start)
        else:
            # Else the last segment sent, up to SMSS.
            start = seq_max(una, self.snd_nxt - self.send_mss)
            self._send_range(start, self.snd_nxt - start, now, rtx=True)
            self._tlp_end = self.snd_nxt
        self._timers[Timer.RETRANSMIT] = now + self._rtt.rto  # §7.3: rearm the RTO

    def _recovery_probe(self, now: float) -> None:
        """In recovery, no ACK for 2*SRTT after a retransmission: it was lost again.

        Our extension of RFC 8985: RACK (§6.2) deems a retransmission lost once a
        segment sent after it is delivered and RACK.rtt + reo_wnd has passed; when
        nothing was sent after it (cwnd - pipe < 1 SMSS after a small flight), no
        such segment exists and only the RTO (200 ms or more, cwnd to one segment)
        would notice.  Here the PTO stands in for that evidence: the oldest
        retransmission still unacknowledged is resent once per ACK of new data.
        """
        una = self.snd_una
        for k, (start, end, _nxt) in enumerate(self._rtx_log):
            if end <= una:
                continue
            s, e = self._unsacked_from(seq_max(start, una))
            if s >= end:
                continue
            e = min(e, end, s + self.send_mss, una + max(1, self.snd_wnd))
            if s >= e:
                return
            self._tlp_out += 1
            self._tlp_rearm = True
            self.loss_probes += 1
            used = self._send_range(s, e - s, now, rtx=True)
            self._rtx_log[k] = (s, s + used, self.snd_nxt)
            self._timers[Timer.RETRANSMIT] = now + self._rtt.rto  # RFC 8985 §7.3
            return

    def _arm_loss_probe(self, now: float) -> None:
        """RFC 8985 §7.2: PTO = 2*SRTT, plus WCDelAckT for a single outstanding segment."""
        srtt = self._rtt.srtt
        timers = self._timers
        if (not self.sack_ok or srtt is None or self._tlp_out >= MAX_LOSS_PROBES or self.snd_wnd == 0
                or self.snd_una == self.snd_nxt or self.state not in _SENDS):
            timers.pop(Timer.LOSS_PROBE, None)
            return
        pto = 2 * srtt
        if self.snd_nxt - self.snd_una <= self.send_mss and not (self._in_recovery or self._rto_recovery):
            pto = max(pto, 1.5 * srtt + WC_DEL_ACK_T)
        else:
            pto += PTO_SLACK  # timer granularity and ACK processing on a sub-millisecond path
        # Our extension: RFC 8985 §7 sends one probe per episode; a second one, after
        # twice the PTO, saves a 200 ms RTO when the probe itself is lost (5 % loss on
        # a sub-millisecond path makes that common).  The RTO still bounds them.
        deadline = now + pto * (1 << self._tlp_out)
        rto = timers.get(Timer.RETRANSMIT)
        if rto is not None and rto <= deadline:
            timers.pop(Timer.LOSS_PROBE, None)  # §7.2: the RTO comes first anyway
            return
        timers[Timer.LOSS_PROBE] = deadline

    def _end_recovery(self) -> None:
        self._in_recovery = False
        self._rto_recovery = False
        self._dupacks = 0
        self._rtx_log.clear()
        self._relost.clear()

    def _unsacked_from(self, start: SeqNum) -> tuple[SeqNum, SeqNum]:
        """The first range at or after start not SACKed by the peer, up to snd_nxt."""
        sb = self._scoreboard
        if self.sack_ok and sb.sacked_bytes:
            hole = sb.next_hole(start, self.snd_nxt)
            if hole is not None:
                return seq_max(hole[0], start), hole[1]
            top = sb.highest_sacked
            if top is not None and start < top:
                start = top
        return start, self.snd_nxt

    def _options(self, now: float) -> tuple[TcpOptions, int]:
        """Options of a non-SYN segment and their length: TS (RFC 7323 §3), SACK (RFC 2018 §3)."""
        ts = (ts_clock(now), self.ts_recent) if self.ts_ok else None
        blocks: tuple[tuple[SeqNum, SeqNum], ...] = ()
        if self.sack_ok and self._reasm.bytes_held:
            # RFC 2018 §3: at most 3 blocks next to a timestamp, 4 without.
            blocks = tuple(self._reasm.sack_blocks(3 if ts else 4))
        if ts is None and not blocks:
            return NO_OPTIONS, 0
        length = (TS_OPTION_SPACE if ts else 0) + (4 + 8 * len(blocks) if blocks else 0)
        return TcpOptions(sack_blocks=blocks, timestamp=ts), length

    def _max_payload(self, option_len: int) -> int:
        """Largest payload of one emitted segment (RFC 9293 §3.7.1, or the TSO limit)."""
        if self.config.max_send_segment is not None:
            return self.config.max_send_segment
        return min(self.peer_mss, self.config.mss) - option_len

    def _send_range(self, seq: SeqNum, limit: int, now: float, rtx: bool) -> int:
        """Emit one segment of up to ``limit`` sequence octets at seq (data, then our FIN).

        Returns the sequence space used; the caller moves its own pointer.
        """
        options, option_len = self._options(now)
        off = seq - self._buf_seq
        avail = len(self._sndbuf) - off
        n = max(0, min(limit, avail, self._max_payload(option_len)))
        fin = self._fin_queued and limit > n and seq + n == self._fin_seq
        if n == 0 and not fin:
            return 0
        payload = bytes(self._sndbuf[off:off + n]) if n else b""
        flags = _ACK_PSH if n and n == avail else _ACK
        if fin:
            flags |= _FIN
        self._segment(seq, flags, payload, now, options)
        if rtx:
            self.retransmissions += 1
            # RFC 6298 §3 (Karn): no sample across a retransmission -- not only of the
            # timed segment: its cumulative ACK also waits for the repaired hole below.
            self._rtt_seq = None
            if self.ts_ok:
                self._rtx_ts.append((seq, seq + n + fin, ts_clock(now)))
        else:
            self.bytes_sent += n
            self._start_rtt(seq, now)
            self._tlp_rearm = True  # RFC 8985 §7.2: after transmitting new data
        if Timer.RETRANSMIT not in self._timers:
            self._timers[Timer.RETRANSMIT] = now + self._rtt.rto  # RFC 6298 §5.1
        return n + fin

    def _segment(self, seq: SeqNum, flags: Flags, payload: bytes, now: float,
                 options: TcpOptions | None = None) -> None:
        """Queue a non-SYN segment; an ACK carries rcv_nxt and our current window."""
        if options is None:
            options = self._options(now)[0]
        window = self._advertise()
        self._last_ack_sent = self.rcv_nxt
        self._ack_now = False
        self._unacked_bytes = 0
        self._timers.pop(Timer.DELAYED_ACK, None)
        self._out.append(TcpSegment(self.local_port, self.remote_port, seq, self.rcv_nxt, flags, window,
                                    payload, options))

    def _advertise(self) -> int:
        """The window field to send; moves rcv_adv (honest, never shrinking, SWS-avoiding)."""
        cfg = self.config
        free = max(0, cfg.recv_buffer - len(self._rcvbuf))  # honest: free buffer space
        cur = max(0, self.rcv_adv - self.rcv_nxt)
        # RFC 9293 §3.8.6.2.2 receiver SWS avoidance: move the right edge only by
        # at least min(RCV.BUFF/2, Eff.snd.MSS); RFC 7323 §2.4: never shrink it.
        win = free if free - cur >= min(cfg.recv_buffer // 2, cfg.mss) else cur
        shift = self.rcv_wscale
        raw = win >> shift
        if (raw << shift) < cur:
            raw += 1  # rounding down would pull the right edge back
        raw = min(raw, 0xFFFF)
        edge = self.rcv_nxt + (raw << shift)
        if edge > self.rcv_adv:
            self.rcv_adv = edge
        return raw

    def _send_syn(self, now: float) -> None:
        """SYN (SYN-SENT) or SYN-ACK (SYN-RECEIVED) at ISS with our options."""
        cfg = self.config
        active = self.state is State.SYN_SENT
        # RFC 7323 §2.2: the window of a SYN is unscaled.
        window = min(max(0, cfg.recv_buffer - len(self._rcvbuf)), 0xFFFF)
        if active:
            opts = TcpOptions(
                mss=cfg.mss,
                window_scale=window_shift(cfg.recv_buffer) if cfg.window_scaling else None,
                sack_permitted=cfg.sack,
                timestamp=(ts_clock(now), 0) if cfg.timestamps else None,
            )
            self._out.append(TcpSegment(self.local_port, self.remote_port, self.iss, SeqNum(0), _SYN, window,
                                        options=opts))
            return
        # SYN-ACK: only options the peer offered (RFC 7323 §2.2, §3.2; RFC 2018 §2).
        opts = TcpOptions(
            mss=cfg.mss,
            window_scale=self.rcv_wscale if self.ws_ok else None,
            sack_permitted=self.sack_ok,
            timestamp=(ts_clock(now), self.ts_recent) if self.ts_ok else None,
        )
        self.rcv_adv = self.rcv_nxt + window
        self._last_ack_sent = self.rcv_nxt
        self._out.append(TcpSegment(self.local_port, self.remote_port, self.iss, self.rcv_nxt, _SYN_ACK, window,
                                    options=opts))

    def _send_rst(self, seq: SeqNum, ack: SeqNum | None = None) -> None:
        if ack is None:
            self._out.append(TcpSegment(self.local_port, self.remote_port, seq, SeqNum(0), _RST, 0))
        else:
            self._out.append(TcpSegment(self.local_port, self.remote_port, seq, ack, _RST_ACK, 0))

    def _challenge_ack(self, now: float) -> None:
        """RFC 5961 §3.2/§4.2/§5.2 challenge ACK, rate-limited (§7)."""
        if now - self._challenge_start >= 1.0:
            self._challenge_start = now
            self._challenge_count = 0
        if self._challenge_count >= CHALLENGE_ACK_LIMIT:
            self.challenge_acks_suppressed += 1
            return
        self._challenge_count += 1
        self.challenge_acks += 1
        self._ack_now = True

    def _start_rtt(self, seq: SeqNum, now: float) -> None:
        """Time one segment per RTT (RFC 6298 §3); the fallback when no timestamp echo is usable."""
        if self._rtt_seq is None:
            self._rtt_seq = seq
            self._rtt_time = now

    # == input =======================================================================

    def receive(self, seg: TcpSegment, now: float) -> None:
        """Process one incoming segment (any size)."""
        self.segments_in += 1
        st = self.state
        if st is State.CLOSED or st is State.LISTEN:
            self._reply_closed(seg)
        elif st is State.SYN_SENT:
            self._receive_syn_sent(seg, now)
        else:
            self._receive_synchronized(seg, now)

    def _reply_closed(self, seg: TcpSegment) -> None:
        """RFC 9293 §3.10.7.1: CLOSED answers everything but a RST with a RST."""
        if seg.rst:
            return
        if seg.ack_flag:
            self._send_rst(seg.ack)
        else:
            self._send_rst(SeqNum(0), seg.seq + seg.seg_len)

    def _receive_syn_sent(self, seg: TcpSegment, now: float) -> None:
        """RFC 9293 §3.10.7.3."""
        ack_ok = False
        if seg.ack_flag:
            # first: an ACK for something we never sent gets a RST.
            if seg.ack <= self.iss or seg.ack > self.snd_nxt:
                self.invalid_segments += 1
                if not seg.rst:
                    self._send_rst(seg.ack)
                return
            ack_ok = True
        if seg.rst:
            # second: RST counts only with an acceptable ACK (RFC 5961 §3.2 is satisfied by it).
            if ack_ok:
                self._close("reset")
            else:
                self.invalid_segments += 1
            return
        if not seg.syn:
            self.invalid_segments += 1  # fifth: neither SYN nor RST
            return
        # fourth: SYN.
        self.irs = seg.seq
        self.rcv_nxt = seg.seq + 1
        self._negotiate(seg.options, now)
        self._last_recv = now
        # The peer may send up to the unscaled window of our SYN until our next segment.
        self.rcv_adv = self.rcv_nxt + min(self.config.recv_buffer, 0xFFFF)
        self.snd_wnd = self.max_snd_wnd = seg.window  # RFC 7323 §2.2: unscaled in a SYN
        self.snd_wl1 = seg.seq
        self.snd_wl2 = seg.ack
        if ack_ok:
            self._ack_advance(seg, now)
            self._established()
            self._ack_now = True
            # "If there are other controls or text in the segment, continue at the sixth step."
            if seg.payload or seg.fin:
                self._process_text(seg.seq + 1, seg.payload, seg.fin, now)
            return
        # Simultaneous open (RFC 9293 §3.5 Figure 7): SYN-RECEIVED, send SYN,ACK at ISS.
        self.state = State.SYN_RECEIVED
        self._send_syn(now)

    def _receive_synchronized(self, seg: TcpSegment, now: float) -> None:
        """RFC 9293 §3.10.7.4, SYN-RECEIVED through TIME-WAIT."""
        st = self.state
        f = int(seg.flags)  # plain int: IntFlag arithmetic is slow on this path
        rst = f & _F_RST
        fin = f & _F_FIN != 0
        if st is State.SYN_RECEIVED and f & (_F_SYN | _F_ACK | _F_RST) == _F_SYN and seg.seq == self.irs:
            # Our SYN-ACK was lost and the peer retransmitted its SYN: repeat the SYN-ACK.
            self.retransmissions += 1
            self._rtt_seq = None
            self._rtx_ts.append((self.iss, self.iss + 1, ts_clock(now)))
            self._send_syn(now)
            return
        ts = seg.options.timestamp if self.ts_ok else None
        # RFC 7323 §5.3 R1 (PAWS), before the sequence test; RSTs are exempt (§5.2 note).
        if ts is not None and not rst and self._paws_reject(ts[0], now):
            self.paws_rejected += 1
            self._ack_now = True
            return
        # first: sequence number acceptability (four cases).
        if not self._acceptable(seg.seq, len(seg.payload) + (f & _F_SYN != 0) + fin):
            self.invalid_segments += 1
            if not rst:
                self._ack_now = True  # "send an acknowledgment ... and drop the segment"
                if st is State.TIME_WAIT and fin:
                    # TIME-WAIT: a retransmitted FIN is re-ACKed and restarts the 2 MSL timeout.
                    self._timers[Timer.TIME_WAIT] = now + 2 * self.config.msl
            return
        self._last_recv = now
        self._ka_probes = 0
        # RFC 7323 §4.3 (2): TS.Recent follows the segment that our last ACK covered.
        if ts is not None and SeqNum(ts[0]) >= SeqNum(self.ts_recent) and seg.seq <= self._last_ack_sent:
            self.ts_recent = ts[0]
            self._ts_recent_time = now
        # second: RST (RFC 5961 §3.2): exact match resets, anything else in window is challenged.
        # In CLOSING, LAST-ACK and TIME-WAIT the user already closed: no reset signal.
        if rst:
            if seg.seq == self.rcv_nxt:
                self._close("closed" if st in _CLOSED_BY_USER else "reset")
            else:
                self._challenge_ack(now)
            return
        # fourth: SYN in a synchronized state (RFC 5961 §4.2): challenge ACK, drop.
        if f & _F_SYN:
            self._challenge_ack(now)
            return
        # fifth: ACK.
        if not f & _F_ACK:
            self.invalid_segments += 1
            return
        if not self._process_ack(seg, fin, now):
            return
        # sixth (URG) is not supported; seventh and eighth: text and FIN.
        self._process_text(seg.seq, seg.payload, fin, now)

    def _paws_reject(self, tsval: int, now: float) -> bool:
        """RFC 7323 §5.3 R1: a timestamp older than TS.Recent marks an old duplicate."""
        if now - self._ts_recent_time > PAWS_IDLE_LIMIT:
            return False  # RFC 7323 §5.5: TS.Recent no longer valid
        return SeqNum(tsval) < SeqNum(self.ts_recent)

    def _acceptable(self, seq: SeqNum, seg_len: int) -> bool:
        """RFC 9293 §3.10.7.4 first: the four cases of the acceptability test."""
        wnd = max(0, self.rcv_adv - self.rcv_nxt)
        if seg_len == 0:
            if wnd == 0:
                return seq == self.rcv_nxt
            return seq.in_window(self.rcv_nxt, wnd)
        if wnd == 0:
            # Not acceptable, but "special allowance should be made to accept valid ACKs,
            # URGs, and RSTs": at rcv_nxt we go on with the controls; the text is trimmed away.
            return seq == self.rcv_nxt
        return seq.in_window(self.rcv_nxt, wnd) or (seq + seg_len - 1).in_window(self.rcv_nxt, wnd)

    def _process_ack(self, seg: TcpSegment, fin: bool, now: float) -> bool:
        """RFC 9293 §3.10.7.4 fifth; False if the segment is dropped."""
        ack = seg.ack
        st = self.state
        if st is State.SYN_RECEIVED:
            if not (self.snd_una < ack <= self.snd_nxt):
                self.invalid_segments += 1
                self._send_rst(ack)  # "form a reset segment <SEQ=SEG.ACK><CTL=RST>"
                return False
            self._established()
            self.snd_wnd = seg.window << self.snd_wscale
            self.max_snd_wnd = max(self.max_snd_wnd, self.snd_wnd)
            self.snd_wl1 = seg.seq
            self.snd_wl2 = ack
        # RFC 5961 §5.2: acceptable iff SND.UNA - MAX.SND.WND <= SEG.ACK <= SND.NXT.
        if ack > self.snd_nxt or ack < self.snd_una - self.max_snd_wnd:
            self.invalid_segments += 1
            self._challenge_ack(now)
            return False
        wnd = seg.window << self.snd_wscale
        # RFC 5681 §2 duplicate ACK: outstanding data, no text, no SYN/FIN, same ACK and window.
        dup = (ack == self.snd_una and self.snd_una != self.snd_nxt and not seg.payload and not fin
               and wnd == self.snd_wnd and wnd > 0)
        # RFC 9293 §3.10.7.4: update the send window only from a newer segment (SND.WL1/WL2).
        if self.snd_una <= ack and (self.snd_wl1 < seg.seq or (self.snd_wl1 == seg.seq and self.snd_wl2 <= ack)):
            if wnd and self.snd_wnd == 0:
                self._timers.pop(Timer.ZERO_WINDOW_PROBE, None)
            self.snd_wnd = wnd
            self.max_snd_wnd = max(self.max_snd_wnd, wnd)
            self.snd_wl1 = seg.seq
            self.snd_wl2 = ack
        if self.snd_wnd == 0:
            self._retries = 0  # RFC 9293 §3.8.6.1: a peer answering probes is alive
        acked = 0
        if ack > self.snd_una:
            acked = ack - self.snd_una - (self.snd_una == self.iss)  # the SYN is no data
            self._ack_advance(seg, now)
        if self.sack_ok and seg.options.sack_blocks:
            self._scoreboard.update(seg.options.sack_blocks, self.snd_una, self.snd_nxt)
        if self._tlp_end is not None:
            self._tlp_verdict(seg, now)
        if self._probe_seqs and seg.options.sack_blocks and self.sack_ok:
            self._probe_delivered()
        if (self._rtx_log and seg.options.sack_blocks and self.sack_ok
                and (self._in_recovery or self._rto_recovery)):
            self._detect_lost_retransmissions()
        if acked > 0:
            self._congestion_on_ack(acked, now)
        elif dup:
            self._on_dup_ack(now)
        if (not self._in_recovery and not self._rto_recovery and seg.options.sack_blocks and self.sack_ok
                and self.snd_una >= self._recover
                and (self._scoreboard.is_lost(self.snd_una, self.send_mss)
                     or (self._probe_lost is not None and self._probe_lost > self.snd_una))):
            # RFC 6675 §5: enough SACKed above SND.UNA marks it lost without three
            # pure duplicate ACKs (ACKs on data, or one ACK per GRO batch, are not).
            self._enter_recovery(now)
        # State-specific ACK processing: our FIN acknowledged.
        if self._fin_queued and self.snd_una > self._fin_seq:
            st = self.state
            if st is State.FIN_WAIT_1:
                self.state = State.FIN_WAIT_2
            elif st is State.CLOSING:
                self._enter_time_wait(now)  # text step still re-ACKs a repeated FIN
            elif st is State.LAST_ACK:
                self._close("closed")
                return False
        return True

    def _ack_advance(self, seg: TcpSegment, now: float) -> None:
        """SND.UNA moves to SEG.ACK: free the acknowledged bytes, sample RTT, restart the timer."""
        ack = seg.ack
        old_una = self.snd_una
        self.bytes_acked += ack - self.snd_una
        n = ack - self._buf_seq
        if n > 0:
            n = min(n, len(self._sndbuf))
            del self._sndbuf[:n]
            self._buf_seq += n
        self.snd_una = ack
        self._retries = 0
        self._tlp_out = 0
        self._tlp_rearm = True  # RFC 8985 §7.2: on an ACK of new data
        # RTT: from the timestamp echo (RFC 7323 §4.1), else the one timed segment (RFC 6298 §3).
        ts = seg.options.timestamp if self.ts_ok else None
        timed = self._rtt_seq is not None and ack > self._rtt_seq
        last_rtx_ts = None  # TSval of the latest retransmission of the data just acknowledged
        if self._rtx_ts:
            for start, end, tsval in self._rtx_ts:
                if start < ack and end > old_una:
                    last_rtx_ts = tsval  # entries are in time order: the last match wins
            self._rtx_ts = [entry for entry in self._rtx_ts if entry[1] > ack]
        if ts is not None and ts[1] != 0 and (ts_clock(now) - ts[1]) & 0xFFFFFFFF <= MAX_TS_RTT_MS:
            # RFC 7323 §4.1: an echo times the transmission it answers, retransmitted
            # or not -- except that an echo older than the latest retransmission of the
            # acknowledged data may answer a duplicate with an earlier TSval (RFC 7323
            # §4.3: our retransmission or probe was spurious, the ACK was lost): that
            # "RTT" includes the RTO or PTO, and SRTT would creep up.  Rejecting only
            # those keeps samples coming under loss, so RTO backoff collapses (RFC
            # 6298 §5.7 note) instead of compounding timeout after timeout.
            stale = last_rtx_ts is not None and SeqNum(ts[1]) < SeqNum(last_rtx_ts)
            if not stale:
                self._rtt.sample(((ts_clock(now) - ts[1]) & 0xFFFFFFFF) / 1000)
        elif timed:
            self._rtt.sample(max(0.0, now - self._rtt_time))
        if timed:
            self._rtt_seq = None
        if self._rtt.backoffs and old_una < self._rto_rtx_end <= ack and self.snd_wnd > 0:
            # The timer's own retransmission was acknowledged: the path delivers within
            # the base RTO.  RFC 6298 §5.7's note collapses the backoff only with a new
            # RTT sample, which go-back-N without timestamps never yields (Karn: every
            # segment below SND.NXT was retransmitted); each further random loss then
            # doubled the RTO again -- 0.2 s became 25 s, a 30 s stall under 5 % loss.
            # Our choice: collapse here (the RTO is still at least min_rto).
            self._rtt.collapse()
        if old_una == self.iss and self.timeouts:
            # Our SYN or SYN-ACK was lost.  RFC 6298 §5.7: without an RTT sample, start
            # data transfer with RTO = 3 s; RFC 5681 §3.1: with an initial window of 1 SMSS.
            if self._rtt.srtt is None:
                cfg = self.config
                self._rtt = RttEstimator(max(3.0, cfg.initial_rto), cfg.min_rto, cfg.max_rto)
            self._cc.cwnd = self.send_mss
        if self._rtx_nxt is not None and self._rtx_nxt < ack:
            self._rtx_nxt = ack
        self._scoreboard.advance(ack)
        # RFC 6298 §5.2/§5.3: stop the timer when all is acknowledged, else restart it.
        if ack == self.snd_nxt:
            self._timers.pop(Timer.RETRANSMIT, None)
        else:
            self._timers[Timer.RETRANSMIT] = now + self._rtt.rto
        if self._send_blocked and self.send_space >= max(1, self.config.send_buffer // 2):
            self._send_blocked = False
            self._events.append(SendSpace())

    def _congestion_on_ack(self, acked: int, now: float) -> None:
        """New data acknowledged: grow cwnd, or NewReno partial/full ACK (RFC 6582 §3.2)."""
        cc = self._cc
        if self._rto_recovery and self.snd_una >= self._recover:
            self._end_recovery()  # RFC 6675 §5.1: the timeout's recovery is over
        if not self._in_recovery:
            self._dupacks = 0
            cc.on_ack(acked, now, self._rtt.srtt)  # slow start after a timeout too
            return
        if self.snd_una >= self._recover:
            # step 3, full acknowledgment: deflate to ssthresh and leave fast recovery
            # (RFC 6675 §5 step (A): recovery ends when HighACK >= RecoveryPoint).
            self._end_recovery()
            cc.on_recovery_exit(now)
            return
        if self.sack_ok:
            return  # RFC 6675 §5: no window change; _output sends by pipe
        # step 5, partial acknowledgment: retransmit the next hole, deflate by the
        # amount acknowledged, add back one SMSS if that was at least one SMSS.
        mss = self.send_mss
        cc.cwnd = max(mss, cc.cwnd - acked + (mss if acked >= mss else 0))
        self._retransmit_hole(now)

    def _on_dup_ack(self, now: float) -> None:
        """RFC 5681 §3.2 / RFC 6582 §3.2 steps 1, 2 and 4."""
        self.dup_acks += 1
        self._dupacks += 1
        cc = self._cc
        if self._in_recovery:
            if not self.sack_ok:
                cc.cwnd += self.send_mss  # step 4: inflate by one SMSS per duplicate ACK
            return  # with SACK, RFC 6675 counts pipe instead of inflating
        # step 2: only if the ACK covers more than recover (no second reduction per window).
        # With SACK the scoreboard tells new losses from old ones, so a loss right at
        # the recovery point may start a new recovery (RFC 6675 §5 ends the old one
        # when HighACK >= RecoveryPoint); without it, that would be a second reduction
        # for one window of data.
        covered = self.snd_una >= self._recover if self.sack_ok else self.snd_una > self._recover
        if self._dupacks == DUP_ACK_THRESHOLD and covered and not self._rto_recovery:
            self._enter_recovery(now)

    def _enter_recovery(self, now: float) -> None:
        """Fast retransmit and enter fast recovery (RFC 6582 §3.2 step 2)."""
        cc = self._cc
        self.fast_retransmits += 1
        self._recover = self.snd_nxt
        cc.on_loss(self.snd_nxt - self.snd_una, now)
        self._in_recovery = True
        if self.sack_ok:
            # RFC 6675 §5 steps (4.1)-(4.3): RecoveryPoint = HighData, cwnd = ssthresh,
            # retransmit the first segment now; (4.4) the rest by pipe in _output.
            self._rto_recovery = False
            self._rescue_done = False
            self._rtx_log.clear()
            self._relost.clear()
            used = self._send_range(self.snd_una, min(self.snd_nxt - self.snd_una, self.send_mss), now, rtx=True)
            self._high_rxt = self.snd_una + used
            self._rtx_log.append((self.snd_una, self._high_rxt, self.snd_nxt))
            self._tlp_rearm = True
            return
        cc.cwnd = cc.ssthresh + DUP_ACK_THRESHOLD * self.send_mss
        self._retransmit_hole(now)

    def _retransmit_hole(self, now: float) -> None:
        """NewReno (no SACK): retransmit the first unacknowledged segment (RFC 6582 §3.2 steps 2, 5)."""
        start = self.snd_una
        end = self.snd_nxt
        if start >= end:
            return
        # One segment (RFC 5681 §3.2 step 3), however large segments may otherwise be.
        self._send_range(start, min(end - start, self.send_mss), now, rtx=True)

    def _process_text(self, seq: SeqNum, payload: bytes, fin: bool, now: float) -> None:
        """RFC 9293 §3.10.7.4 seventh (segment text) and eighth (FIN)."""
        st = self.state
        if st not in _RECEIVES_TEXT:
            # CLOSE-WAIT, CLOSING, LAST-ACK, TIME-WAIT: the peer's FIN came already;
            # a retransmitted FIN is acknowledged (and restarts TIME-WAIT's 2 MSL).
            if fin or payload:
                self._ack_now = True
                if st is State.TIME_WAIT and fin:
                    self._timers[Timer.TIME_WAIT] = now + 2 * self.config.msl
            return
        n = len(payload)
        if n:
            self._receive_bytes(seq, payload, now)
        if fin:
            fin_seq = seq + n
            if fin_seq <= self.rcv_adv and fin_seq >= self.rcv_nxt:
                self._rcv_fin_seq = fin_seq
            elif fin_seq > self.rcv_adv:
                self._ack_now = True  # FIN beyond the window: trimmed away
        if self._rcv_fin_seq is not None and self._rcv_fin_seq == self.rcv_nxt:
            self._receive_fin(now)

    def _receive_bytes(self, seq: SeqNum, payload: bytes, now: float) -> None:
        """Trim to [rcv_nxt, rcv_adv), deliver in order, queue beyond a gap."""
        view = memoryview(payload)
        left = self.rcv_nxt - seq
        if left > 0:
            view = view[left:]  # RFC 9293 §3.10.7.4: trim what was received already
            seq = self.rcv_nxt
        right = (seq + len(view)) - self.rcv_adv
        if right > 0:
            view = view[:len(view) - right]  # beyond the window we advertised
            self._ack_now = True
        if not view:
            self._ack_now = True
            return
        self._rcv_seg_max = max(self._rcv_seg_max, min(len(payload), self._rcv_full()))
        if seq != self.rcv_nxt:
            # Out of order: hold it, and ACK at once so the sender sees the gap
            # (RFC 5681 §4.2; the SACK blocks ride on that ACK, RFC 2018 §4).
            self.ooo_segments += 1
            if self._ack_now:
                # RFC 5681 §4.2: one duplicate ACK per out-of-order segment, even when
                # several arrive before the shell asks for output; the sender counts them.
                self._segment(self.snd_nxt, _ACK, b"", now)
            self._reasm.add(seq, view, self.rcv_nxt)
            self._ack_now = True
            return
        delivered = len(view)
        self._rcvbuf += view
        self.rcv_nxt += delivered
        if self._reasm.bytes_held:
            more = self._reasm.pop(self.rcv_nxt)
            if more:
                self._rcvbuf += more
                self.rcv_nxt += len(more)
                delivered += len(more)
                self._ack_now = True  # RFC 5681 §4.2: ACK at once when a gap is filled
        self.bytes_received += delivered
        if self._data_event_armed:
            self._data_event_armed = False
            self._events.append(DataReceived())
        # RFC 9293 §3.8.6.3 / RFC 5681 §4.2: delay ACKs, but ACK at least every second full segment.
        self._unacked_bytes += delivered
        if self._unacked_bytes >= 2 * self._rcv_seg_max:
            self._ack_now = True
        elif Timer.DELAYED_ACK not in self._timers:
            self._timers[Timer.DELAYED_ACK] = now + self.config.delayed_ack

    def _receive_fin(self, now: float) -> None:
        """RFC 9293 §3.10.7.4 eighth: the peer's FIN, in order."""
        self._rcv_fin_seq = None
        self.rcv_nxt += 1
        self.peer_fin = True
        self._ack_now = True
        self._events.append(PeerClosed())
        st = self.state
        if st is State.ESTABLISHED:
            self.state = State.CLOSE_WAIT
        elif st is State.FIN_WAIT_1:
            if self._fin_queued and self.snd_una > self._fin_seq:
                self._enter_time_wait(now)
            else:
                self.state = State.CLOSING  # simultaneous close
        elif st is State.FIN_WAIT_2:
            self._enter_time_wait(now)

    # == state changes ===============================================================

    def _established(self) -> None:
        self.state = State.FIN_WAIT_1 if self._fin_queued else State.ESTABLISHED
        self._retries = 0
        self._events.append(Connected())

    def _enter_time_wait(self, now: float) -> None:
        self.state = State.TIME_WAIT
        self._timers.clear()
        self._timers[Timer.TIME_WAIT] = now + 2 * self.config.msl  # RFC 9293 §3.10.7.4
        self._sndbuf.clear()

    def _close(self, reason: str) -> None:
        self.state = State.CLOSED
        self._timers.clear()
        self._sndbuf.clear()
        self._reasm.clear()
        self._events.append(Closed(reason))

    # == timers ======================================================================

    def handle_timer(self, now: float) -> None:
        """Fire every timer due at now."""
        for timer, deadline in sorted(self._timers.items(), key=lambda kv: kv[1]):
            if deadline > now or self._timers.get(timer) != deadline:
                continue
            del self._timers[timer]
            if timer is Timer.RETRANSMIT:
                self._on_retransmit_timer(now)
            elif timer is Timer.ZERO_WINDOW_PROBE:
                self._on_zero_window_probe(now)
            elif timer is Timer.DELAYED_ACK:
                self._ack_now = True
            elif timer is Timer.LOSS_PROBE:
                self._on_loss_probe(now)
            elif timer is Timer.KEEPALIVE:
                self._on_keepalive(now)
            elif timer is Timer.TIME_WAIT:
                self._close("closed")
            if self.state is State.CLOSED:
                return

    def _on_retransmit_timer(self, now: float) -> None:
        """RFC 6298 §5.4-§5.6 for SYN, SYN-ACK, data and FIN."""
        st = self.state
        if st is State.SYN_SENT or st is State.SYN_RECEIVED:
            if self._retries >= self.config.max_syn_retries:
                self._close("timeout")
                return
            self._retries += 1
            self.retransmissions += 1
            self.timeouts += 1
            self._rtt.backoff()
            self._rtt_seq = None
            self._rtx_ts.append((self.iss, self.iss + 1, ts_clock(now)))  # no echo sample of the first
            self._send_syn(now)
            self._timers[Timer.RETRANSMIT] = now + self._rtt.rto
            return
        if self.snd_una == self.snd_nxt or st not in _SENDS:
            return
        if self._retries >= self.config.max_retries:
            self._close("timeout")  # RFC 9293 §3.8.3 R2
            return
        self._retries += 1
        self.timeouts += 1
        if self.snd_wnd > 0:
            # RFC 5681 §3.1: loss window; RFC 6582 §4: recover = highest sent, leave recovery.
            self._cc.on_rto(self.snd_nxt - self.snd_una, now)
            self._recover = self.snd_nxt
            self._end_recovery()
        self._rtt.backoff()  # §5.5
        # §5.4: retransmit the earliest unacknowledged segment now (even into a zero
        # window: then it is the probe of RFC 9293 §3.8.6.1), the rest goes back-N.
        limit = min(self.snd_nxt - self.snd_una, self.send_mss) if self.snd_wnd > 0 else 1
        self._tlp_end = None
        self._timers.pop(Timer.LOSS_PROBE, None)
        used = self._send_range(self.snd_una, limit, now, rtx=True)
        self._rto_rtx_end = self.snd_una + used
        if self._retries > 1:
            # The same segment timed out again: the receiver may have reneged on what it
            # SACKed (RFC 2018 §8), so stop skipping that data (RFC 6675 §5.1).
            self._scoreboard.clear()
        if self.sack_ok and self.snd_wnd > 0:
            # RFC 6675 §5.1: resend what is not SACKed up to the recovery point, by
            # pipe, and do not enter fast recovery again before it is acknowledged.
            self._rto_recovery = True
            self._high_rxt = self.snd_una + used
            self._rtx_log.append((self.snd_una, self._high_rxt, self.snd_nxt))
            self._tlp_out = 0
            self._tlp_rearm = True
        else:
            self._rtx_nxt = self.snd_una + used
        self._timers[Timer.RETRANSMIT] = now + self._rtt.rto  # §5.6

    def _on_zero_window_probe(self, now: float) -> None:
        """The persist timer: data waits, nothing is in flight to bring an ACK.

        Zero window: one octet of new data (RFC 9293 §3.8.6.1).  Small window:
        the sender SWS override timeout (RFC 9293 §3.8.6.2.1), send what fits, so
        a lost window update cannot stall the connection.
        """
        if self.snd_una != self.snd_nxt or self.state not in _SENDS:
            return
        limit = max(1, min(self.snd_wnd, self._cc.cwnd))
        used = self._send_range(self.snd_nxt, limit, now, rtx=False)
        if not used:
            return
        self.snd_nxt += used
        if self.snd_wnd == 0:
            self.zero_window_probes += 1
            # The octet is now outstanding: the retransmission timer repeats the
            # probe, backing off exponentially, until the window opens.
            self._rtt.backoff()
        self._timers[Timer.RETRANSMIT] = now + self._rtt.rto

    def _on_keepalive(self, now: float) -> None:
        """RFC 9293 §3.8.4: probe an idle connection with SEG.SEQ = SND.NXT - 1."""
        cfg = self.config
        if cfg.keepalive is None or self.state not in _KEEPALIVE_STATES:
            return
        idle_deadline = self._last_recv + cfg.keepalive  # the same float as the armed deadline
        if self._ka_probes == 0 and now < idle_deadline:
            self._timers[Timer.KEEPALIVE] = idle_deadline
            return
        if self._ka_probes >= cfg.keepalive_probes:
            self._close("timeout")
            return
        self._ka_probes += 1
        self.keepalive_probes_sent += 1
        self._segment(self.snd_nxt - 1, _ACK, b"", now)
        self._timers[Timer.KEEPALIVE] = now + cfg.keepalive_interval

    def _update_timers(self, now: float) -> None:
        """Arm or cancel timers to match the state after a driver call."""
        st = self.state
        timers = self._timers
        if st is State.CLOSED or st is State.TIME_WAIT:
            return
        # RFC 6298 §5.1/§5.2: the retransmission timer runs while anything is outstanding.
        if self.snd_una == self.snd_nxt:
            timers.pop(Timer.RETRANSMIT, None)
        elif Timer.RETRANSMIT not in timers:
            timers[Timer.RETRANSMIT] = now + self._rtt.rto
        if self._tlp_rearm:
            self._tlp_rearm = False
            self._arm_loss_probe(now)
        elif Timer.LOSS_PROBE in timers and self.snd_una == self.snd_nxt:
            timers.pop(Timer.LOSS_PROBE, None)
        # Persist: data held back (zero window, RFC 9293 §3.8.6.1, or sender SWS
        # avoidance, §3.8.6.2.1) with nothing outstanding: probe after one RTO.
        if self.snd_una == self.snd_nxt and st in _SENDS and self._has_unsent():
            if Timer.ZERO_WINDOW_PROBE not in timers:
                timers[Timer.ZERO_WINDOW_PROBE] = now + self._rtt.rto
        else:
            timers.pop(Timer.ZERO_WINDOW_PROBE, None)
        # RFC 9293 §3.8.4: keepalive after idle time, off unless configured.
        if self.config.keepalive is not None and st in _KEEPALIVE_STATES:
            if self._ka_probes == 0:
                timers[Timer.KEEPALIVE] = self._last_recv + self.config.keepalive
        else:
            timers.pop(Timer.KEEPALIVE, None)

    def __repr__(self) -> str:
        return (f"Connection({self.local_port}->{self.remote_port} {self.state.value} "
                f"snd_una={int(self.snd_una)} snd_nxt={int(self.snd_nxt)} rcv_nxt={int(self.rcv_nxt)})")
