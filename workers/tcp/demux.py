"""The TCP worker's core, the demultiplexer: listeners, resets, timers and services.

Sans-IO like the connections it drives: IP packets and ``now`` in, IP packets
and the next deadline out. It owns

- the connection table, keyed by (remote address, remote port, local port);
- the listeners: a bounded SYN queue per port and, when it is full, SYN
  cookies (RFC 4987 §3.6) so a SYN flood cannot exhaust memory or lock out
  real clients;
- resets for segments that belong to no connection (RFC 9293 §3.10.7.1);
- the reuse of a connection in TIME-WAIT by a new SYN (RFC 6191);
- one timer heap over every connection's next deadline (stale entries are
  skipped lazily, so re-arming a timer costs O(log n) and nothing else);
- the ICMP errors ingress routes here because they quote one of our
  segments (``icmp_errors.py`` says what each one does);
- the one log record of each connection's life, ``tcp_closed`` at info when
  it ends (addresses, duration, bytes and counters, reason, whether it was
  ever established), as ``relay_flow`` is a relayed flow's; ``tcp_established``
  and ``tcp_state`` are debug records.

Both families: a flow's remote address is 4 or 16 bytes, our address and
the MSS we offer (MTU - 40, or MTU - 60 over IPv6) follow from it.
- in attach mode, connections to other addresses (``Flow.local`` set):
  their SYN is held by ``workers.attach.tcp`` until the shell's upstream
  connect settles, then accepted (or reset, or answered with ICMP), and
  their service is a ``RelayService`` (a relaying core, ``workers.attach.relay``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
from collections.abc import Mapping

from pipeline.flow import Flow
from pipeline.offload import Offload, checksum_vouched, tcp_offload
from pipeline.wire import Malformed
from pipeline.wire.addr import fmt_addr
from pipeline.wire import ipv6
from pipeline.wire.ipv4 import PROTO_ICMP, PROTO_TCP
from pipeline.wire.seqnum import seq_add, seq_gt, seq_sub
from pipeline.wire.tcp import HEADER_LEN as TCP_HEADER_LEN
from pipeline.wire.tcp import Flags, TcpOptions, TcpPacket, TcpSegment
from workers.attach import relay
from workers.core import IPV6_ADDRESS_LEN, Addresses, Outgoing, Sink, ip_reply, ip_view, reply_header_len
from pipeline.ratelimit import TokenBucket
from workers.tcp import events
from workers.services.tcp import SERVICES
from workers.tcp.config import TcpConfig
from workers.tcp.connection import MAX_WINDOW_SHIFT, Connection, State, ts_clock, window_shift
from workers.services.hosting import ServiceFactory, ServiceHost
from workers.tcp.icmp_errors import IcmpErrors
from workers.tcp.introspect import connection_record
from workers.tcp.isn import initial_sequence_number
from workers.tcp.options import Negotiated
from workers.attach.tcp import FlowRecord, PendingSyn, RelayService, TcpRelay
from workers.tcp.segments import reset_for, syn_ack
from workers.tcp.syncookies import CookieOptions, SynCookies, decode_cookie_options, encode_ts_options

# Linux (tcp_timewait_state_process): a reopened connection's ISN is the old SND.NXT plus this.
TIME_WAIT_ISN_GAP = 65535 + 2
_SYN_ACK_RST = Flags.SYN | Flags.ACK | Flags.RST
EPHEMERAL_FIRST, EPHEMERAL_COUNT = 32768, 28232  # Linux's default ip_local_port_range, 32768-60999
SYN_QUEUE_LIMIT = 256        # default half-open connections per listening port before cookies
MAX_TIME_WAIT = 8192         # default connections held in TIME-WAIT (Linux: tcp_max_tw_buckets)
RESETS_PER_SECOND = 2000     # resets for unknown flows (a scan cannot make us flood)
IPV6_EXTRA_HEADER = 20  # RFC 8200 §3: 40 bytes of IP header against IPv4's 20, so MSS = MTU - 60
# Connection counters in tcp_closed, the one record of a connection's life (as relay_flow is a relayed flow's).
CLOSE_STATS = ("bytes_sent", "bytes_received", "segments_in", "segments_out", "retransmissions", "timeouts",
               "fast_retransmits", "loss_probes", "lost_retransmissions", "zero_window_probes", "ooo_segments",
               "challenge_acks", "ce_received", "ece_received")
# RFC 3168 §5: the ECN field, the low two bits of the IPv4 TOS / IPv6 traffic class.
ECN_MASK = 0b11
ECN_ECT0 = 0b10
ECN_CE = 0b11
# States before the handshake completes: a connection that closes from one of them without
# having sent Connected was never established (tcp_closed says established: false).
_UNSYNCHRONIZED = frozenset({State.CLOSED, State.LISTEN, State.SYN_SENT, State.SYN_RECEIVED})


class TcpDemux:
    def __init__(self, sink: Sink, address: bytes, config: TcpConfig, secret: bytes,
                 services: Mapping[int, ServiceFactory] | None = None, offload: bool = False,
                 syn_queue_limit: int = SYN_QUEUE_LIMIT, address6: bytes | None = None,
                 relay_: TcpRelay | None = None, max_time_wait: int = MAX_TIME_WAIT) -> None:
        self.sink = sink
        self.log = sink.log
        self.config = config
        # Over IPv6 every segment carries 20 more bytes of IP header: a smaller MSS (RFC 9293 §3.7.1).
        self.config6 = dataclasses.replace(config, mss=config.mss - IPV6_EXTRA_HEADER)
        self.address = address
        self.addresses = Addresses(address, address6)
        self.secret = secret
        self.cookies = SynCookies(secret)
        # The services on their ports (the worker passes the registry's table), fenced by the host.
        self.host = ServiceHost(SERVICES if services is None else services, self.log, sink.counters)
        self.connections: dict[Flow, Connection] = {}
        self.born: dict[Flow, float] = {}  # when each connection was created (stackctl conns)
        self.syn_queue: dict[int, set[Flow]] = {}  # listening port -> its half-open connections
        self.syn_queue_limit = syn_queue_limit
        # Connections in TIME-WAIT, oldest first. Each is a whole connection (~5 kB) for 2 MSL, so a
        # client churning connections would grow the worker without bound; past max_time_wait the
        # oldest leaves TIME-WAIT early, as Linux drops TIME-WAIT sockets past tcp_max_tw_buckets.
        self.time_wait: dict[Flow, None] = {}
        self.max_time_wait = max_time_wait
        self._timers: list[tuple[float, Flow]] = []
        self._deadline: dict[Flow, float] = {}
        self.resets = TokenBucket(RESETS_PER_SECOND, RESETS_PER_SECOND)
        self._opened: list[Flow] = []  # flow changes not yet announced to ingress
        self._closed: list[Flow] = []
        # With device offloads, the kernel finishes our checksums and cuts large
        # segments to the MSS (TSO): we emit up to config.max_send_segment at once.
        self.offload = offload
        self.icmp_errors = IcmpErrors(sink)
        self.relay = relay_  # attach mode: flows to other addresses are relayed (None: reset)
        self.relays: dict[Flow, RelayService] = {}  # relayed connections' bridges (not hosted services)
        self._port_counter = 0  # RFC 6056 §3.3.4: ephemeral ports for published (inbound) flows

    # -- drivers -------------------------------------------------------------

    def handle_packet(self, data: bytes, now: float, offload: Offload | None = None) -> list[Outgoing]:
        sink = self.sink
        # Ingress checked the IP header and the TCP lengths; the checksum and options are ours.
        ip = ip_view(data)
        if ip.protocol in (PROTO_ICMP, ipv6.ICMPV6):
            out: list[Outgoing] = []
            reached = self.icmp_errors.handle(ip, self.connections, now)
            if reached is not None:
                self._after(*reached, now, out)
            return out
        tcp = TcpPacket.trusted(ip.payload)
        src = ip.src
        try:
            if not checksum_vouched(offload) and not tcp.verify_checksum(src, ip.dst):
                raise Malformed("bad_checksum")
            seg = tcp.segment()
        except Malformed as exc:
            sink.drop(exc.reason, layer="tcp")
            return []
        if sink.debug:
            sink.log.debug("tcp_in", src=fmt_addr(src), dst=fmt_addr(ip.dst), ttl=ip.ttl, sport=seg.src_port,
                           dport=seg.dst_port, seq=seg.seq, ack=seg.ack, flags=str(seg.flags),
                           window=seg.window, len=len(seg.payload), options=_fmt_options(seg.options),
                           **sink.payload(seg.payload))
        dst = ip.dst
        key = Flow(src, seg.src_port, seg.dst_port, b"" if dst == self.addresses.local(src) else bytes(dst))
        conn = self.connections.get(key)
        out = []
        if conn is not None:
            if conn.state is State.TIME_WAIT and seg.flags & _SYN_ACK_RST == Flags.SYN \
                    and time_wait_reusable(conn, seg, self.config.timestamps):
                if key.local:  # a relayed flow's next incarnation needs its own upstream connect first
                    self._log_closed(key, conn, "time_wait_reused", True, now)
                    self._forget(key)
                    self._relay_syn(key, seg, data, now, out)
                else:
                    self._reopen(key, conn, seg, now, out)
                return out
            before = conn.state
            conn.receive(seg, now, ip.tos & ECN_MASK == ECN_CE)
            self._after(key, conn, before, now, out)
        elif key.local:
            self._relay_syn(key, seg, data, now, out)
        elif self.host.listens(seg.dst_port):
            self._listen(key, seg, now, out)
        else:
            self._reset(key, seg, now, out, "closed_port")
        self._flush_woken(now, out)
        return out

    def handle_timer(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        if self.relay is not None:
            self.relay.now = now
            self.relay.expire(now)
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
        first = timers[0][0] if timers else None
        if self.relay is not None and self.relay.pending:
            connect = self.relay.next_deadline()
            return connect if first is None else min(first, connect)  # type: ignore[type-var]
        return first

    # -- relaying (attach mode) ---------------------------------------------------

    def relay_commands(self) -> list[relay.Command]:
        return [] if self.relay is None else self.relay.take_commands()

    def handle_upstream(self, reported: list[relay.Upstream], now: float) -> list[Outgoing]:
        """What the upstream sockets said: settle held SYNs, feed established relays."""
        out: list[Outgoing] = []
        tcp_relay = self.relay
        if tcp_relay is None:
            return out
        tcp_relay.now = now
        for ev in reported:
            key = ev.key
            if ev.kind == relay.ACCEPTED:
                self._publish_accepted(ev, now, out)
                continue
            held = tcp_relay.settle(key)  # type: ignore[arg-type]
            if held is not None:
                self._relay_settled(key, held, ev, now, out)  # type: ignore[arg-type]
                continue
            conn = self.connections.get(key)  # type: ignore[arg-type, call-overload]
            app = self.relays.get(key)  # type: ignore[arg-type, call-overload]
            if conn is None or app is None:
                continue  # the connection ended meanwhile
            before = conn.state
            app.on_upstream(ev, now)
            self._after(key, conn, before, now, out)  # type: ignore[arg-type]
        return out

    def _publish_accepted(self, ev: relay.Upstream, now: float, out: list[Outgoing]) -> None:
        """A connection accepted on a published port: open ours to the namespace (RFC 9293 §3.10.1)."""
        tcp_relay = self.relay
        assert tcp_relay is not None
        remote, rport = tcp_relay.namespace_address, tcp_relay.publish[int(ev.detail)]
        lport = self._ephemeral_port(remote, rport)
        if lport is None:
            tcp_relay.commands.append(relay.Close(ev.key, reset=True))
            self.sink.drop("publish_no_port")
            return
        key = Flow(remote, rport, lport)
        tcp_relay.commands.append(relay.Adopt(ev.key, key))
        tcp_relay.published[key] = int(ev.detail)
        tcp_relay.sink.counters["relay_published_accepted"] += 1
        iss = initial_sequence_number(self.secret, (self.address, lport), (remote, rport), now)
        conn = Connection.connect(lport, rport, iss, self.config, now)
        self.connections[key] = conn
        self.born[key] = now
        self._opened.append(key)  # announced before the SYN leaves, so the SYN-ACK is routed here
        self._after(key, conn, State.CLOSED, now, out)

    def _ephemeral_port(self, remote: bytes, rport: int) -> int | None:
        """A local port for an active open: RFC 6056 §3.3.4 (algorithm 4, a keyed hash plus a counter).

        Each worker has its own secret, so workers rarely pick the same port; one in use here is skipped.
        """
        self._port_counter += 1
        base = hashlib.blake2s(remote + rport.to_bytes(2, "big"), key=self.secret[:32]).digest()
        offset = int.from_bytes(base[:2], "big") + self._port_counter
        for i in range(EPHEMERAL_COUNT):
            port = EPHEMERAL_FIRST + (offset + i) % EPHEMERAL_COUNT
            if Flow(remote, rport, port) not in self.connections:
                return port
        return None

    def _relay_syn(self, key: Flow, seg: TcpSegment, packet: bytes, now: float, out: list[Outgoing]) -> None:
        """A segment to another address with no connection: a SYN starts an upstream connect."""
        if self.relay is None or seg.flags & _SYN_ACK_RST != Flags.SYN:
            self._reset(key, seg, now, out, "relay_no_connection")
            return
        self.relay.now = now
        if not self.relay.open(key, seg, bytes(packet), now):
            self._reset(key, seg, now, out, "relay_denied")

    def _relay_settled(self, key: Flow, held: PendingSyn, ev: relay.Upstream, now: float,
                       out: list[Outgoing]) -> None:
        """The upstream connect finished: accept the held SYN, or tell the client what the network said."""
        kind, syn = ev.kind, held.syn
        if kind == relay.CONNECTED:
            local = (key.local, key.lport)
            self._accept(key, syn, initial_sequence_number(self.secret, local, (key.remote, key.rport), now),
                         now, out)
            return
        counters = self.sink.counters
        counters["relay_connect_" + kind] += 1
        if kind == relay.REFUSED:
            self._reset(key, syn, now, out, "relay_refused")
        elif kind == relay.UNREACHABLE:
            # RFC 1812 §5.2.7.1 / RFC 4443 §3.1: what the network said, quoting the client's SYN.
            out.append(relay.unreachable(key.local, key.remote, "net" if ev.detail == "net" else "host",
                                         held.packet))
        # TIMED_OUT: silence, the client times out.
        assert self.relay is not None
        record = FlowRecord(held.started)
        if ev.data:  # an errno other than the usual ones: say which
            record.extra["error"] = ev.data.decode(errors="replace")
        self.relay.log_flow("tcp", key, record, now, "upstream_" + kind)

    def stats(self) -> dict[str, int]:
        stats = {"connections": len(self.connections), "time_wait": len(self.time_wait)}
        if self.relay is not None:  # attach mode: how many of them are relayed, and connects under way
            stats["relayed"] = sum(1 for key in self.connections if key.local)
            stats["relay_connecting"] = len(self.relay.pending)
        return stats

    def connection_table(self, now: float) -> list[dict]:
        """Every connection as a record for stackctl conns (workers.tcp.introspect)."""
        return [connection_record(conn, key.local or self.addresses.local(key.remote), key,
                                  self.born.get(key, now), now)
                for key, conn in self.connections.items()]

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
            rport, lport = flow.rport, flow.lport
            self.sink.counters["orphans_reset"] += 1
            probe = TcpSegment(lport, rport, 0, 0, Flags.ACK, 0)
            out.append(self._ip(flow, probe))
        return out

    def close(self, now: float) -> list[Outgoing]:
        """Shutting down: reset every connection so no peer is left hanging.

        One in TIME-WAIT has nothing left to say to its peer; it ends quietly, with its
        ``tcp_closed`` record (the one record of its life) written now, not never.
        """
        out: list[Outgoing] = []
        for key, conn in list(self.connections.items()):
            before = conn.state
            if before is State.TIME_WAIT:
                conn.end_time_wait("closed")
            elif before is not State.CLOSED:
                conn.abort()
            self._after(key, conn, before, now, out)
        return out

    # -- listeners -----------------------------------------------------------

    def _listen(self, key: Flow, seg: TcpSegment, now: float, out: list[Outgoing]) -> None:
        """A segment for a listening port with no connection (RFC 9293 §3.10.7.2)."""
        if seg.rst:
            self.sink.drop("rst_no_connection")  # §3.10.7.2: an incoming RST is ignored
            return
        remote, local = (key.remote, key.rport), (self.addresses.local(key.remote), key.lport)  # a listener
        if seg.ack_flag:
            # An ACK with no connection: the last step of a SYN-cookie handshake, or junk.
            if not seg.syn:
                mss = self.cookies.check(local, remote, seq_add(seg.seq, -1), seq_add(seg.ack, -1), now)
                options = None if mss is None else decode_cookie_options(seg.options.timestamp, mss)
                if options is not None:
                    conn = self._cookie_connection(key, seg, options, now)
                    self.connections[key] = conn
                    self.born[key] = now
                    self._opened.append(key)
                    self.sink.counters["syn_cookies_accepted"] += 1
                    self._after(key, conn, State.LISTEN, now, out)
                    return
            self._reset(key, seg, now, out, "ack_no_connection")
            return
        if not seg.syn:
            self.sink.drop("no_syn_no_connection")  # §3.10.7.2: drop anything else
            return
        queue = self.syn_queue.get(key.lport)
        if (0 if queue is None else len(queue)) >= self.syn_queue_limit:
            self._cookie_syn_ack(key, seg, now, out)
            return
        self._accept(key, seg, initial_sequence_number(self.secret, local, remote, now), now, out)

    def _accept(self, key: Flow, syn: TcpSegment, iss: int, now: float, out: list[Outgoing],
                announce: bool = True) -> None:
        """A new connection in SYN-RECEIVED, counted in its port's SYN queue."""
        conn = Connection.accept(key.lport, key.rport, syn, iss, self._config(key.remote), now)
        self.connections[key] = conn
        self.born[key] = now
        if announce:
            self._opened.append(key)
        queue = self.syn_queue.get(key.lport)
        if queue is None:
            queue = self.syn_queue[key.lport] = set()
        queue.add(key)
        self._after(key, conn, State.LISTEN, now, out)

    def _reopen(self, key: Flow, old: Connection, syn: TcpSegment, now: float, out: list[Outgoing]) -> None:
        """A new SYN ends a connection in TIME-WAIT and starts the next incarnation (RFC 6191).

        RFC 9293 §3.6.1 (1): the new ISN is above every sequence number the
        old incarnation used; like Linux we take its SND.NXT + 65535 + 2. The
        flow stays ours, so ingress is told nothing (a close then an open of
        the same flow would read as the flow gone).
        """
        self.sink.counters["time_wait_reused"] += 1
        self._log_closed(key, old, "time_wait_reused", True, now)  # TIME-WAIT is reached only from ESTABLISHED
        self._discard(key)
        self._accept(key, syn, seq_add(old.snd_nxt, TIME_WAIT_ISN_GAP), now, out, announce=False)

    def _cookie_syn_ack(self, key: Flow, syn: TcpSegment, now: float, out: list[Outgoing]) -> None:
        """The SYN queue is full: answer statelessly with a cookie ISN (RFC 4987 §3.6).

        With timestamps the SYN-ACK also offers window scaling and SACK and
        keeps the peer's in the low bits of its TSval (``syncookies``); without,
        only the MSS survives, so nothing else is offered.
        """
        self.sink.counters["syn_cookies_sent"] += 1
        cfg = self._config(key.remote)
        opts = syn.options
        peer_mss = opts.mss or 536  # RFC 9293 §3.7.1: default send MSS
        cookie = self.cookies.make((self.addresses.local(key.remote), key.lport), (key.remote, key.rport), syn.seq, peer_mss, now)
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
        out.append(self._ip(key, reply))

    def _cookie_connection(self, key: Flow, ack: TcpSegment, options: CookieOptions, now: float) -> Connection:
        """The connection a valid cookie ACK opens, with the options the cookie kept (no ECN:
        the cookie SYN-ACK never offers it)."""
        config = self._config(key.remote)
        negotiated = Negotiated.offered(config, options.mss, options.window_scale, options.sack_permitted,
                                        options.timestamps)
        return Connection.from_cookie(key.lport, key.rport, ack, seq_add(ack.ack, -1), negotiated, config, now)

    def _reset(self, key: Flow, seg: TcpSegment, now: float, out: list[Outgoing], reason: str) -> None:
        """RFC 9293 §3.10.7.1: answer a segment for no connection with a reset (never a reset to a reset)."""
        rst = reset_for(seg)
        if rst is None:
            self.sink.drop("rst_no_connection")
            return
        self.sink.counters["resets_sent_" + reason] += 1
        if not self.resets.take(now):
            self.sink.drop("reset_rate_limited")
            return
        out.append(self._ip(key, rst))

    # -- connections ---------------------------------------------------------

    def _after(self, key: Flow, conn: Connection, before: State, now: float, out: list[Outgoing]) -> None:
        """Deliver a connection's events to its service, then collect its output and re-arm its timer."""
        log = self.log
        debug = self.sink.debug
        connected = False  # Connected is among these events
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, events.Connected):
                connected = True
                if debug:  # tcp_closed is the connection's record (info); this one is for debugging
                    log.debug("tcp_established", remote=fmt_addr(key.remote), rport=key.rport, lport=key.lport,
                              **({"local": fmt_addr(key.local)} if key.local else {}))
                if self.relay is not None and (key.local or key in self.relay.published):
                    self.relays[key] = RelayService(conn, key, self.relay, now)  # type: ignore[arg-type]
            app = self.relays.get(key)
            if app is None:
                self.host.deliver(key, conn, ev, now)
            elif isinstance(ev, events.DataReceived):
                app.on_readable()
            elif isinstance(ev, events.SendSpace):
                app.on_writable()
            elif isinstance(ev, events.PeerClosed):
                app.on_eof()
            if isinstance(ev, events.Closed):
                self._log_closed(key, conn, ev.reason, connected or before not in _UNSYNCHRONIZED, now)
                if app is not None:
                    app.on_closed(ev.reason, now)
                if self.relay is not None and key in self.relay.published:
                    if app is None:  # the namespace refused or never answered: reset the outer client
                        self.relay.commands.append(relay.Close(key, reset=True))
                        self.relay.log_flow("tcp", key, FlowRecord(now), now, "namespace_" + ev.reason)
                    del self.relay.published[key]
        if debug and conn.state is not before:
            log.debug("tcp_state", remote=fmt_addr(key.remote), rport=key.rport, lport=key.lport,
                      old=before.name, new=conn.state.name)
        mss = conn.max_segment if self.offload else None  # only TSO needs it (_ip)
        ecn = conn.ecn_ok
        for seg in conn.segments_to_send(now):
            out.append(self._ip(key, seg, mss, ECN_ECT0 if ecn and conn.ect(seg) else 0))
        if conn.state is State.CLOSED:
            self._forget(key)
            return
        if before in _UNSYNCHRONIZED and conn.state is not State.SYN_RECEIVED:
            self._leave_syn_queue(key)  # only a connection in SYN-RECEIVED is in its port's SYN queue
        if conn.state is State.TIME_WAIT and key not in self.time_wait:
            self._hold_time_wait(key, now, out)
            if conn.state is State.CLOSED:
                return  # it was the oldest itself (max_time_wait 0)
        deadline = conn.get_timer()
        app_deadline = self.host.timer(key)
        if app_deadline is not None and (deadline is None or app_deadline < deadline):
            deadline = app_deadline
        if deadline is None:
            self._deadline.pop(key, None)
        elif self._deadline.get(key) != deadline:
            self._deadline[key] = deadline
            heapq.heappush(self._timers, (deadline, key))

    def _hold_time_wait(self, key: Flow, now: float, out: list[Outgoing]) -> None:
        """key entered TIME-WAIT: past the limit, the oldest connection in TIME-WAIT ends now."""
        time_wait = self.time_wait
        time_wait[key] = None
        if len(time_wait) <= self.max_time_wait:
            return
        oldest = next(iter(time_wait))
        conn = self.connections[oldest]
        self.sink.counters["time_wait_overflow"] += 1
        conn.end_time_wait("time_wait_overflow")
        self._after(oldest, conn, State.TIME_WAIT, now, out)

    def _log_closed(self, key: Flow, conn: Connection, reason: str, established: bool, now: float) -> None:
        """The one record of a connection's life, when it ends: who, how long, how much, why.

        ``established``: the handshake completed (false: a SYN that went nowhere). A relayed
        connection's record is its ``relay_flow``; this one is then written at debug only.
        """
        relayed = self.relay is not None and (bool(key.local) or key in self.relay.published)
        if relayed and not self.sink.debug:
            return  # its relay_flow record says it (one line fewer per flow through honcho)
        fields: dict[str, object] = {"remote": fmt_addr(key.remote), "rport": key.rport, "lport": key.lport}
        if key.local:
            fields["local"] = fmt_addr(key.local)
        fields["established"] = established
        fields["duration"] = round(now - self.born.get(key, now), 3)
        fields["reason"] = reason
        soft = conn.soft_error  # RFC 1122 §4.2.3.9: reported if the connection fails
        if soft:
            fields["soft_error"] = soft
        for name in CLOSE_STATS:
            fields[name] = getattr(conn, name)
        if relayed:
            self.log.debug("tcp_closed", **fields)
        else:
            self.log.info("tcp_closed", **fields)

    def _forget(self, key: Flow) -> None:
        self._discard(key)
        self._closed.append(key)

    def _discard(self, key: Flow) -> None:
        self.connections.pop(key)
        self.time_wait.pop(key, None)
        self._leave_syn_queue(key)
        self.host.forget(key)
        self.relays.pop(key, None)
        self.born.pop(key, None)
        self._deadline.pop(key, None)

    def _flush_woken(self, now: float, out: list[Outgoing]) -> None:
        """Collect the output of connections a service touched from another connection's callback."""
        while woken := self.host.woken():
            for key in woken:
                conn = self.connections.get(key)
                if conn is not None:
                    self._after(key, conn, conn.state, now, out)

    def _leave_syn_queue(self, key: Flow) -> None:
        queue = self.syn_queue.get(key.lport)
        if queue:
            queue.discard(key)

    def _config(self, remote: bytes) -> TcpConfig:
        return self.config6 if len(remote) == IPV6_ADDRESS_LEN else self.config

    def _ip(self, key: Flow, seg: TcpSegment, mss: int | None = None, tos: int = 0) -> Outgoing:
        """The segment in an IP packet from our side of ``key`` (a relayed flow's destination) to its peer."""
        remote = key.remote
        local = key.local or self.addresses.local(remote)
        # The TCP header apart from the payload: ip_reply then copies the payload once.
        if not self.offload:
            return ip_reply(local, remote, PROTO_TCP, seg.payload, tos,
                            transport_header=seg.emit_header(local, remote)), None
        tcp_header_len = seg.header_len
        segment_size = (mss or self._config(remote).mss) - (tcp_header_len - TCP_HEADER_LEN)
        return (ip_reply(local, remote, PROTO_TCP, seg.payload, tos,
                         transport_header=seg.emit_header(local, remote, checksum=False)),
                tcp_offload(reply_header_len(remote), tcp_header_len, len(seg.payload), segment_size,
                            bool(seg.flags & Flags.CWR), ipv6=len(remote) == IPV6_ADDRESS_LEN))


def time_wait_reusable(conn: Connection, syn: TcpSegment, timestamps: bool) -> bool:
    """May this SYN reopen a connection in TIME-WAIT? (RFC 6191 §2)

    ``timestamps``: our configuration allows them for the new incarnation.
    With timestamps on both incarnations the SYN's TSval must be newer than
    TS.Recent (or equal, with a sequence number above RCV.NXT); otherwise its
    sequence number must be above RCV.NXT (RFC 1122 §4.2.2.13). A SYN that
    fails is an old duplicate, left to the TIME-WAIT connection as before.
    """
    ts = syn.options.timestamp
    if conn.ts_ok and timestamps and ts is not None:
        newer = seq_sub(ts[0], conn.ts_recent)  # RFC 7323 §5.3: timestamps compare modulo 2**32
        if newer != 0:
            return newer > 0
    return seq_gt(syn.seq, conn.rcv_nxt)


def _fmt_options(o: TcpOptions) -> dict[str, object]:
    shown = {"mss": o.mss, "ws": o.window_scale, "sack_ok": o.sack_permitted or None,
             "ts": list(o.timestamp) if o.timestamp else None,
             "sack": [[a, b] for a, b in o.sack_blocks] or None}
    return {k: v for k, v in shown.items() if v is not None}

