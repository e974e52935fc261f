"""The TCP worker's core, the demultiplexer: finds each segment's owner, runs timers, hands events on.

Sans-IO like the connections it drives: IP packets and ``now`` in, IP packets
and the next deadline out. It owns the connection table, keyed by flow
(remote address and port, our port and, in attach mode, the address the
flow was sent to), and hands each segment to its connection or, for none,
to the listener (``listener.py``: listening ports, SYN queue and cookies,
resets, RFC 9293 §3.10.7.1-2) or, for a flow to another address (attach
mode), to the relay (``workers.attach.tcp``). Besides, it

- lets a new SYN end a connection in TIME-WAIT (RFC 6191) and caps how
  many are held in it (``time_wait.py``);
- keeps one timer heap over every connection's next deadline (stale entries
  are skipped lazily, so re-arming a timer costs O(log n) and nothing else);
- takes the ICMP errors ingress routes here because they quote one of our
  segments (``icmp_errors.py`` says what each one does);
- hands each connection's events to the service host (``workers.services.hosting``),
  which runs every service, the relays' too;
- writes the one record of each connection's life, ``tcp_closed`` at info
  when it ends (``introspect.closed_record``), as ``relay_flow`` is a relayed
  flow's; ``tcp_established`` and ``tcp_state`` are debug records.

Both families: our address and the MSS we offer (MTU - 40, or MTU - 60 over
IPv6) follow from the remote address (``encapsulation.py``, which also
builds the IP packet around each segment).
"""

from __future__ import annotations

from _blake2 import blake2s  # hashlib's blake2s, without the OpenSSL hashlib loads (~3 MB a process)
import heapq
from collections.abc import Callable, Collection, Mapping
from typing import Protocol

from pipeline.flow import Flow
from pipeline.offload import Offload, checksum_vouched
from pipeline.wire import Malformed
from pipeline.wire.addr import fmt_addr
from pipeline.wire import ipv6
from pipeline.wire.ipv4 import PROTO_ICMP
from pipeline.wire.tcp import ACK, RST, SYN, TcpPacket, TcpSegment
from workers.attach import relay
from workers.core import Outgoing, Sink, ip_view
from workers.tcp import events
from workers.services.tcp import SERVICES, Service
from workers.tcp.config import TcpConfig
from workers.tcp.connection import Connection, State
from workers.services.hosting import Relays, ServiceFactory, ServiceHost
from workers.tcp.encapsulation import Encapsulation
from workers.tcp.icmp_errors import IcmpErrors
from workers.tcp.introspect import closed_record, connection_record, options_fields
from workers.tcp.listener import Listener
from workers.tcp.time_wait import TimeWait, reopen_isn, reusable

EPHEMERAL_FIRST, EPHEMERAL_COUNT = 32768, 28232  # Linux's default ip_local_port_range, 32768-60999
# RFC 3168 §5: the ECN field, the low two bits of the IPv4 TOS / IPv6 traffic class.
ECN_MASK = 0b11
ECN_ECT0 = 0b10
ECN_CE = 0b11
# States before the handshake completes: a connection that closes from one of them without
# having sent Connected was never established (tcp_closed says established: false).
_UNSYNCHRONIZED = frozenset({State.CLOSED, State.LISTEN, State.SYN_SENT, State.SYN_RECEIVED})


class Relay(Relays, Protocol):
    """What the demux asks of attach mode's relay (``workers.attach.tcp.TcpRelay``) besides its services;
    it answers through the demux's doors (``accept``, ``connect``, ``reset``, ``call_service``)."""

    def segment(self, key: Flow, seg: TcpSegment, packet: bytes, now: float, demux: TcpDemux,
                out: list[Outgoing]) -> None:
        """A segment for another address that has no connection."""
    def upstream(self, reported: list[relay.Upstream], now: float, demux: TcpDemux, out: list[Outgoing]) -> None:
        """What the shell's upstream sockets said."""
    def expire(self, now: float) -> None: ...
    def next_deadline(self) -> float | None: ...
    def take_commands(self) -> list[relay.Command]: ...
    def stats(self, flows: Mapping[Flow, Connection]) -> dict[str, int]: ...
    def set_published(self, table: Collection[tuple[str, int, int]]) -> None:
        """The published ports ingress sent: listen on them (``workers.attach.inbound``)."""


class TcpDemux:
    def __init__(self, sink: Sink, address: bytes, config: TcpConfig, secret: bytes,
                 services: Mapping[int, ServiceFactory] | None = None, offload: bool = False, *,
                 syn_queue_limit: int, max_time_wait: int, address6: bytes | None = None,
                 relay_: Relay | None = None) -> None:
        self.sink = sink
        self.log = sink.log
        self.config = config
        self.secret = secret
        self.encap = Encapsulation(address, address6, config, offload)
        self.addresses = self.encap.addresses  # read for every segment: one hop, not two
        self.listener = Listener(sink, self.encap, secret, syn_queue_limit)
        self.time_wait = TimeWait(sink, max_time_wait)
        # The services on their ports (the worker passes the registry's table), and in attach
        # mode the relayed flows' (the relay's), all fenced by the host.
        self.host = ServiceHost(SERVICES if services is None else services, self.log, sink.counters, relay_)
        self.relay = relay_  # attach mode: flows to other addresses are relayed (None: reset)
        self.connections: dict[Flow, Connection] = {}
        self.born: dict[Flow, float] = {}  # when each connection was created (stackctl conns)
        self._timers: list[tuple[float, Flow]] = []
        self._deadline: dict[Flow, float] = {}
        self._opened: list[Flow] = []  # flow changes not yet announced to ingress
        self._closed: list[Flow] = []
        self.icmp_errors = IcmpErrors(sink)
        self._port_counter = 0  # RFC 6056 §3.3.4: ephemeral ports for active opens

    @property
    def syn_queue_limit(self) -> int:
        return self.listener.syn_queue_limit

    @syn_queue_limit.setter
    def syn_queue_limit(self, limit: int) -> None:
        self.listener.syn_queue_limit = limit

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
                           window=seg.window, len=len(seg.payload), options=options_fields(seg.options),
                           **sink.payload(seg.payload))
        dst = ip.dst
        key = Flow(src, seg.src_port, seg.dst_port, b"" if dst == self.addresses.local(src) else bytes(dst))
        conn = self.connections.get(key)
        out = []
        if conn is not None:
            if conn.state is State.TIME_WAIT and int(seg.flags) & (SYN | ACK | RST) == SYN \
                    and reusable(conn, seg, self.config.timestamps):
                self._reopen(key, conn, seg, data, now, out)
                return out
            before = conn.state
            conn.receive(seg, now, ip.tos & ECN_MASK == ECN_CE)
            self._after(key, conn, before, now, out)
        elif key.local:
            self._elsewhere(key, seg, data, now, out)
        elif self.host.listens(seg.dst_port):
            opened = self.listener.segment(key, seg, now, out)
            if opened is not None:
                self._admit(key, opened, now, out)
        else:
            self.listener.reset(key, seg, now, out, "closed_port")
        self._flush_woken(now, out)
        return out

    def handle_timer(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        if self.relay is not None:
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
        if self.relay is not None:
            connect = self.relay.next_deadline()
            if connect is not None and (first is None or connect < first):
                return connect
        return first

    # -- attach mode: the shell's side of the relay (workers.attach.relay) -----------

    def relay_commands(self) -> list[relay.Command]:
        return [] if self.relay is None else self.relay.take_commands()

    def handle_upstream(self, reported: list[relay.Upstream], now: float) -> list[Outgoing]:
        """What the upstream sockets said, for the relay to settle held SYNs and feed relayed connections."""
        out: list[Outgoing] = []
        if self.relay is not None:
            self.relay.upstream(reported, now, self, out)
            self._flush_woken(now, out)
        return out

    def set_published(self, table: Collection[tuple[str, int, int]], now: float) -> None:
        """The table of published ports ingress sent: the relay listens on its TCP ones."""
        if self.relay is not None:
            self.relay.set_published(table)

    # -- the doors of connections opened or fed from outside (the relay) -----------

    def accept(self, key: Flow, syn: TcpSegment, now: float, out: list[Outgoing]) -> None:
        """Accept a SYN held for ``key`` (a relayed flow's, once its upstream connected) into SYN-RECEIVED."""
        self._admit(key, self.listener.accept(key, syn, self.listener.isn(key, now), now), now, out)

    def connect(self, remote: bytes, rport: int, now: float, out: list[Outgoing],
                source: Flow | None = None) -> Flow | None:
        """An active open (RFC 9293 §3.10.1) to ``remote``:``rport``: from our address and an ephemeral
        port, or from ``source`` (attach mode: a published port's client, in the shape of a relayed
        flow's key, ``Flow(remote, rport, client port, client address)``, whose packets leave from
        ``source.local``). None if no port is free, or if ``source``'s flow is in use."""
        announce = True
        if source is None:
            lport = self._ephemeral_port(remote, rport)
            if lport is None:
                return None
            key = Flow(remote, rport, lport)
            isn = self.listener.isn(key, now)
        else:
            key, lport = source, source.lport
            isn = self.listener.isn(key, now)
            old = self.connections.get(key)
            if old is not None:
                if old.state is not State.TIME_WAIT:
                    return None
                # The client took the same port again while our side of its last connection waits in
                # TIME-WAIT: that one ends and the new one starts above every sequence number it used
                # (RFC 6191's reasoning, for our own SYN); the flow stays ours, so ingress is told nothing.
                self._log_closed(key, old, "time_wait_reused", True, now)
                self.sink.counters["time_wait_reused"] += 1
                self._discard(key)
                isn, announce = reopen_isn(old), False
        conn = Connection.connect(lport, rport, isn, self.encap.config(remote), now)
        self.connections[key] = conn
        self.born[key] = now
        if announce:
            self._opened.append(key)  # announced before the SYN leaves, so the SYN-ACK is routed here
        self._after(key, conn, State.CLOSED, now, out)
        return key

    def reset(self, key: Flow, seg: TcpSegment, now: float, out: list[Outgoing], reason: str) -> None:
        """Answer a segment of no connection with a reset (RFC 9293 §3.10.7.1), counted under ``reason``."""
        self.listener.reset(key, seg, now, out, reason)

    def call_service(self, key: Flow, now: float, out: list[Outgoing], callback: Callable[[Service], None]) -> None:
        """Run ``callback`` on the service of key's connection, then collect what it caused."""
        conn = self.connections.get(key)
        if conn is None:
            return  # the connection ended meanwhile
        before = conn.state
        if self.host.call(key, now, callback):
            self._after(key, conn, before, now, out)

    # -- the worker's other questions ------------------------------------------------

    def stats(self) -> dict[str, int]:
        stats = {"connections": len(self.connections), "time_wait": len(self.time_wait)}
        if self.relay is not None:  # attach mode: how many of them are relayed, and connects under way
            stats.update(self.relay.stats(self.connections))
        return stats

    def connection_table(self, now: float) -> list[dict]:
        """Every connection as a record for stackctl conns (workers.tcp.introspect)."""
        return [connection_record(conn, self.encap.local(key), key, self.born.get(key, now), now)
                for key, conn in self.connections.items()]

    def flows(self) -> list[Flow]:
        return list(self.connections)

    def flow_changes(self) -> tuple[list[Flow], list[Flow]]:
        opened, closed = self._opened, self._closed
        self._opened, self._closed = [], []
        return opened, closed

    def reset_orphans(self, flows: tuple[Flow, ...], now: float) -> list[Outgoing]:
        """Make the peers of a dead worker's connections reset them (``Listener.provoke_reset``)."""
        out: list[Outgoing] = []
        for flow in flows:
            if flow not in self.connections:
                self.listener.provoke_reset(flow, out)
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

    # -- dispatch ------------------------------------------------------------

    def _elsewhere(self, key: Flow, seg: TcpSegment, packet: bytes, now: float, out: list[Outgoing]) -> None:
        """A segment for another address with no connection: the relay's (attach mode), else a reset."""
        if self.relay is None:
            self.listener.reset(key, seg, now, out, "relay_no_connection")
        else:
            self.relay.segment(key, seg, packet, now, self, out)

    def _reopen(self, key: Flow, old: Connection, syn: TcpSegment, packet: bytes, now: float,
                out: list[Outgoing]) -> None:
        """A new SYN ends a connection in TIME-WAIT and starts the next incarnation (RFC 6191).

        Its ISN lies above every sequence number the old incarnation used
        (``time_wait.reopen_isn``). The flow stays ours, so ingress is told
        nothing (a close then an open of the same flow would read as the flow
        gone). A relayed flow's next incarnation needs its own upstream
        connect first: its SYN goes to the relay as one of no connection.
        """
        self._log_closed(key, old, "time_wait_reused", True, now)  # TIME-WAIT is reached only from ESTABLISHED
        if key.local:
            self._forget(key)
            self._elsewhere(key, syn, packet, now, out)
            return
        self.sink.counters["time_wait_reused"] += 1
        self._discard(key)
        conn = self.listener.accept(key, syn, reopen_isn(old), now)
        self._admit(key, conn, now, out, announce=False)

    def _admit(self, key: Flow, conn: Connection, now: float, out: list[Outgoing], announce: bool = True) -> None:
        """A connection a SYN (or a cookie's ACK) opened joins the table; collect its first output."""
        self.connections[key] = conn
        self.born[key] = now
        if announce:
            self._opened.append(key)
        self._after(key, conn, State.LISTEN, now, out)

    def _after(self, key: Flow, conn: Connection, before: State, now: float, out: list[Outgoing]) -> None:
        """Deliver a connection's events to its service, then collect its output and re-arm its timer."""
        log = self.log
        debug = self.sink.debug
        host = self.host
        connected = False  # Connected is among these events
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, events.Connected):
                connected = True
                if debug:  # tcp_closed is the connection's record (info); this one is for debugging
                    log.debug("tcp_established", remote=fmt_addr(key.remote), rport=key.rport, lport=key.lport,
                              **({"local": fmt_addr(key.local)} if key.local else {}))
            host.deliver(key, conn, ev, now)
            if isinstance(ev, events.Closed):
                self._log_closed(key, conn, ev.reason, connected or before not in _UNSYNCHRONIZED, now)
        if debug and conn.state is not before:
            log.debug("tcp_state", remote=fmt_addr(key.remote), rport=key.rport, lport=key.lport,
                      old=before.name, new=conn.state.name)
        encap = self.encap
        mss = conn.sender.max_segment() if encap.offload else None  # only TSO needs it
        ecn = conn.options.ecn
        for seg in conn.segments_to_send(now):
            out.append(encap.packet(key, seg, mss, ECN_ECT0 if ecn and conn.ect(seg) else 0))
        if conn.state is State.CLOSED:
            self._forget(key)
            return
        if before in _UNSYNCHRONIZED and conn.state is not State.SYN_RECEIVED:
            self.listener.leave_queue(key)  # only a connection in SYN-RECEIVED is in its port's SYN queue
        if conn.state is State.TIME_WAIT and key not in self.time_wait.held:
            oldest = self.time_wait.hold(key)
            if oldest is not None:  # past the cap: the oldest connection in TIME-WAIT ends now
                old = self.connections[oldest]
                old.end_time_wait("time_wait_overflow")
                self._after(oldest, old, State.TIME_WAIT, now, out)
                if conn.state is State.CLOSED:
                    return  # it was the oldest itself (max_time_wait 0)
        deadline = conn.get_timer()
        app_deadline = host.timer(key)
        if app_deadline is not None and (deadline is None or app_deadline < deadline):
            deadline = app_deadline
        if deadline is None:
            self._deadline.pop(key, None)
        elif self._deadline.get(key) != deadline:
            self._deadline[key] = deadline
            heapq.heappush(self._timers, (deadline, key))

    def _log_closed(self, key: Flow, conn: Connection, reason: str, established: bool, now: float) -> None:
        """``tcp_closed``, at info; a relayed connection's record is its ``relay_flow``, so this one is debug."""
        relayed = self.host.relayed(key)
        if relayed and not self.sink.debug:
            return  # its relay_flow record says it (one line fewer per flow through honcho)
        fields = closed_record(conn, key, self.born.get(key, now), now, reason, established)
        if relayed:
            self.log.debug("tcp_closed", **fields)
        else:
            self.log.info("tcp_closed", **fields)

    def _forget(self, key: Flow) -> None:
        self._discard(key)
        self._closed.append(key)

    def _discard(self, key: Flow) -> None:
        self.connections.pop(key)
        self.time_wait.discard(key)
        self.listener.leave_queue(key)
        self.host.forget(key)
        self.born.pop(key, None)
        self._deadline.pop(key, None)

    def _flush_woken(self, now: float, out: list[Outgoing]) -> None:
        """Collect the output of connections a service touched from another connection's callback."""
        while woken := self.host.woken():
            for key in woken:
                conn = self.connections.get(key)
                if conn is not None:
                    self._after(key, conn, conn.state, now, out)

    def _ephemeral_port(self, remote: bytes, rport: int) -> int | None:
        """A local port for an active open: RFC 6056 §3.3.4 (algorithm 4, a keyed hash plus a counter).

        Each worker has its own secret, so workers rarely pick the same port; one in use here is skipped.
        """
        self._port_counter += 1
        base = blake2s(remote + rport.to_bytes(2, "big"), key=self.secret[:32]).digest()
        offset = int.from_bytes(base[:2], "big") + self._port_counter
        for i in range(EPHEMERAL_COUNT):
            port = EPHEMERAL_FIRST + (offset + i) % EPHEMERAL_COUNT
            if Flow(remote, rport, port) not in self.connections:
                return port
        return None

