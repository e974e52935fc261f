"""TCP relaying for attach mode: a namespace's connection bridged to a real upstream socket.

Contract (sans-IO, ``workers.attach.relay``): the demux hands a segment for
another address that has no connection to ``TcpRelay.segment``; a SYN is held
(never answered) while the shell connects upstream, and the client's own SYN
retransmissions are absorbed meanwhile. Only a successful connect makes the
relay accept the SYN through the demux (``TcpDemux.accept``), so the client
sees what a real network shows: a handshake once the server is there, a
reset when it refused, an ICMP destination unreachable when it is
unreachable, and silence when it does not answer (the client times out itself).

The relayed connection is hosted like every other service
(``workers.services.hosting``): ``TcpRelay`` is the host's ``Relays``, and once
the connection is established its service is a ``RelayService`` on a hosted
stream, which mirrors, in both directions:

* bytes, with back-pressure: upstream bytes the connection's send buffer
  cannot take are held (at most one socket read) and the upstream socket
  is paused until ``on_writable``; namespace bytes are read from the stream
  only while the upstream socket accepts them (``BLOCKED`` … ``DRAINED``),
  so the receive window closes on a slow upstream. No buffer is unbounded.
* half-close: the client's FIN becomes ``shutdown(SHUT_WR)``, the
  upstream's end of stream our FIN (RFC 9293 §3.10.4: receiving continues);
* resets: the client's RST (or our abort) closes the socket with
  ``SO_LINGER`` 0, the upstream's ECONNRESET aborts the connection
  (RFC 9293 §3.10.5).

What the upstream socket says reaches the service through the demux
(``TcpDemux.call_service``), which then collects the connection's output.

Inbound (published ports), the same bridge runs the other way round: a
connection accepted where the stack runs makes the relay actively open a
connection to the namespace's address and port (``TcpDemux.connect``, RFC
9293 §3.10.1) from the outside client's own address and port, or the
stack's (``workers.attach.inbound`` says which); once established,
``RelayService`` joins the two. The table of published ports comes from
ingress and changes while the stack runs (``set_published``): a port that
went stops listening, and connections already accepted through it carry on.

Each flow's record (bytes each way, duration, close reason,
retransmissions) is logged once when it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.flow import Flow
from pipeline.wire.tcp import ACK, RST, SYN, TcpSegment
from workers.attach import relay
from workers.core import Outgoing, Sink
from workers.attach.policy import ForwardPolicy
from workers.attach.inbound import Inside, Table, changes, client_text, ports_of, split_peer
from workers.services.hosting import HostedStream
from workers.services.tcp import Service

READ_CHUNK = 256 * 1024


class Demux(Protocol):
    """The doors of the TCP demux (``workers.tcp.demux.TcpDemux``) the relay answers through."""

    def accept(self, key: Flow, syn: TcpSegment, now: float, out: list[Outgoing]) -> None: ...
    def connect(self, remote: bytes, rport: int, now: float, out: list[Outgoing],
                source: Flow | None = None) -> Flow | None: ...
    def reset(self, key: Flow, seg: TcpSegment, now: float, out: list[Outgoing], reason: str) -> None: ...
    def call_service(self, key: Flow, now: float, out: list[Outgoing],
                     callback: Callable[[Service], None]) -> None: ...


@dataclass(slots=True)
class PendingSyn:
    syn: TcpSegment
    packet: bytes    # the SYN's IP packet, quoted by an ICMP error
    started: float
    deadline: float


@dataclass(slots=True)
class FlowRecord:
    """What the flow's JSON record says when it ends."""

    started: float
    bytes_up: int = 0     # namespace -> upstream
    bytes_down: int = 0   # upstream -> namespace
    reads: int = 0
    writes: int = 0
    extra: dict[str, object] = field(default_factory=dict)


class TcpRelay:
    """The relayed flows of one TCP worker: held SYNs, commands for the shell, flow records."""

    def __init__(self, sink: Sink, policy: ForwardPolicy, connect_timeout: float,
                 publish: dict[int, int] | None = None, namespace_address: bytes = b"",
                 keepalive: relay.Keepalive | None = None, inside: Inside | None = None) -> None:
        self.sink = sink
        self.policy = policy
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive  # TCP_KEEPALIVE: the upstream sockets probe like our own TCP
        self.pending: dict[Flow, PendingSyn] = {}
        self.names: dict[Flow, str] = {}  # the name each relayed flow's destination was learned from
        self.commands: list[relay.Command] = []
        # Inbound (published ports): port where the stack runs -> port in the namespace (the table
        # ingress sends, set_published; ``publish`` listens at once), where clients enter, and each
        # inbound flow's published port and client (address, port) outside.
        self.publish: dict[int, int] = {}
        self.inside = inside or Inside(namespace_address, b"")  # default: from the stack's address
        self.published: dict[Flow, tuple[int, str, int]] = {}
        if publish:
            self._set_ports(publish)

    # -- the demux's side ----------------------------------------------------------

    def segment(self, key: Flow, seg: TcpSegment, packet: bytes, now: float, demux: Demux,
                out: list[Outgoing]) -> None:
        """A segment for another address with no connection: a SYN starts an upstream connect."""
        if int(seg.flags) & (SYN | ACK | RST) != SYN:
            demux.reset(key, seg, now, out, "relay_no_connection")
        elif not self.open(key, seg, bytes(packet), now):
            demux.reset(key, seg, now, out, "relay_denied")

    def upstream(self, reported: list[relay.Upstream], now: float, demux: Demux, out: list[Outgoing]) -> None:
        """What the upstream sockets said: settle held SYNs, feed established relays."""
        for ev in reported:
            key = ev.key
            if ev.kind == relay.ACCEPTED:
                self._accepted(ev, now, demux, out)
            elif ev.kind == relay.LISTEN_FAILED:
                relay.listen_failed(self.sink, "tcp", self.publish, ev)
            elif isinstance(key, Flow):
                held = self.settle(key)
                if held is not None:
                    self._settled(key, held, ev, now, demux, out)
                else:
                    demux.call_service(key, now, out, _feed(ev))

    def _settled(self, key: Flow, held: PendingSyn, ev: relay.Upstream, now: float, demux: Demux,
                 out: list[Outgoing]) -> None:
        """The upstream connect finished: accept the held SYN, or tell the client what the network said."""
        kind = ev.kind
        if kind == relay.CONNECTED:
            demux.accept(key, held.syn, now, out)
            return
        self.sink.counters["relay_connect_" + kind] += 1
        if kind == relay.REFUSED:
            demux.reset(key, held.syn, now, out, "relay_refused")
        elif kind == relay.UNREACHABLE:
            # RFC 1812 §5.2.7.1 / RFC 4443 §3.1: what the network said, quoting the client's SYN.
            out.append(relay.unreachable(key.local, key.remote, "net" if ev.detail == "net" else "host",
                                         held.packet))
        # TIMED_OUT: silence, the client times out.
        record = FlowRecord(held.started)
        if ev.data:  # an errno other than the usual ones: say which
            record.extra["error"] = ev.data.decode(errors="replace")
        self.log_flow("tcp", key, record, now, "upstream_" + kind)

    def _accepted(self, ev: relay.Upstream, now: float, demux: Demux, out: list[Outgoing]) -> None:
        """A connection accepted on a published port: open ours to the namespace (RFC 9293 §3.10.1),
        from the client's own address and port when it can (``workers.attach.inbound``)."""
        port = int(ev.detail)
        to_port = self.publish.get(port)
        if to_port is None:  # accepted just before the port was unpublished
            self.commands.append(relay.Close(ev.key, reset=True))
            self.sink.drop("publish_unpublished")
            return
        address, client_port = split_peer(ev.data.decode())
        entry = self.inside.entry(address, client_port)
        key = None
        if entry.sport:
            source = Flow(entry.dst, to_port, entry.sport, entry.src)
            if source not in self.pending:  # else the namespace is opening that very flow: ours yields
                key = demux.connect(entry.dst, to_port, now, out, source)
            if key is None:
                self.sink.counters["publish_source_taken"] += 1  # the client's flow is in use: the stack's
        if key is None:
            key = demux.connect(entry.dst, to_port, now, out)
        if key is None:
            self.commands.append(relay.Close(ev.key, reset=True))
            self.sink.drop("publish_no_port")
            return
        self.commands.append(relay.Adopt(ev.key, key))
        self.published[key] = (port, client_text(address), client_port)
        self.sink.counters["relay_published_accepted"] += 1

    def set_published(self, table: Table) -> None:
        """The table of published ports ingress sent (both protocols): listen on what came, close what
        went (connections accepted through it carry on); a changed port takes effect for new ones."""
        self._set_ports(ports_of(table, "tcp"))

    def _set_ports(self, ports: dict[int, int]) -> None:
        listen, close, _ = changes(self.publish, ports)
        for port in close:
            self.commands.append(relay.Close(("listen", port)))
        for port in listen:
            self.commands.append(relay.Listen(("listen", port), relay.TCP, port, self.keepalive))
        self.publish = dict(ports)

    def stats(self, flows: Mapping[Flow, object]) -> dict[str, int]:
        """How many of the demux's connections are relayed, and connects under way."""
        return {"relayed": sum(1 for key in flows if key.local), "relay_connecting": len(self.pending)}

    # -- the service host's side (workers.services.hosting.Relays) -----------------

    def serves(self, key: Flow) -> bool:
        return bool(key.local) or key in self.published

    def start(self, stream: HostedStream) -> Service:
        return RelayService(stream, self)

    def unserved(self, key: Flow, reason: str, now: float) -> None:
        """The connection ended with no relay service: its upstream socket goes too (reset).

        Published: the namespace refused or never answered, so the outer client is reset.
        Outbound: the upstream connect succeeded but the client never finished its handshake,
        or the relay service failed; without this the socket would stay open."""
        self.commands.append(relay.Close(key, reset=True))
        side = "namespace_" if key in self.published else "client_"
        self.log_flow("tcp", key, FlowRecord(now), now, side + reason)

    def forget(self, key: Flow) -> None:
        self.published.pop(key, None)
        self.names.pop(key, None)

    # -- held SYNs -------------------------------------------------------------------

    def open(self, key: Flow, syn: TcpSegment, packet: bytes, now: float) -> bool:
        """A SYN for another address: start connecting upstream; False if the policy refuses it."""
        if key in self.pending:
            self.sink.counters["relay_syn_retransmitted"] += 1
            return True  # still connecting: the client's retransmission is absorbed
        verdict = self.policy.decide(key.local, now)
        if verdict.target is None:
            relay.log_denied(self.sink, "tcp", key, verdict)
            return False
        self.pending[key] = PendingSyn(syn, packet, now, now + self.connect_timeout)
        if verdict.name:
            self.names[key] = verdict.name
        self.commands.append(relay.Open(key, relay.TCP, verdict.target, key.lport, self.keepalive))
        self.sink.counters["relay_connects"] += 1
        return True

    def settle(self, key: Flow) -> PendingSyn | None:
        """The held SYN of a flow whose upstream connect has finished one way or the other."""
        return self.pending.pop(key, None)

    def expire(self, now: float) -> None:
        """Give up on connects past their deadline: no answer, as if the host were silent."""
        for key in [k for k, p in self.pending.items() if p.deadline <= now]:
            held = self.pending.pop(key)
            self.commands.append(relay.Close(key))
            self.sink.counters["relay_connect_timeouts"] += 1
            self.log_flow("tcp", key, FlowRecord(held.started), now, "upstream_timeout")

    def next_deadline(self) -> float | None:
        return min((p.deadline for p in self.pending.values()), default=None)

    def take_commands(self) -> list[relay.Command]:
        commands, self.commands = self.commands, []
        return commands

    def log_flow(self, proto: str, key: Flow, record: FlowRecord, now: float, reason: str) -> None:
        """The one JSON record of a relayed flow, when it ends (a published one names its client)."""
        port, address, client_port = self.published.get(key, (0, "", 0))
        relay.log_flow(self.sink, proto, key, record.started, now, reason, published=port,
                       client=(address, client_port), name=self.names.pop(key, ""), bytes_up=record.bytes_up,
                       bytes_down=record.bytes_down, **record.extra)


class RelayService(Service):
    """One established relayed connection: the hosted stream on one side, the upstream socket on the other."""

    stream: HostedStream

    def __init__(self, stream: HostedStream, relay_: TcpRelay) -> None:
        super().__init__(stream)
        self.key = stream.flow
        self.relay = relay_
        self.record = FlowRecord(stream.now)
        self.down = b""              # upstream bytes the stream had no room for yet
        self.paused = False          # upstream reading paused (our send buffer is full)
        self.blocked = False         # the upstream socket's send would block: stop reading the stream
        self.client_eof = False      # the client's FIN arrived
        self.upstream_eof = False    # the upstream's end of stream arrived
        self.shut_sent = False       # shutdown(SHUT_WR) asked for
        self.fin_sent = False        # our FIN toward the client queued
        self.finished = False        # socket released and record logged
        self.relay.commands.append(relay.Pause(self.key, False))  # handshake done: start reading upstream

    # -- the stream side (workers.services.tcp.Service) --------------------------------

    def on_readable(self) -> None:
        while not self.blocked and not self.finished:
            data = self.stream.recv(READ_CHUNK)
            if not data:
                break
            self.record.bytes_up += len(data)
            self.relay.commands.append(relay.Send(self.key, data))
        if self.client_eof and not self.shut_sent and not self.stream.readable and not self.finished:
            self.shut_sent = True
            self.relay.commands.append(relay.ShutWrite(self.key))
            self._maybe_done(self.stream.now)

    def on_writable(self) -> None:
        self._flush_down(self.stream.now)

    def on_eof(self) -> None:
        self.client_eof = True
        self.on_readable()

    def on_closed(self) -> None:
        """The connection is gone (closed, reset, timed out or aborted): the socket and the record."""
        reason = self.stream.close_reason
        self._finish(self.stream.now, reason, reset=reason != "closed")

    # -- the upstream side -------------------------------------------------------

    def on_upstream(self, ev: relay.Upstream, now: float) -> None:
        kind = ev.kind
        if kind == relay.DATA:
            self.record.bytes_down += len(ev.data)
            self.down += ev.data
            self._flush_down(now)
        elif kind == relay.BLOCKED:
            self.blocked = True
        elif kind == relay.DRAINED:
            self.blocked = False
            self.on_readable()
        elif kind == relay.EOF:
            self.upstream_eof = True
            self._flush_down(now)
        elif kind == relay.RESET:
            self._finish(now, "upstream_reset", release=False)  # the shell closed the socket already
            self.stream.abort()

    def _flush_down(self, now: float) -> None:
        if self.down:
            sent = self.stream.send(self.down)
            self.down = self.down[sent:]
        want_pause = bool(self.down)
        if want_pause != self.paused and not self.upstream_eof and not self.finished:
            self.paused = want_pause
            self.relay.commands.append(relay.Pause(self.key, want_pause))
        if self.upstream_eof and not self.down and not self.fin_sent:
            self.fin_sent = True
            self.stream.close()
            self._maybe_done(now)

    def _maybe_done(self, now: float) -> None:
        """Both directions finished: release the socket now rather than after TIME-WAIT."""
        if self.fin_sent and self.shut_sent:
            self._finish(now, "closed")

    def _finish(self, now: float, reason: str, release: bool = True, reset: bool = False) -> None:
        """Release the upstream socket (unless the shell already did) and log the flow's record, once."""
        if self.finished:
            return
        self.finished = True
        if release:
            self.relay.commands.append(relay.Close(self.key, reset=reset))
        self.record.extra["retransmissions"] = self.stream.retransmissions
        self.relay.log_flow("tcp", self.key, self.record, now, reason)


def _feed(ev: relay.Upstream) -> Callable[[Service], None]:
    """What an upstream socket said, for the service of the connection it belongs to: a relayed
    connection's ``RelayService``, or the resolver's ``workers.attach.dns.DnsTcpService``."""
    def feed(service: Service) -> None:
        on_upstream = getattr(service, "on_upstream", None)
        if on_upstream is not None:
            on_upstream(ev, service.stream.now)
    return feed
