"""One TCP connection as a sans-IO state machine (RFC 9293).

Rules of this module (h11 ``_state.py`` style):

* The connection owns the states, the TCB's sequence variables (RFC 9293
  §3.3.1: ``iss``, ``snd_una``, ``snd_nxt``, ``snd_wnd``, ``snd_wl1``, ``snd_wl2``,
  ``irs``, ``rcv_nxt``, ``rcv_adv``), the RFC 9293 §3.10 event processing and the
  application interface.  It calls downward only, into its roles (gVisor's
  split): :mod:`sender` (send buffer, Nagle, SWS, segments, RTT, cwnd, RTO,
  persist, keepalive), :mod:`receiver` (acceptability, text, reassembly, window,
  ACKs), :mod:`recovery` (repair, PRR, loss probes) with :mod:`rack` (RFC 8985
  loss detection from per-segment send times), :mod:`options` (what the SYNs
  agreed, one frozen value) and :mod:`timers` (one table of deadlines).  Each
  role reads the TCB through its ``c`` reference, as gVisor's sender reads
  ``s.ep``; none calls back into the state machine.
* It never reads a clock or a socket.  Drivers: ``receive(seg, now, ce)``,
  ``handle_timer(now)`` and the application calls ``send``/``recv``/``close``/
  ``shutdown``/``abort``.  Outputs: ``segments_to_send(now)`` (drains),
  ``next_event()``, ``get_timer()`` (earliest deadline) and ``ect(seg)``.  The
  shell calls ``segments_to_send`` and ``get_timer`` after every driver call; new
  data and pure ACKs are built there, so an ACK rides on data whenever it can.
* Two kinds of error: a misbehaving peer is answered as the RFCs say (ACK,
  challenge ACK, RST, drop) and counted, never raised; misuse by the caller
  raises :class:`InvalidOperation`.
* No logging: the shell compares ``state`` before and after each call and logs
  transitions itself; counters are plain int attributes.
* Every sequence number is a plain int in [0, 2**32), compared and moved
  only with :mod:`pipeline.wire.seqnum` (``seq_lt``, ``seq_add``, ``seq_sub``...).
  Nothing assumes one MSS per segment: incoming segments may be 64 KB
  (GRO/TSO) and outgoing ones up to ``config.max_send_segment``.

Closing: ``close()`` sends our FIN after the data and keeps receiving, and then
FIN-WAIT-2 lasts at most ``config.fin_wait2_timeout`` (Linux ``tcp_fin_timeout``
for a closed socket), so a peer that never sends its FIN cannot pin the
connection; ``shutdown()`` is the half-close that waits for the peer's FIN as
long as it takes (Linux ``shutdown(SHUT_WR)``).

ECN (RFC 3168 §6.1): an ECN-setup SYN is answered with an ECN-setup SYN-ACK
(``config.ecn``); ``receive(..., ce=True)`` starts the ECE echo, the peer's CWR
stops it; ECE reduces cwnd once per window and the next new data carries CWR;
``ect(seg)`` tells the shell which segments of the last batch to send ECT(0).

Not implemented: urgent data (URG is ignored and its bytes are ordinary data,
RFC 6093), data in SYN segments (not acknowledged, so the peer resends it),
TIME-WAIT reuse by a new SYN (the demultiplexer's).  Once timestamps are
negotiated, a segment without one is still accepted (as Linux does; RFC 7323 §3.2
says SHOULD drop).
"""

from __future__ import annotations

import enum

from pipeline.wire.seqnum import seq_add, seq_gt, seq_le, seq_lt
from pipeline.wire.tcp import Flags, TcpOptions, TcpSegment
from workers.tcp.config import TcpConfig
from workers.tcp.errors import InvalidOperation
from workers.tcp.events import Closed, Connected, Event, PeerClosed
from workers.tcp.options import DEFAULT, MAX_WINDOW_SHIFT, Negotiated, syn_options, window_shift
from workers.tcp.receiver import CHALLENGE_ACK_LIMIT, Receiver, ts_clock
from workers.tcp.recovery import Recovery
from workers.tcp.segments import reset_for, syn_ack
from workers.tcp.sender import Sender
from workers.tcp.timers import Timer, TimerTable

# Re-exported for the demultiplexer and tests, which import them from here.
__all__ = ["CHALLENGE_ACK_LIMIT", "MAX_WINDOW_SHIFT", "Connection", "InvalidOperation", "Negotiated", "State", "Timer",
           "ts_clock", "window_shift"]

_ACK = Flags.ACK
_RST = Flags.RST
_F_FIN, _F_SYN, _F_RST, _F_ACK, _F_ECE, _F_CWR = 0x01, 0x02, 0x04, 0x10, 0x40, 0x80


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

    __hash__ = object.__hash__  # identity, in C: the state sets below are tested on every segment


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


# Counters: plain ints the shell logs when a connection closes.
_COUNTERS = (
    "segments_in", "segments_out", "retransmissions", "timeouts", "fast_retransmits", "dup_acks",
    "challenge_acks", "challenge_acks_suppressed", "invalid_segments", "paws_rejected", "ooo_segments",
    "zero_window_probes", "keepalive_probes_sent", "bytes_sent", "bytes_received", "bytes_acked",
    "loss_probes", "lost_retransmissions", "ce_received", "ece_received",
)


def _ecn_setup_syn(seg: TcpSegment) -> bool:
    """RFC 3168 §6.1.1: an ECN-setup SYN carries ECE and CWR."""
    return int(seg.flags) & (_F_ECE | _F_CWR) == _F_ECE | _F_CWR


class Connection:
    """A TCP connection; create with :meth:`accept`, :meth:`connect` or :meth:`from_cookie`."""

    __slots__ = (
        "config", "local_port", "remote_port", "state", "passive", "options", "send_mss", "peer_fin",
        # RFC 9293 §3.3.1 send and receive sequence variables
        "iss", "snd_una", "snd_nxt", "snd_wnd", "snd_wl1", "snd_wl2", "max_snd_wnd", "irs", "rcv_nxt", "rcv_adv",
        # roles, timers, output, events
        "sender", "receiver", "recovery", "timers", "_out", "_events", "_orphan",
        "last_recv", "ka_probes", "soft_error",
        *_COUNTERS,
    )

    def __init__(self, local_port: int, remote_port: int, iss: int, config: TcpConfig, now: float) -> None:
        """Internal: use accept(), connect() or from_cookie()."""
        self.config = config
        self.local_port = local_port
        self.remote_port = remote_port
        self.state = State.CLOSED
        self.passive = False
        self.options = DEFAULT
        self.send_mss = DEFAULT.send_mss(config)
        self.peer_fin = False
        self.iss = self.snd_una = self.snd_nxt = self.snd_wl2 = iss
        self.snd_wnd = self.max_snd_wnd = 0
        self.snd_wl1 = self.irs = self.rcv_nxt = self.rcv_adv = 0
        self.timers = TimerTable()
        self._out: list[TcpSegment] = []
        self._events: list[Event] = []  # a few at most: a list is 700 bytes lighter per connection than a deque
        self._orphan = False  # close() (not shutdown()) was called: FIN-WAIT-2 is bounded
        # RFC 9293 §3.8.4 keepalive: when the peer was last heard, probes unanswered since.
        self.last_recv = now
        self.ka_probes = 0
        self.soft_error: str | None = None  # the last ICMP soft error (RFC 1122 §4.2.3.9)
        # _COUNTERS, spelled out so that the compiled class has them as typed fields.
        self.segments_in = self.segments_out = self.retransmissions = self.timeouts = self.fast_retransmits = 0
        self.dup_acks = self.challenge_acks = self.challenge_acks_suppressed = self.invalid_segments = 0
        self.paws_rejected = self.ooo_segments = self.zero_window_probes = self.keepalive_probes_sent = 0
        self.bytes_sent = self.bytes_received = self.bytes_acked = self.loss_probes = 0
        self.lost_retransmissions = self.ce_received = self.ece_received = 0
        self.receiver = Receiver(self, now)
        self.sender = Sender(self, iss)
        self.recovery = Recovery(self, iss)

    # == creation ====================================================================

    @classmethod
    def accept(cls, local_port: int, remote_port: int, syn: TcpSegment, iss: int, config: TcpConfig,
               now: float) -> Connection:
        """Passive open from a SYN the listener validated: SYN-RECEIVED, SYN-ACK queued."""
        if not syn.syn or syn.ack_flag or syn.rst:
            raise InvalidOperation("accept() needs a plain SYN")
        c = cls(local_port, remote_port, iss, config, now)
        c.passive = True
        # RFC 9293 §3.10.7.2 (LISTEN, third: SYN): RCV.NXT = SEG.SEQ+1, IRS = SEG.SEQ.
        c.irs = syn.seq
        c.rcv_nxt = seq_add(syn.seq, 1)
        c._negotiate(Negotiated.from_syn(syn.options, config, _ecn_setup_syn(syn)), syn.options, now)
        c.state = State.SYN_RECEIVED
        # RFC 7323 §2.2: the window field of a SYN is never scaled.
        c.snd_wnd = c.max_snd_wnd = syn.window
        c.snd_wl1 = syn.seq
        c.snd_nxt = seq_add(c.iss, 1)
        c._send_syn(now)
        c.sender.start_rtt(c.iss, now)
        c.sender.rto_restart(now)
        return c

    @classmethod
    def connect(cls, local_port: int, remote_port: int, iss: int, config: TcpConfig,
                now: float) -> Connection:
        """Active open: SYN-SENT with the SYN queued (RFC 9293 §3.10.1)."""
        c = cls(local_port, remote_port, iss, config, now)
        c.state = State.SYN_SENT
        c.snd_nxt = seq_add(c.iss, 1)
        c._send_syn(now)
        c.sender.start_rtt(c.iss, now)
        c.sender.rto_restart(now)
        return c

    @classmethod
    def from_cookie(cls, local_port: int, remote_port: int, ack: TcpSegment, iss: int,
                    options: Negotiated | int, config: TcpConfig, now: float) -> Connection:
        """The final ACK of a SYN-cookie handshake (RFC 4987 §3.6): ESTABLISHED at once.

        ``options`` is what the cookie carried, built with :meth:`Negotiated.offered`
        (a bare int is the peer's MSS alone: no window scaling, SACK or timestamps).
        With timestamps, TS.Recent is the ACK's TSval; its TSecr (our cookie-bearing
        TSval) is no RTT sample.
        """
        if not ack.ack_flag or ack.syn or ack.rst or ack.ack != seq_add(iss, 1):
            raise InvalidOperation("from_cookie() needs the ACK of the cookie SYN-ACK")
        if isinstance(options, int):
            options = Negotiated.offered(config, options, None, False, False)
        c = cls(local_port, remote_port, iss, config, now)
        c.passive = True
        c.irs = seq_add(ack.seq, -1)
        c.rcv_nxt = ack.seq
        ts = ack.options.timestamp
        c._negotiate(options, TcpOptions(timestamp=ts), now)
        c.snd_una = c.snd_nxt = seq_add(iss, 1)
        # RFC 7323 §2.2: the ACK's window is scaled (the SYN's was not).
        c.snd_wnd = c.max_snd_wnd = ack.window << (options.snd_wscale or 0)
        c.snd_wl1 = ack.seq
        c.snd_wl2 = ack.ack
        # The cookie SYN-ACK advertised min(recv_buffer, 65535), unscaled.
        c.rcv_adv = seq_add(c.rcv_nxt, min(config.recv_buffer, 0xFFFF))
        c.receiver.last_ack_sent = c.rcv_nxt
        c.segments_in += 1
        c.last_recv = now
        c._established()
        c._process_text(ack.seq, ack.payload, ack.fin, now)
        return c

    def _negotiate(self, options: Negotiated, syn_options: TcpOptions, now: float) -> None:
        """Fix the options of this connection (RFC 7323 §2.2, §3.2; RFC 2018 §2)."""
        self.options = options
        if options.timestamps and syn_options.timestamp is not None:
            self.receiver.ts_recent = syn_options.timestamp[0]
            self.receiver.ts_recent_time = now
        self.send_mss = options.send_mss(self.config)
        self.receiver.negotiated()
        self.sender.negotiated()

    # == negotiated options and helper state, for the shell and stackctl ============

    @property
    def peer_mss(self) -> int:
        """The peer's MSS option."""
        return self.options.peer_mss

    @property
    def ws_ok(self) -> bool:
        """Window scaling on (RFC 7323 §2)."""
        return self.options.snd_wscale is not None

    @property
    def snd_wscale(self) -> int:
        """Shift applied to the peer's window."""
        return self.options.snd_wscale or 0

    @property
    def rcv_wscale(self) -> int:
        """Shift applied to our window field."""
        return self.options.rcv_wscale

    @property
    def sack_ok(self) -> bool:
        """SACK negotiated (RFC 2018 §2)."""
        return self.options.sack

    @property
    def ts_ok(self) -> bool:
        """Timestamps negotiated (RFC 7323 §3.2)."""
        return self.options.timestamps

    @property
    def ecn_ok(self) -> bool:
        """ECN negotiated (RFC 3168 §6.1.1)."""
        return self.options.ecn

    @property
    def ts_recent(self) -> int:
        """RFC 7323 TS.Recent."""
        return self.receiver.ts_recent

    @property
    def rto(self) -> float:
        """RFC 6298 RTO, with backoff."""
        return self.sender.rtt.rto

    @property
    def srtt(self) -> float | None:
        """RFC 6298 SRTT, None before a sample."""
        return self.sender.rtt.srtt

    @property
    def rttvar(self) -> float | None:
        """RFC 6298 RTTVAR, None before a sample."""
        return self.sender.rtt.rttvar

    @property
    def send_queued(self) -> int:
        """Send-buffer bytes unacknowledged or unsent."""
        return len(self.sender.sndbuf)

    @property
    def cwnd(self) -> int:
        """Congestion window (bytes)."""
        return self.sender.cc.cwnd

    @property
    def ssthresh(self) -> int:
        """Slow-start threshold (bytes)."""
        return self.sender.cc.ssthresh

    @property
    def in_recovery(self) -> bool:
        """In fast recovery (RFC 6582 or RFC 6675 §5), not after a timeout."""
        return self.recovery.in_fast_recovery

    @property
    def fin_queued(self) -> bool:
        """close() or shutdown() was called."""
        return self.sender.fin_queued

    def sends(self) -> bool:
        """Data or our FIN may be (re)transmitted in this state."""
        return self.state in _SENDS


    # == application API =============================================================

    @property
    def send_space(self) -> int:
        """Free send-buffer bytes."""
        if self.state not in _APP_SEND or self.sender.fin_queued:
            return 0
        return max(0, self.config.send_buffer - len(self.sender.sndbuf))

    @property
    def readable(self) -> int:
        """Bytes waiting in the receive buffer."""
        return len(self.receiver.rcvbuf)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Queue up to send_space bytes; return how many were accepted (0 = buffer full)."""
        if self.state not in _APP_SEND or self.sender.fin_queued:
            after = " after close()" if self.sender.fin_queued else ""
            raise InvalidOperation(f"send() in {self.state.value}{after}")
        return self.sender.queue(data)

    def recv(self, max_bytes: int = -1) -> bytes:
        """Take up to max_bytes (all if negative) from the receive buffer; b"" if none."""
        return self.receiver.read(max_bytes, self.state in _RECEIVES_TEXT)

    def close(self) -> None:
        """Send FIN after the queued data (RFC 9293 §3.10.4); receiving continues.

        We are done with the connection: FIN-WAIT-2 then ends after
        ``config.fin_wait2_timeout`` even if the peer never sends its FIN.
        """
        self._orphan = True
        self._fin(orphan=True)

    def shutdown(self) -> None:
        """Half-close: send FIN after the queued data and wait for the peer's FIN without limit."""
        self._fin(orphan=False)

    def _fin(self, orphan: bool) -> None:
        st = self.state
        if st in (State.SYN_SENT, State.LISTEN):
            # RFC 9293 §3.10.4: SYN-SENT: delete the TCB.
            self._close("closed")
            return
        if st is State.FIN_WAIT_2 and orphan:
            self._arm_fin_wait_2(self.last_recv)  # shutdown() first, close() later
        snd = self.sender
        if st not in (State.SYN_RECEIVED, State.ESTABLISHED, State.CLOSE_WAIT) or snd.fin_queued:
            return  # already closing or closed: close() is idempotent
        snd.fin_queued = True
        snd.fin_seq = snd.data_end()
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

    # == ICMP errors from the lower level (RFC 9293 §3.9.2.2) =======================
    # The caller checked that the error quotes a segment of ours still in
    # SND.UNA..SND.NXT (RFC 5927 §4.1): a forged one must not reach these.

    def path_mtu(self, mss: int, now: float) -> None:
        """Fragmentation needed / Packet Too Big: segments of at most mss payload octets fit the path."""
        self.sender.lower_path_mss(mss, now)

    def icmp_error(self, error: str, hard: bool) -> None:
        """Any other ICMP error about our segments.

        RFC 1122 §4.2.3.9, RFC 5461 §4: a hard error (protocol or port
        unreachable) ends a connection still being set up, without a reset
        (the peer said it is not there); any other error, and a hard one on
        an established connection, is a soft error: remembered, not fatal.
        """
        if hard and self.state in (State.SYN_SENT, State.SYN_RECEIVED):
            self._close("unreachable")
        else:
            self.soft_error = error

    @property
    def max_segment(self) -> int:
        """Payload of a full segment without options (the MSS, or the path's if smaller)."""
        return self.sender.max_segment()

    def next_event(self) -> Event | None:
        """The next application event, or None."""
        return self._events.pop(0) if self._events else None

    # == output ======================================================================

    def segments_to_send(self, now: float) -> list[TcpSegment]:
        """Everything to transmit now: retransmissions, new data, FIN, ACKs."""
        if self.state in _SENDS:
            edge = self.recovery.output(now)
            if edge is not None:
                self.sender.output_new(edge, now)
        rcv = self.receiver
        if rcv.ack_now:
            if self.state not in (State.CLOSED, State.LISTEN, State.SYN_SENT):
                rcv.emit(self.snd_nxt, _ACK, b"", now)
            rcv.ack_now = False
        self._update_timers(now)
        self.sender.drained()
        out = self._out
        self._out = []
        self.segments_out += len(out)
        return out

    def ect(self, seg: TcpSegment) -> bool:
        """Send this segment of the last batch ECT(0)?  New data on an ECN connection only
        (RFC 3168 §6.1.4: not pure ACKs or SYNs; §6.1.5: not retransmissions)."""
        return self.options.ecn and self.sender.ect(seg)

    def get_timer(self) -> float | None:
        """The earliest deadline, or None."""
        return self.timers.earliest()

    def _send_syn(self, now: float) -> None:
        """SYN (SYN-SENT) or SYN-ACK (SYN-RECEIVED) at ISS with our options."""
        window = self.receiver.syn_window()
        if self.state is State.SYN_SENT:
            flags, opts = syn_options(self.config, ts_clock(now))
            self._out.append(TcpSegment(self.local_port, self.remote_port, self.iss, 0, flags, window,
                                        options=opts))
            return
        flags, opts = self.options.syn_ack_options(self.config, ts_clock(now), self.receiver.ts_recent)
        self.rcv_adv = seq_add(self.rcv_nxt, window)
        self.receiver.last_ack_sent = self.rcv_nxt
        self._out.append(syn_ack(self.local_port, self.remote_port, self.iss, self.rcv_nxt, window, opts,
                                 ece=bool(flags & Flags.ECE)))

    def _send_rst(self, seq: int) -> None:
        """<SEQ=seq><CTL=RST>."""
        self._out.append(TcpSegment(self.local_port, self.remote_port, seq, 0, _RST, 0))

    # == input =======================================================================

    def receive(self, seg: TcpSegment, now: float, ce: bool = False) -> None:
        """Process one incoming segment (any size); ce: its IP header carried CE (RFC 3168 §5)."""
        self.segments_in += 1
        st = self.state
        if st is State.CLOSED or st is State.LISTEN:
            self._reply_closed(seg)
        elif st is State.SYN_SENT:
            self._receive_syn_sent(seg, now)
        else:
            self._receive_synchronized(seg, now, ce)

    def _reply_closed(self, seg: TcpSegment) -> None:
        """RFC 9293 §3.10.7.1: CLOSED answers everything but a RST with a RST."""
        rst = reset_for(seg)
        if rst is not None:
            self._out.append(rst)

    def _receive_syn_sent(self, seg: TcpSegment, now: float) -> None:
        """RFC 9293 §3.10.7.3."""
        ack_ok = False
        if seg.ack_flag:
            # first: an ACK for something we never sent gets a RST.
            if seq_le(seg.ack, self.iss) or seq_gt(seg.ack, self.snd_nxt):
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
        self.rcv_nxt = seq_add(seg.seq, 1)
        # RFC 3168 §6.1.1: ECN is on if the SYN-ACK has ECE without CWR (a SYN, ECE and CWR).
        f = int(seg.flags) & (_F_ECE | _F_CWR)
        ecn = self.config.ecn and (f == _F_ECE if ack_ok else f == _F_ECE | _F_CWR)
        self._negotiate(Negotiated.from_syn(seg.options, self.config, ecn), seg.options, now)
        self.last_recv = now
        # The peer may send up to the unscaled window of our SYN until our next segment.
        self.rcv_adv = seq_add(self.rcv_nxt, min(self.config.recv_buffer, 0xFFFF))
        self.snd_wnd = self.max_snd_wnd = seg.window  # RFC 7323 §2.2: unscaled in a SYN
        self.snd_wl1 = seg.seq
        self.snd_wl2 = seg.ack
        if ack_ok:
            self.sender.ack_advance(seg, now)
            self._established()
            self.receiver.ack_now = True
            # "If there are other controls or text in the segment, continue at the sixth step."
            if seg.payload or seg.fin:
                self._process_text(seq_add(seg.seq, 1), seg.payload, seg.fin, now)
            return
        # Simultaneous open (RFC 9293 §3.5 Figure 7): SYN-RECEIVED, send SYN,ACK at ISS.
        self.state = State.SYN_RECEIVED
        self._send_syn(now)

    def _receive_synchronized(self, seg: TcpSegment, now: float, ce: bool) -> None:
        """RFC 9293 §3.10.7.4, SYN-RECEIVED through TIME-WAIT."""
        st = self.state
        rcv = self.receiver
        f = int(seg.flags)  # plain int: IntFlag arithmetic is slow on this path
        rst = f & _F_RST
        fin = f & _F_FIN != 0
        if st is State.SYN_RECEIVED and f & (_F_SYN | _F_ACK | _F_RST) == _F_SYN and seg.seq == self.irs:
            # Our SYN-ACK was lost and the peer retransmitted its SYN: repeat the SYN-ACK.
            self.retransmissions += 1
            self.sender.rtt_seq = None
            self.sender.rtx_ts.append((self.iss, seq_add(self.iss, 1), ts_clock(now)))
            self._send_syn(now)
            return
        ts = seg.options.timestamp if self.options.timestamps else None
        # RFC 7323 §5.3 R1 (PAWS), before the sequence test; RSTs are exempt (§5.2 note).
        if ts is not None and not rst and rcv.paws_reject(ts[0], now):
            self.paws_rejected += 1
            rcv.ack_now = True
            return
        # first: sequence number acceptability (four cases).
        if not rcv.acceptable(seg.seq, len(seg.payload) + (f & _F_SYN != 0) + fin):
            self.invalid_segments += 1
            if not rst:
                rcv.ack_now = True  # "send an acknowledgment ... and drop the segment"
                if st is State.TIME_WAIT and fin:
                    # TIME-WAIT: a retransmitted FIN is re-ACKed and restarts the 2 MSL timeout.
                    self.timers.arm(Timer.TIME_WAIT, now + 2 * self.config.msl)
            return
        self.last_recv = now
        self.ka_probes = 0
        if ts is not None:
            rcv.note_timestamp(ts[0], ts[1], seg.seq, len(seg.payload), now)
        # second: RST (RFC 5961 §3.2): exact match resets, anything else in window is challenged.
        # In CLOSING, LAST-ACK and TIME-WAIT the user already closed: no reset signal.
        if rst:
            if seg.seq == self.rcv_nxt:
                self._close("closed" if st in _CLOSED_BY_USER else "reset")
            else:
                self.receiver.challenge_ack(now)
            return
        # fourth: SYN in a synchronized state (RFC 5961 §4.2): challenge ACK, drop.
        if f & _F_SYN:
            self.receiver.challenge_ack(now)
            return
        # fifth: ACK.
        if not f & _F_ACK:
            self.invalid_segments += 1
            return
        if self.options.ecn:
            rcv.ecn_in(f & _F_CWR != 0, ce)
        if not self._process_ack(seg, fin, now):
            return
        # sixth (URG) is not supported; seventh and eighth: text and FIN.
        self._process_text(seg.seq, seg.payload, fin, now)

    def _process_ack(self, seg: TcpSegment, fin: bool, now: float) -> bool:
        """RFC 9293 §3.10.7.4 fifth; False if the segment is dropped."""
        ack = seg.ack
        st = self.state
        wnd = seg.window << self.snd_wscale
        if st is State.SYN_RECEIVED:
            if not (seq_lt(self.snd_una, ack) and seq_le(ack, self.snd_nxt)):
                self.invalid_segments += 1
                self._send_rst(ack)  # "form a reset segment <SEQ=SEG.ACK><CTL=RST>"
                return False
            self._established()
            self.snd_wnd = wnd
            self.max_snd_wnd = max(self.max_snd_wnd, wnd)
            self.snd_wl1 = seg.seq
            self.snd_wl2 = ack
        if not self.sender.on_ack(seg, wnd, fin, now):
            self.invalid_segments += 1
            self.receiver.challenge_ack(now)  # RFC 5961 §5.2
            return False
        # State-specific ACK processing: our FIN acknowledged.
        snd = self.sender
        if snd.fin_queued and seq_gt(self.snd_una, snd.fin_seq):
            st = self.state
            if st is State.FIN_WAIT_1:
                self.state = State.FIN_WAIT_2
                if self._orphan:
                    self._arm_fin_wait_2(now)
            elif st is State.CLOSING:
                self._enter_time_wait(now)  # text step still re-ACKs a repeated FIN
            elif st is State.LAST_ACK:
                self._close("closed")
                return False
        return True

    def _process_text(self, seq: int, payload: bytes, fin: bool, now: float) -> None:
        """RFC 9293 §3.10.7.4 seventh (segment text) and eighth (FIN)."""
        st = self.state
        if st not in _RECEIVES_TEXT:
            # CLOSE-WAIT, CLOSING, LAST-ACK, TIME-WAIT: the peer's FIN came already;
            # a retransmitted FIN is acknowledged (and restarts TIME-WAIT's 2 MSL).
            if fin or payload:
                self.receiver.ack_now = True
                if st is State.TIME_WAIT and fin:
                    self.timers.arm(Timer.TIME_WAIT, now + 2 * self.config.msl)
            return
        if not self.receiver.text(seq, payload, fin, now):
            return
        # RFC 9293 §3.10.7.4 eighth: the peer's FIN, in order.
        self.peer_fin = True
        self._events.append(PeerClosed())
        if st is State.ESTABLISHED:
            self.state = State.CLOSE_WAIT
        elif st is State.FIN_WAIT_1:
            if self.sender.fin_queued and seq_gt(self.snd_una, self.sender.fin_seq):
                self._enter_time_wait(now)
            else:
                self.state = State.CLOSING  # simultaneous close
        elif st is State.FIN_WAIT_2:
            self._enter_time_wait(now)

    # == state changes ===============================================================

    def _established(self) -> None:
        self.state = State.FIN_WAIT_1 if self.sender.fin_queued else State.ESTABLISHED
        self.sender.retries = 0
        self._events.append(Connected())

    def _arm_fin_wait_2(self, now: float) -> None:
        """Linux tcp_fin_timeout: a closed connection waits this long for the peer's FIN."""
        self.timers.arm(Timer.FIN_WAIT_2, now + self.config.fin_wait2_timeout)

    def _enter_time_wait(self, now: float) -> None:
        self.state = State.TIME_WAIT
        self.timers.clear()
        self.timers.arm(Timer.TIME_WAIT, now + 2 * self.config.msl)  # RFC 9293 §3.10.7.4
        self.sender.sndbuf.clear()

    def _close(self, reason: str) -> None:
        self.state = State.CLOSED
        self.timers.clear()
        self.sender.sndbuf.clear()
        self.receiver.clear()
        self._events.append(Closed(reason))

    # == timers ======================================================================

    def handle_timer(self, now: float) -> None:
        """Fire every timer due at now."""
        for timer in self.timers.due(now):
            if timer is Timer.RETRANSMIT:
                if self.state is State.SYN_SENT or self.state is State.SYN_RECEIVED:
                    if self.sender.on_syn_rto(now):
                        self._send_syn(now)
                    else:
                        self._close("timeout")
                elif not self.sender.on_rto(now):
                    self._close("timeout")  # RFC 9293 §3.8.3 R2
            elif timer is Timer.ZERO_WINDOW_PROBE:
                if self.snd_una == self.snd_nxt and self.state in _SENDS:
                    self.sender.on_persist(now)
            elif timer is Timer.DELAYED_ACK:
                self.receiver.ack_now = True
            elif timer is Timer.LOSS_PROBE:
                self.recovery.on_loss_probe(now)
            elif timer is Timer.REORDER:
                self.recovery.on_reorder_timer(now)
            elif timer is Timer.KEEPALIVE:
                if self.config.keepalive is not None and self.state in _KEEPALIVE_STATES:
                    if not self.sender.keepalive(now):
                        self._close("timeout")
            elif timer is Timer.TIME_WAIT:
                self._close("closed")
            elif timer is Timer.FIN_WAIT_2:
                if self.state is State.FIN_WAIT_2:
                    self._close("timeout")
            if self.state is State.CLOSED:
                return

    def end_time_wait(self, reason: str) -> None:
        """Leave TIME-WAIT before its 2 MSL are up (the worker holds too many): CLOSED, nothing sent."""
        if self.state is State.TIME_WAIT:
            self._close(reason)

    def _update_timers(self, now: float) -> None:
        """Arm or cancel timers to match the state after a driver call."""
        st = self.state
        timers = self.timers
        if st is State.CLOSED or st is State.TIME_WAIT:
            return
        self.sender.rearm(now, st in _SENDS)
        # RFC 9293 §3.8.4: keepalive after idle time, off unless configured.
        if self.config.keepalive is not None and st in _KEEPALIVE_STATES:
            if self.ka_probes == 0:
                timers.arm(Timer.KEEPALIVE, self.last_recv + self.config.keepalive)
        else:
            timers.cancel(Timer.KEEPALIVE)

    def __repr__(self) -> str:
        return (f"Connection({self.local_port}->{self.remote_port} {self.state.value} "
                f"snd_una={self.snd_una} snd_nxt={self.snd_nxt} rcv_nxt={self.rcv_nxt})")
