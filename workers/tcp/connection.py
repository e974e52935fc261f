"""One TCP connection as a sans-IO state machine (RFC 9293).

Rules of this module (h11 ``_state.py`` style):

* The connection owns the state (RFC 9293 §3.3.2), the agreed options, the
  keepalive (§3.8.4) and the application interface, and reads like §3.10:
  OPEN (:meth:`accept`, :meth:`connect`, :meth:`from_cookie`), SEND, RECEIVE,
  CLOSE, ABORT, SEGMENT ARRIVES (:meth:`receive`), timeouts
  (:meth:`handle_timer`).  The TCB's variables belong to its roles (gVisor's
  split): :mod:`sender` owns SND.UNA/NXT/WND/WL1/WL2, the send buffer, RTT,
  cwnd, the retransmission timer and loss recovery (:mod:`recovery`);
  :mod:`receiver` owns IRS, RCV.NXT, RCV.WND and what we advertised,
  reassembly and the delayed ACK.  :mod:`outbox` builds every segment,
  :mod:`timers` holds every deadline, :mod:`counters` every counter.  A role is
  told what happened and answers; none writes another's fields or calls back.
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
from pipeline.wire.tcp import ACK, CWR, ECE, FIN, RST, SYN, TcpOptions, TcpSegment
from workers.tcp.config import TcpConfig
from workers.tcp.counters import Counters
from workers.tcp.errors import InvalidOperation
from workers.tcp.events import Closed, Connected, DataReceived, Event, PeerClosed, SendSpace
from workers.tcp.options import DEFAULT, MAX_WINDOW_SHIFT, Negotiated, syn_options, ts_clock, window_shift
from workers.tcp.outbox import Outbox
from workers.tcp.receiver import CHALLENGE_ACK_LIMIT, FIN_REACHED, NEW_DATA, Receiver
from workers.tcp.rtt import RttEstimator
from workers.tcp.sender import Sender
from workers.tcp.timers import Timer, TimerTable

# Re-exported for the demultiplexer and tests, which import them from here.
__all__ = ["CHALLENGE_ACK_LIMIT", "MAX_WINDOW_SHIFT", "Connection", "InvalidOperation", "Negotiated", "State", "Timer",
           "ts_clock", "window_shift"]


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


def _ecn_setup_syn(seg: TcpSegment) -> bool:
    """RFC 3168 §6.1.1: an ECN-setup SYN carries ECE and CWR."""
    return int(seg.flags) & (ECE | CWR) == ECE | CWR


class Connection(Counters):
    """A TCP connection; create with :meth:`accept`, :meth:`connect` or :meth:`from_cookie`."""

    # Inherited: the counters (counters.py), which the shell and stackctl read by name.
    __slots__ = ("config", "local_port", "remote_port", "state", "passive", "options", "peer_fin", "sender",
                 "receiver", "out", "timers", "_events", "_orphan", "last_recv", "ka_probes", "soft_error")

    def __init__(self, local_port: int, remote_port: int, iss: int, config: TcpConfig, now: float) -> None:
        """Internal: use accept(), connect() or from_cookie()."""
        super().__init__()
        self.config = config
        self.local_port = local_port
        self.remote_port = remote_port
        self.state = State.CLOSED
        self.passive = False
        self.options = DEFAULT
        self.peer_fin = False
        self.timers = TimerTable()
        self._events: list[Event] = []  # a few at most: a list is 700 bytes lighter per connection than a deque
        self._orphan = False  # close() (not shutdown()) was called: FIN-WAIT-2 is bounded
        # RFC 9293 §3.8.4 keepalive: when the peer was last heard, probes unanswered since.
        self.last_recv = now
        self.ka_probes = 0
        self.soft_error: str | None = None  # the last ICMP soft error (RFC 1122 §4.2.3.9)
        rtt = RttEstimator(config.initial_rto, config.min_rto, config.max_rto)  # the sender's; the receiver reads it
        self.receiver = Receiver(config, self.timers, self, rtt, now)
        self.out = Outbox(local_port, remote_port, self.receiver)
        self.sender = Sender(config, iss, self.timers, self, self.out, rtt)

    # == OPEN (RFC 9293 §3.10.1, and §3.10.7.2 for a listener's SYN) ==================

    @classmethod
    def accept(cls, local_port: int, remote_port: int, syn: TcpSegment, iss: int, config: TcpConfig,
               now: float) -> Connection:
        """Passive open from a SYN the listener validated: SYN-RECEIVED, SYN-ACK queued."""
        if not syn.syn or syn.ack_flag or syn.rst:
            raise InvalidOperation("accept() needs a plain SYN")
        c = cls(local_port, remote_port, iss, config, now)
        c.passive = True
        # RFC 9293 §3.10.7.2 (LISTEN, third: SYN): RCV.NXT = SEG.SEQ+1, IRS = SEG.SEQ.
        c.receiver.on_syn(syn.seq)
        c._negotiate(Negotiated.from_syn(syn.options, config, _ecn_setup_syn(syn)), syn.options, now)
        c.state = State.SYN_RECEIVED
        c.sender.init_window(syn.window, syn.seq, iss)  # RFC 7323 §2.2: the window field of a SYN is never scaled
        c._send_syn(now)
        c.sender.open(now)
        return c

    @classmethod
    def connect(cls, local_port: int, remote_port: int, iss: int, config: TcpConfig,
                now: float) -> Connection:
        """Active open: SYN-SENT with the SYN queued (RFC 9293 §3.10.1)."""
        c = cls(local_port, remote_port, iss, config, now)
        c.state = State.SYN_SENT
        c._send_syn(now)
        c.sender.open(now)
        return c

    @classmethod
    def from_cookie(cls, local_port: int, remote_port: int, ack: TcpSegment, iss: int,
                    options: Negotiated | int, config: TcpConfig, now: float) -> Connection:
        """The final ACK of a SYN-cookie handshake (RFC 4987 §3.6): ESTABLISHED at once.

        ``options``: what the cookie carried (:meth:`Negotiated.offered`; a bare int is the
        peer's MSS alone).  TS.Recent is the ACK's TSval; its TSecr is no RTT sample.
        """
        if not ack.ack_flag or ack.syn or ack.rst or ack.ack != seq_add(iss, 1):
            raise InvalidOperation("from_cookie() needs the ACK of the cookie SYN-ACK")
        if isinstance(options, int):
            options = Negotiated.offered(config, options, None, False, False)
        c = cls(local_port, remote_port, iss, config, now)
        c.passive = True
        rcv = c.receiver
        rcv.on_syn(seq_add(ack.seq, -1))
        c._negotiate(options, TcpOptions(timestamp=ack.options.timestamp), now)
        # RFC 7323 §2.2: the ACK's window is scaled (the SYN's was not).
        c.sender.cookie_acked(ack.window << (options.snd_wscale or 0), ack.seq, ack.ack)
        # The cookie SYN-ACK advertised min(recv_buffer, 65535), unscaled.
        rcv.syn_advertised(min(config.recv_buffer, 0xFFFF))
        c.segments_in += 1
        c.last_recv = now
        c._established()
        c._process_text(ack.seq, ack.payload, ack.fin, now)
        return c

    def _negotiate(self, options: Negotiated, syn_options: TcpOptions, now: float) -> None:
        """Fix the options of this connection (RFC 7323 §2.2, §3.2; RFC 2018 §2)."""
        self.options = options
        self.receiver.negotiated(options, syn_options, now)
        self.sender.negotiated(options)

    def _send_syn(self, now: float) -> None:
        """SYN (SYN-SENT) or SYN-ACK (SYN-RECEIVED) at ISS with our options."""
        window = self.receiver.syn_window()
        iss = self.sender.iss
        if self.state is State.SYN_SENT:
            flags, opts = syn_options(self.config, ts_clock(now))
            self.out.syn(iss, flags, window, opts)
            return
        flags, opts = self.options.syn_ack_options(self.config, ts_clock(now), self.receiver.ts_recent)
        self.out.syn_ack(iss, window, opts, int(flags) & ECE != 0)

    # == SEND, RECEIVE (RFC 9293 §3.10.2, §3.10.3) ======================================

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

    # == CLOSE, ABORT (RFC 9293 §3.10.4, §3.10.5) ======================================

    def close(self) -> None:
        """Send FIN after the queued data (RFC 9293 §3.10.4); receiving continues, and
        FIN-WAIT-2 ends after ``config.fin_wait2_timeout`` even without the peer's FIN."""
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
        if st not in (State.SYN_RECEIVED, State.ESTABLISHED, State.CLOSE_WAIT) or self.sender.fin_queued:
            return  # already closing or closed: close() is idempotent
        self.sender.queue_fin()
        if st is State.ESTABLISHED:
            self.state = State.FIN_WAIT_1
        elif st is State.CLOSE_WAIT:
            self.state = State.LAST_ACK  # RFC 9293 §3.10.4 (RFC 793 said CLOSING, a known erratum)
        # SYN-RECEIVED: the FIN waits for ESTABLISHED (RFC 9293 §3.10.4).

    def abort(self) -> None:
        """Reset the connection now (RFC 9293 §3.10.5)."""
        if self.state in _ABORT_RST:
            self.out.rst(self.sender.snd_nxt)
        if self.state is not State.CLOSED:
            self._close("aborted")

    def end_time_wait(self, reason: str) -> None:
        """Leave TIME-WAIT before its 2 MSL are up (the worker holds too many): CLOSED, nothing sent."""
        if self.state is State.TIME_WAIT:
            self._close(reason)

    # == ICMP errors from the lower level (RFC 9293 §3.9.2.2) =======================
    # The caller checked that the error quotes a segment of ours still in
    # SND.UNA..SND.NXT (RFC 5927 §4.1): a forged one must not reach these.

    def path_mtu(self, mss: int, now: float) -> None:
        """Fragmentation needed / Packet Too Big: segments of at most mss payload octets fit the path."""
        self.sender.lower_path_mss(mss, now, self.state in _SENDS)

    def icmp_error(self, error: str, hard: bool) -> None:
        """Any other ICMP error about our segments (RFC 1122 §4.2.3.9, RFC 5461 §4): a hard one
        (protocol or port unreachable) ends a connection being set up, without a reset; any other
        error, and a hard one once established, is remembered, not fatal."""
        if hard and self.state in (State.SYN_SENT, State.SYN_RECEIVED):
            self._close("unreachable")
        else:
            self.soft_error = error

    # == output ======================================================================

    def next_event(self) -> Event | None:
        """The next application event, or None."""
        return self._events.pop(0) if self._events else None

    def segments_to_send(self, now: float) -> list[TcpSegment]:
        """Everything to transmit now: retransmissions, new data, FIN, ACKs."""
        st = self.state
        snd = self.sender
        if st is not State.CLOSED and st is not State.TIME_WAIT:
            snd.output(now, st in _SENDS)
            # RFC 9293 §3.8.4: keepalive after idle time, off unless configured.
            if self.config.keepalive is not None and st in _KEEPALIVE_STATES:
                if self.ka_probes == 0:
                    self.timers.arm(Timer.KEEPALIVE, self.last_recv + self.config.keepalive)
            else:
                self.timers.cancel(Timer.KEEPALIVE)
        if self.receiver.ack_now and st is not State.CLOSED and st is not State.SYN_SENT:
            self.out.ack(snd.snd_nxt, now)  # ACK_NOW (no ACK before the peer's SYN; none after CLOSED)
        snd.drained()
        out = self.out.take()
        self.segments_out += len(out)
        return out

    def ect(self, seg: TcpSegment) -> bool:
        """Send this segment of the last batch ECT(0)?  New data on an ECN connection only
        (RFC 3168 §6.1.4: not pure ACKs or SYNs; §6.1.5: not retransmissions)."""
        return self.options.ecn and self.sender.ect(seg)

    def get_timer(self) -> float | None:
        """The earliest deadline, or None."""
        return self.timers.earliest()

    # == SEGMENT ARRIVES (RFC 9293 §3.10.7) ============================================

    def receive(self, seg: TcpSegment, now: float, ce: bool = False) -> None:
        """Process one incoming segment (any size); ce: its IP header carried CE (RFC 3168 §5)."""
        self.segments_in += 1
        st = self.state
        if st is State.CLOSED or st is State.LISTEN:
            self.out.reset_for(seg)  # RFC 9293 §3.10.7.1: CLOSED answers everything but a RST with a RST
        elif st is State.SYN_SENT:
            self._receive_syn_sent(seg, now)
        else:
            self._receive_synchronized(seg, now, ce)

    def _receive_syn_sent(self, seg: TcpSegment, now: float) -> None:
        """RFC 9293 §3.10.7.3."""
        snd = self.sender
        ack_ok = False
        if seg.ack_flag:
            # first: an ACK for something we never sent gets a RST.
            if seq_le(seg.ack, snd.iss) or seq_gt(seg.ack, snd.snd_nxt):
                self.invalid_segments += 1
                if not seg.rst:
                    self.out.rst(seg.ack)
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
        rcv = self.receiver
        rcv.on_syn(seg.seq)
        # RFC 3168 §6.1.1: ECN is on if the SYN-ACK has ECE without CWR (a SYN, ECE and CWR).
        f = int(seg.flags) & (ECE | CWR)
        ecn = self.config.ecn and (f == ECE if ack_ok else f == ECE | CWR)
        self._negotiate(Negotiated.from_syn(seg.options, self.config, ecn), seg.options, now)
        self.last_recv = now
        # The peer may send up to the unscaled window of our SYN until our next segment.
        rcv.syn_advertised(min(self.config.recv_buffer, 0xFFFF))
        snd.init_window(seg.window, seg.seq, seg.ack)  # RFC 7323 §2.2: unscaled in a SYN
        if ack_ok:
            snd.ack_advance(seg, now)
            self._send_space_freed()
            self._established()
            rcv.send_ack()
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
        rst = f & RST
        fin = f & FIN != 0
        if st is State.SYN_RECEIVED and f & (SYN | ACK | RST) == SYN and seg.seq == rcv.irs:
            # Our SYN-ACK was lost and the peer retransmitted its SYN: repeat the SYN-ACK.
            self.sender.syn_retransmitted(now)
            self._send_syn(now)
            return
        ts = seg.options.timestamp if self.options.timestamps else None
        # RFC 7323 §5.3 R1 (PAWS), before the sequence test; RSTs are exempt (§5.2 note).
        if ts is not None and not rst and rcv.paws_reject(ts[0], now):
            self.paws_rejected += 1
            rcv.send_ack()
            return
        # first: sequence number acceptability (four cases).
        if not rcv.acceptable(seg.seq, len(seg.payload) + (f & SYN != 0) + fin):
            self.invalid_segments += 1
            if not rst:
                if st is State.TIME_WAIT and fin:
                    rcv.restart_time_wait(now)
                else:
                    rcv.send_ack()  # "send an acknowledgment ... and drop the segment"
            return
        self.last_recv = now
        self.ka_probes = 0
        if ts is not None:
            rcv.note_timestamp(ts[0], ts[1], seg.seq, len(seg.payload), now)
        # second: RST (RFC 5961 §3.2): exact match resets, anything else in window is challenged.
        # In CLOSING, LAST-ACK and TIME-WAIT the user already closed: no reset signal.
        if rst:
            if seg.seq == rcv.rcv_nxt:
                self._close("closed" if st in _CLOSED_BY_USER else "reset")
            else:
                rcv.challenge_ack(now)
            return
        # fourth: SYN in a synchronized state (RFC 5961 §4.2): challenge ACK, drop.
        if f & SYN:
            rcv.challenge_ack(now)
            return
        # fifth: ACK.
        if not f & ACK:
            self.invalid_segments += 1
            return
        if self.options.ecn:
            rcv.ecn_in(f & CWR != 0, ce)
        if not self._process_ack(seg, fin, now):
            return
        # sixth (URG) is not supported; seventh and eighth: text and FIN.
        self._process_text(seg.seq, seg.payload, fin, now)

    def _process_ack(self, seg: TcpSegment, fin: bool, now: float) -> bool:
        """RFC 9293 §3.10.7.4 fifth; False if the segment is dropped."""
        ack = seg.ack
        snd = self.sender
        wnd = seg.window << (self.options.snd_wscale or 0)
        if self.state is State.SYN_RECEIVED:
            if not (seq_lt(snd.snd_una, ack) and seq_le(ack, snd.snd_nxt)):
                self.invalid_segments += 1
                self.out.rst(ack)  # "form a reset segment <SEQ=SEG.ACK><CTL=RST>"
                return False
            self._established()
            snd.init_window(wnd, seg.seq, ack)
        if not snd.on_ack(seg, wnd, fin, now, self.state in _SENDS):
            self.invalid_segments += 1
            self.receiver.challenge_ack(now)  # RFC 5961 §5.2
            return False
        self._send_space_freed()
        # State-specific ACK processing: our FIN acknowledged.
        if snd.fin_queued and seq_gt(snd.snd_una, snd.fin_seq):
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
        rcv = self.receiver
        if st not in _RECEIVES_TEXT:
            # CLOSE-WAIT, CLOSING, LAST-ACK, TIME-WAIT: the peer's FIN came already;
            # a retransmitted FIN is acknowledged (and restarts TIME-WAIT's 2 MSL).
            if fin or payload:
                if st is State.TIME_WAIT and fin:
                    rcv.restart_time_wait(now)
                else:
                    rcv.send_ack()
            return
        if seq != rcv.rcv_nxt and rcv.owes_ack_first(seq, len(payload)):
            self.out.ack(self.sender.snd_nxt, now)  # RFC 5681 §4.2: one duplicate ACK per segment
        got = rcv.text(seq, payload, fin, now)
        if got & NEW_DATA:
            self._events.append(DataReceived())
        if not got & FIN_REACHED:
            return
        # RFC 9293 §3.10.7.4 eighth: the peer's FIN, in order.
        self.peer_fin = True
        self._events.append(PeerClosed())
        if st is State.ESTABLISHED:
            self.state = State.CLOSE_WAIT
        elif st is State.FIN_WAIT_1:
            snd = self.sender
            if snd.fin_queued and seq_gt(snd.snd_una, snd.fin_seq):
                self._enter_time_wait(now)
            else:
                self.state = State.CLOSING  # simultaneous close
        elif st is State.FIN_WAIT_2:
            self._enter_time_wait(now)

    # == state changes ===============================================================

    def _send_space_freed(self) -> None:
        """send() found the buffer full; if this ACK freed half of it, say so (one SendSpace)."""
        snd = self.sender
        if snd.send_blocked and snd.unblocked(self.send_space):
            self._events.append(SendSpace())

    def _established(self) -> None:
        self.state = State.FIN_WAIT_1 if self.sender.fin_queued else State.ESTABLISHED
        self.sender.established()
        self._events.append(Connected())

    def _arm_fin_wait_2(self, now: float) -> None:
        """Linux tcp_fin_timeout: a closed connection waits this long for the peer's FIN."""
        self.timers.arm(Timer.FIN_WAIT_2, now + self.config.fin_wait2_timeout)

    def _enter_time_wait(self, now: float) -> None:
        self.state = State.TIME_WAIT
        self.timers.clear()
        self.timers.arm(Timer.TIME_WAIT, now + 2 * self.config.msl)  # RFC 9293 §3.10.7.4
        self.sender.clear()

    def _close(self, reason: str) -> None:
        self.state = State.CLOSED
        self.timers.clear()
        self.sender.clear()
        self.receiver.clear()
        self._events.append(Closed(reason))

    # == timeouts (RFC 9293 §3.10.8) ==================================================

    def handle_timer(self, now: float) -> None:
        """Fire every timer due at now."""
        snd = self.sender
        for timer in self.timers.due(now):
            st = self.state
            sends = st in _SENDS
            if timer is Timer.RETRANSMIT:
                if st is State.SYN_SENT or st is State.SYN_RECEIVED:
                    if snd.on_syn_rto(now):
                        self._send_syn(now)
                    else:
                        self._close("timeout")
                elif not snd.on_rto(now, sends):
                    self._close("timeout")  # RFC 9293 §3.8.3 R2
            elif timer is Timer.ZERO_WINDOW_PROBE:
                if snd.snd_una == snd.snd_nxt and sends:
                    snd.on_persist(now)
            elif timer is Timer.DELAYED_ACK:
                self.receiver.send_ack()
            elif timer is Timer.LOSS_PROBE:
                snd.on_loss_probe(now, sends)
            elif timer is Timer.REORDER:
                snd.on_reorder_timer(now, sends)
            elif timer is Timer.KEEPALIVE:
                if self.config.keepalive is not None and st in _KEEPALIVE_STATES:
                    if not self._keepalive(now):
                        self._close("timeout")
            elif timer is Timer.TIME_WAIT:
                self._close("closed")
            elif timer is Timer.FIN_WAIT_2:
                if st is State.FIN_WAIT_2:
                    self._close("timeout")
            if self.state is State.CLOSED:
                return

    def _keepalive(self, now: float) -> bool:
        """RFC 9293 §3.8.4: probe an idle connection with SEG.SEQ = SND.NXT - 1; False: give up."""
        cfg = self.config
        assert cfg.keepalive is not None
        idle_deadline = self.last_recv + cfg.keepalive  # the same float as the armed deadline
        if self.ka_probes == 0 and now < idle_deadline:
            self.timers.arm(Timer.KEEPALIVE, idle_deadline)
            return True
        if self.ka_probes >= cfg.keepalive_probes:
            return False
        self.ka_probes += 1
        self.keepalive_probes_sent += 1
        self.out.ack(seq_add(self.sender.snd_nxt, -1), now)
        self.timers.arm(Timer.KEEPALIVE, now + cfg.keepalive_interval)
        return True

    def __repr__(self) -> str:
        return (f"Connection({self.local_port}->{self.remote_port} {self.state.value} "
                f"snd_una={self.sender.snd_una} snd_nxt={self.sender.snd_nxt} rcv_nxt={self.receiver.rcv_nxt})")
