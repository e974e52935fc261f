"""The TCP worker's core: demultiplexing, listeners, resets, timers and services.

Sans-IO like the connections it drives: IP packets and ``now`` in, IP packets
and the next deadline out. It owns

- the connection table, keyed by (remote address, remote port, local port);
- the listeners: a bounded SYN queue per port and, when it is full, SYN
  cookies (RFC 4987 §3.6) so a SYN flood cannot exhaust memory or lock out
  real clients;
- resets for segments that belong to no connection (RFC 9293 §3.10.7.1);
- one timer heap over every connection's next deadline (stale entries are
  skipped lazily, so re-arming a timer costs O(log n) and nothing else).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from pipeline.bus.messages import Flow
from pipeline.offload import Offload, checksum_vouched, tcp_offload
from pipeline.process import Process
from pipeline.wire import Malformed
from pipeline.wire.addr import fmt_addr
from pipeline.wire.ipv4 import PROTO_TCP, Ipv4Header, build_ipv4, parse_ipv4
from pipeline.wire.seqnum import SeqNum
from pipeline.wire.tcp import HEADER_LEN as TCP_HEADER_LEN
from pipeline.wire.tcp import Flags, TcpOptions, TcpSegment, parse_tcp
from workers.ratelimit import TokenBucket
from workers.shell import Outgoing
from workers.tcp import events
from workers.tcp.apps import SERVICES
from workers.tcp.config import TcpConfig
from workers.tcp.connection import Connection, State
from workers.tcp.hosting import ServiceFactory, ServiceHost
from workers.tcp.isn import initial_sequence_number
from workers.tcp.syncookies import SynCookies

FlowKey = Flow  # remote address, remote port, local port
IPV4_HEADER_LEN = 20  # we emit no IP options

SYN_QUEUE_LIMIT = 256        # default half-open connections per listening port before cookies
RESETS_PER_SECOND = 2000     # resets for unknown flows (a scan cannot make us flood)
# Connection counters logged with tcp_closed.
CLOSE_STATS = ("bytes_sent", "bytes_received", "segments_in", "segments_out", "retransmissions", "timeouts",
               "fast_retransmits", "loss_probes", "lost_retransmissions", "zero_window_probes", "ooo_segments",
               "challenge_acks")


class TcpCore:
    def __init__(self, proc: Process, config: TcpConfig, secret: bytes,
                 services: Mapping[int, ServiceFactory] | None = None, offload: bool = False,
                 syn_queue_limit: int = SYN_QUEUE_LIMIT) -> None:
        self.proc = proc
        self.log = proc.log
        self.config = config
        self.address = proc.config.stack_addr_bytes
        self.secret = secret
        self.cookies = SynCookies(secret)
        # The services on their ports (the worker passes the registry's table), fenced by the host.
        self.host = ServiceHost(SERVICES if services is None else services, self.log, proc.counters)
        self.connections: dict[FlowKey, Connection] = {}
        self.syn_queue: dict[int, set[FlowKey]] = {}  # listening port -> its half-open connections
        self.syn_queue_limit = syn_queue_limit
        self._timers: list[tuple[float, FlowKey]] = []
        self._deadline: dict[FlowKey, float] = {}
        self.resets = TokenBucket(RESETS_PER_SECOND, RESETS_PER_SECOND)
        self._opened: list[Flow] = []  # flow changes not yet announced to ingress
        self._closed: list[Flow] = []
        # With device offloads, the kernel finishes our checksums and cuts large
        # segments to the MSS (TSO): we emit up to config.max_send_segment at once.
        self.offload = offload

    # -- drivers -------------------------------------------------------------

    def handle_packet(self, data: bytes, now: float, offload: Offload | None = None) -> list[Outgoing]:
        proc = self.proc
        try:
            ip, payload = parse_ipv4(data, verify_checksum=False)  # ingress verified it
            seg = parse_tcp(payload, ip.src, ip.dst, verify_checksum=not checksum_vouched(offload))
        except Malformed as exc:
            proc.drop(exc.reason, layer="tcp")
            return []
        if proc.debug:
            proc.log.debug("tcp_in", src=fmt_addr(ip.src), dst=fmt_addr(ip.dst), ttl=ip.ttl, sport=seg.src_port,
                           dport=seg.dst_port, seq=int(seg.seq), ack=int(seg.ack), flags=str(seg.flags),
                           window=seg.window, len=len(seg.payload), options=_fmt_options(seg.options),
                           **proc.payload(seg.payload))
        key = (ip.src, seg.src_port, seg.dst_port)
        conn = self.connections.get(key)
        out: list[Outgoing] = []
        if conn is not None:
            before = conn.state
            conn.receive(seg, now)
            self._after(key, conn, before, now, out)
        elif self.host.listens(seg.dst_port):
            self._listen(key, seg, now, out)
        else:
            self._reset(key, seg, now, out, "closed_port")
        self._flush_woken(now, out)
        return out

    def handle_timer(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, key = heapq.heappop(timers)
            if self._deadline.get(key) != deadline:
                continue  # re-armed or gone since it was pushed
            del self._deadline[key]
            conn = self.connections.get(key)
            if conn is None:
                continue
            before = conn.state
            conn.handle_timer(now)
            self.host.fire(key, now)
            self._after(key, conn, before, now, out)
        self._flush_woken(now, out)
        return out

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and self._deadline.get(timers[0][1]) != timers[0][0]:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def stats(self) -> dict[str, int]:
        return {"connections": len(self.connections)}

    def flows(self) -> list[Flow]:
        return list(self.connections)

    def flow_changes(self) -> tuple[list[Flow], list[Flow]]:
        opened, closed = self._opened, self._closed
        self._opened, self._closed = [], []
        return opened, closed

    def reset_orphans(self, flows: tuple[Flow, ...], now: float) -> list[Outgoing]:
        """Make the peers of a dead worker's connections reset them.

        We do not know their sequence numbers, so we provoke the peer into
        telling us: a bare ACK far outside its window makes its TCP answer
        with an ACK carrying its rcv_nxt (RFC 9293 §3.10.7.4), and that ACK,
        arriving for no connection, is answered with <SEQ=SEG.ACK><CTL=RST>
        (§3.10.7.1), which matches rcv_nxt exactly and so is accepted even
        under RFC 5961 §3.2. Without this, a peer that is only receiving
        would wait forever for data that will not come.
        """
        out: list[Outgoing] = []
        for flow in flows:
            if flow in self.connections:
                continue
            remote, rport, lport = flow
            self.proc.counters["orphans_reset"] += 1
            probe = TcpSegment(lport, rport, SeqNum(0), SeqNum(0), Flags.ACK, 0)
            out.append(self._ip(remote, probe))
        return out

    def close(self, now: float) -> list[Outgoing]:
        """Shutting down: reset every connection so no peer is left hanging."""
        out: list[Outgoing] = []
        for key, conn in list(self.connections.items()):
            if conn.state not in (State.TIME_WAIT, State.CLOSED):
                before = conn.state
                conn.abort()
                self._after(key, conn, before, now, out)
        return out

    # -- listeners -----------------------------------------------------------

    def _listen(self, key: FlowKey, seg: TcpSegment, now: float, out: list[Outgoing]) -> None:
        """A segment for a listening port with no connection (RFC 9293 §3.10.7.2)."""
        if seg.rst:
            self.proc.drop("rst_no_connection")  # §3.10.7.2: an incoming RST is ignored
            return
        remote, local = (key[0], key[1]), (self.address, key[2])
        if seg.ack_flag:
            # An ACK with no connection: the last step of a SYN-cookie handshake, or junk.
            if not seg.syn:
                mss = self.cookies.check(local, remote, seg.seq - 1, seg.ack - 1, now)
                if mss is not None:
                    conn = Connection.from_cookie(key[2], key[1], seg, seg.ack - 1, mss, self.config, now)
                    self.connections[key] = conn
                    self._opened.append(key)
                    self.proc.counters["syn_cookies_accepted"] += 1
                    self._after(key, conn, State.LISTEN, now, out)
                    return
            self._reset(key, seg, now, out, "ack_no_connection")
            return
        if not seg.syn:
            self.proc.drop("no_syn_no_connection")  # §3.10.7.2: drop anything else
            return
        port = key[2]
        queue = self.syn_queue.setdefault(port, set())
        if len(queue) >= self.syn_queue_limit:
            self._cookie_syn_ack(key, seg, now, out)
            return
        iss = initial_sequence_number(self.secret, local, remote, now)
        conn = Connection.accept(port, key[1], seg, iss, self.config, now)
        self.connections[key] = conn
        self._opened.append(key)
        queue.add(key)
        self._after(key, conn, State.LISTEN, now, out)

    def _cookie_syn_ack(self, key: FlowKey, syn: TcpSegment, now: float, out: list[Outgoing]) -> None:
        """The SYN queue is full: answer statelessly with a cookie ISN (RFC 4987 §3.6)."""
        self.proc.counters["syn_cookies_sent"] += 1
        peer_mss = syn.options.mss or 536  # RFC 9293 §3.7.1: default send MSS
        cookie = self.cookies.make((self.address, key[2]), (key[0], key[1]), syn.seq, peer_mss, now)
        reply = TcpSegment(key[2], key[1], cookie, syn.seq + 1, Flags.SYN | Flags.ACK,
                           min(self.config.recv_buffer, 0xFFFF), options=TcpOptions(mss=self.config.mss))
        out.append(self._ip(key[0], reply))

    def _reset(self, key: FlowKey, seg: TcpSegment, now: float, out: list[Outgoing], reason: str) -> None:
        """RFC 9293 §3.10.7.1: answer a segment for no connection with a reset (never a reset to a reset)."""
        if seg.rst:
            self.proc.drop("rst_no_connection")
            return
        self.proc.counters["resets_sent_" + reason] += 1
        if not self.resets.allow(now):
            self.proc.drop("reset_rate_limited")
            return
        if seg.ack_flag:
            rst = TcpSegment(key[2], key[1], seg.ack, SeqNum(0), Flags.RST, 0)
        else:
            rst = TcpSegment(key[2], key[1], SeqNum(0), seg.seq + seg.seg_len, Flags.RST | Flags.ACK, 0)
        out.append(self._ip(key[0], rst))

    # -- connections ---------------------------------------------------------

    def _after(self, key: FlowKey, conn: Connection, before: State, now: float, out: list[Outgoing]) -> None:
        """Deliver a connection's events to its service, then collect its output and re-arm its timer."""
        log = self.log
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, events.Connected):
                log.info("tcp_established", remote=fmt_addr(key[0]), rport=key[1], lport=key[2])
            self.host.deliver(key, conn, ev, now)
            if isinstance(ev, events.Closed):
                log.info("tcp_closed", remote=fmt_addr(key[0]), rport=key[1], lport=key[2], reason=ev.reason,
                         **{name: getattr(conn, name) for name in CLOSE_STATS})
        if self.proc.debug and conn.state is not before:
            log.debug("tcp_state", remote=fmt_addr(key[0]), rport=key[1], lport=key[2],
                      old=before.name, new=conn.state.name)
        mss = min(conn.peer_mss, self.config.mss)
        for seg in conn.segments_to_send(now):
            out.append(self._ip(key[0], seg, mss))
        if conn.state is State.CLOSED:
            self._forget(key)
            return
        if conn.state is not State.SYN_RECEIVED:
            self._leave_syn_queue(key)
        deadline = conn.get_timer()
        app_deadline = self.host.timer(key)
        if app_deadline is not None and (deadline is None or app_deadline < deadline):
            deadline = app_deadline
        if deadline is None:
            self._deadline.pop(key, None)
        elif self._deadline.get(key) != deadline:
            self._deadline[key] = deadline
            heapq.heappush(self._timers, (deadline, key))

    def _forget(self, key: FlowKey) -> None:
        self.connections.pop(key)
        self._closed.append(key)
        self._leave_syn_queue(key)
        self.host.forget(key)
        self._deadline.pop(key, None)

    def _flush_woken(self, now: float, out: list[Outgoing]) -> None:
        """Collect the output of connections a service touched from another connection's callback."""
        while woken := self.host.woken():
            for key in woken:
                conn = self.connections.get(key)
                if conn is not None:
                    self._after(key, conn, conn.state, now, out)

    def _leave_syn_queue(self, key: FlowKey) -> None:
        queue = self.syn_queue.get(key[2])
        if queue:
            queue.discard(key)

    def _ip(self, remote: bytes, seg: TcpSegment, mss: int | None = None) -> Outgoing:
        header = Ipv4Header(src=self.address, dst=remote, protocol=PROTO_TCP)
        if not self.offload:
            return build_ipv4(header, seg.emit(self.address, remote)), None
        tcp_header_len = seg.header_len
        segment_size = (mss or self.config.mss) - (tcp_header_len - TCP_HEADER_LEN)
        return (build_ipv4(header, seg.emit(self.address, remote, checksum=False)),
                tcp_offload(IPV4_HEADER_LEN, tcp_header_len, len(seg.payload), segment_size))


def _fmt_options(o: TcpOptions) -> dict[str, object]:
    shown = {"mss": o.mss, "ws": o.window_scale, "sack_ok": o.sack_permitted or None,
             "ts": list(o.timestamp) if o.timestamp else None,
             "sack": [[int(a), int(b)] for a, b in o.sack_blocks] or None}
    return {k: v for k, v in shown.items() if v is not None}

