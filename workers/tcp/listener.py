"""Segments that find no connection: the listeners, their SYN queues and cookies, and resets.

Contract: sans-IO helper of the demux, which hands it every segment for which
it holds no connection and registers the connection it gets back. The
listener

- on a port with a service (RFC 9293 §3.10.7.2, LISTEN): ignores a RST,
  resets an ACK unless it completes a SYN-cookie handshake, accepts a SYN
  into SYN-RECEIVED with an RFC 6528 ISN while the port's SYN queue has room
  (``syn_queue_limit`` half-open connections) and past that answers with a
  SYN cookie and keeps nothing (RFC 4987 §3.6), so a SYN flood cannot
  exhaust memory or lock out real clients; with timestamps the cookie keeps
  window scale and SACK in our TSval's low bits (``syncookies``);
- on any other port (§3.10.7.1, CLOSED): answers with a reset, never a reset
  to a reset, at most ``RESETS_PER_SECOND`` (a scan cannot make us flood);
- provokes a reset from the peers of a dead worker's connections, whose
  sequence numbers we do not know (:meth:`Listener.provoke_reset`);
- keeps each port's SYN queue: a connection is in it while in SYN-RECEIVED,
  and the demux says when it leaves (:meth:`Listener.leave_queue`).
"""

from __future__ import annotations

from pipeline.flow import Flow
from pipeline.ratelimit import TokenBucket
from pipeline.wire.seqnum import seq_add
from pipeline.wire.tcp import Flags, TcpOptions, TcpSegment
from workers.core import Outgoing, Sink
from workers.tcp.connection import MAX_WINDOW_SHIFT, Connection, ts_clock, window_shift
from workers.tcp.encapsulation import Encapsulation
from workers.tcp.isn import initial_sequence_number
from workers.tcp.options import Negotiated
from workers.tcp.segments import reset_for, syn_ack
from workers.tcp.syncookies import CookieOptions, SynCookies, decode_cookie_options, encode_ts_options

RESETS_PER_SECOND = 2000     # resets for unknown flows (a scan cannot make us flood)
DEFAULT_MSS = 536            # RFC 9293 §3.7.1: the send MSS when the SYN names none


class Listener:
    def __init__(self, sink: Sink, encap: Encapsulation, secret: bytes,
                 syn_queue_limit: int) -> None:
        self.sink = sink
        self.encap = encap
        self.secret = secret
        self.cookies = SynCookies(secret)
        self.syn_queue: dict[int, set[Flow]] = {}  # listening port -> its half-open connections
        self.syn_queue_limit = syn_queue_limit
        self.resets = TokenBucket(RESETS_PER_SECOND, RESETS_PER_SECOND)

    def segment(self, key: Flow, seg: TcpSegment, now: float, out: list[Outgoing]) -> Connection | None:
        """A segment for a listening port with no connection (RFC 9293 §3.10.7.2).

        Returns the connection it opens (in SYN-RECEIVED, or ESTABLISHED by a
        cookie) for the demux to register; anything it answers goes to ``out``.
        """
        if seg.rst:
            self.sink.drop("rst_no_connection")  # §3.10.7.2: an incoming RST is ignored
            return None
        if seg.ack_flag:
            # An ACK with no connection: the last step of a SYN-cookie handshake, or junk.
            if not seg.syn:
                conn = self._cookie_connection(key, seg, now)
                if conn is not None:
                    self.sink.counters["syn_cookies_accepted"] += 1
                    return conn
            self.reset(key, seg, now, out, "ack_no_connection")
            return None
        if not seg.syn:
            self.sink.drop("no_syn_no_connection")  # §3.10.7.2: drop anything else
            return None
        queue = self.syn_queue.get(key.lport)
        if (0 if queue is None else len(queue)) >= self.syn_queue_limit:
            self._cookie_syn_ack(key, seg, now, out)
            return None
        return self.accept(key, seg, self.isn(key, now), now)

    def accept(self, key: Flow, syn: TcpSegment, iss: int, now: float) -> Connection:
        """A new connection in SYN-RECEIVED, counted in its port's SYN queue."""
        conn = Connection.accept(key.lport, key.rport, syn, iss, self.encap.config(key.remote), now)
        queue = self.syn_queue.get(key.lport)
        if queue is None:
            queue = self.syn_queue[key.lport] = set()
        queue.add(key)
        return conn

    def isn(self, key: Flow, now: float) -> int:
        """Our ISN for ``key`` (RFC 6528: a keyed hash of the 4-tuple plus a clock)."""
        return initial_sequence_number(self.secret, (self.encap.local(key), key.lport), (key.remote, key.rport), now)

    def leave_queue(self, key: Flow) -> None:
        """``key`` left SYN-RECEIVED (established, closed or reopened): its place in the queue is free."""
        queue = self.syn_queue.get(key.lport)
        if queue:
            queue.discard(key)

    def reset(self, key: Flow, seg: TcpSegment, now: float, out: list[Outgoing], reason: str) -> None:
        """RFC 9293 §3.10.7.1: answer a segment for no connection with a reset (never a reset to a reset)."""
        rst = reset_for(seg)
        if rst is None:
            self.sink.drop("rst_no_connection")
            return
        self.sink.counters["resets_sent_" + reason] += 1
        if not self.resets.take(now):
            self.sink.drop("reset_rate_limited")
            return
        out.append(self.encap.packet(key, rst))

    def provoke_reset(self, flow: Flow, out: list[Outgoing]) -> None:
        """Make the peer of a connection we do not hold (a dead worker's) reset it.

        We do not know its sequence numbers, so we provoke the peer into
        telling us: a bare ACK far outside its window makes its TCP answer
        with an ACK carrying its rcv_nxt (RFC 9293 §3.10.7.4), and that ACK,
        arriving for no connection, is answered with <SEQ=SEG.ACK><CTL=RST>
        (§3.10.7.1), which matches rcv_nxt exactly and so is accepted even
        under RFC 5961 §3.2. Without this, a peer that is only receiving
        would wait forever for data that will not come.
        """
        self.sink.counters["orphans_reset"] += 1
        out.append(self.encap.packet(flow, TcpSegment(flow.lport, flow.rport, 0, 0, Flags.ACK, 0)))

    def _cookie_syn_ack(self, key: Flow, syn: TcpSegment, now: float, out: list[Outgoing]) -> None:
        """The SYN queue is full: answer statelessly with a cookie ISN (RFC 4987 §3.6).

        With timestamps the SYN-ACK also offers window scaling and SACK and
        keeps the peer's in the low bits of its TSval (``syncookies``); without,
        only the MSS survives, so nothing else is offered.
        """
        self.sink.counters["syn_cookies_sent"] += 1
        cfg = self.encap.config(key.remote)
        opts = syn.options
        peer_mss = opts.mss or DEFAULT_MSS
        cookie = self.cookies.make((self.encap.local(key), key.lport), (key.remote, key.rport), syn.seq, peer_mss, now)
        window_scale = sack = timestamp = None
        if cfg.timestamps and opts.timestamp is not None:
            # RFC 7323 §2.2 / RFC 2018 §2: offer only what the SYN offered; §2.3: a shift over 14 is 14.
            peer_shift = min(opts.window_scale, MAX_WINDOW_SHIFT) if (
                cfg.window_scaling and opts.window_scale is not None) else None
            sack = cfg.sack and opts.sack_permitted
            window_scale = None if peer_shift is None else window_shift(cfg.recv_buffer)
            timestamp = (encode_ts_options(ts_clock(now), peer_shift, sack), opts.timestamp[0])
        reply = syn_ack(key.lport, key.rport, cookie, seq_add(syn.seq, 1), cfg.recv_buffer, TcpOptions(
            mss=cfg.mss, window_scale=window_scale, sack_permitted=bool(sack), timestamp=timestamp))
        out.append(self.encap.packet(key, reply))

    def _cookie_connection(self, key: Flow, ack: TcpSegment, now: float) -> Connection | None:
        """The connection a valid cookie ACK opens, with the options the cookie kept (no ECN:
        the cookie SYN-ACK never offers it); None if the ACK carries no valid cookie."""
        local, remote = (self.encap.local(key), key.lport), (key.remote, key.rport)
        mss = self.cookies.check(local, remote, seq_add(ack.seq, -1), seq_add(ack.ack, -1), now)
        options: CookieOptions | None = None if mss is None else decode_cookie_options(ack.options.timestamp, mss)
        if options is None:
            return None
        config = self.encap.config(key.remote)
        negotiated = Negotiated.offered(config, options.mss, options.window_scale, options.sack_permitted,
                                        options.timestamps)
        return Connection.from_cookie(key.lport, key.rport, ack, seq_add(ack.ack, -1), negotiated, config, now)
