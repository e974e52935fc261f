"""TCP relaying for attach mode: a namespace's connection bridged to a real upstream socket.

Contract (sans-IO, ``workers.attach.relay``): the demux hands a SYN for another
address to ``TcpRelay.open``; the SYN is held (never answered) while the
shell connects upstream, and the client's own SYN retransmissions are
absorbed meanwhile. Only a successful connect lets the demux accept the
SYN, so the client sees what a real network shows: a handshake once the
server is there, a reset when it refused, an ICMP destination unreachable
when it is unreachable, and silence when it does not answer (the
client times out itself).

Once established, ``RelayService`` is the connection's service on the
stream interface (``workers.services.tcp``) and mirrors, in both directions:

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

Inbound (``USTACK_PUBLISH``), the same bridge runs the other way round: a
connection accepted where the stack runs makes the demux actively open a
connection from the stack's address to the namespace's address and port
(RFC 9293 §3.10.1); once established, ``RelayService`` joins the two.

Each flow's record (bytes each way, duration, close reason,
retransmissions) is logged once when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.flow import Flow
from pipeline.wire.tcp import TcpSegment
from workers.attach import relay
from workers.core import Sink
from workers.attach.policy import ForwardPolicy
from workers.services.tcp import Stream

CONNECT_TIMEOUT = 30.0  # seconds for an upstream connect before we give up silently
READ_CHUNK = 256 * 1024


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

    def __init__(self, sink: Sink, policy: ForwardPolicy, connect_timeout: float = CONNECT_TIMEOUT,
                 publish: dict[int, int] | None = None, namespace_address: bytes = b"",
                 keepalive: relay.Keepalive | None = None) -> None:
        self.sink = sink
        self.policy = policy
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive  # TCP_KEEPALIVE: the upstream sockets probe like our own TCP
        self.pending: dict[Flow, PendingSyn] = {}
        self.commands: list[relay.Command] = []
        # Inbound (USTACK_PUBLISH): port where the stack runs -> port of namespace_address (the
        # kernel side of the device), and each inbound flow's published port.
        self.publish = publish or {}
        self.namespace_address = namespace_address
        self.published: dict[Flow, int] = {}
        for port in self.publish:
            self.commands.append(relay.Listen(("listen", port), relay.TCP, port, self.keepalive))
        self.now = 0.0  # the demux's current time, for services (whose callbacks take none)

    def open(self, key: Flow, syn: TcpSegment, packet: bytes, now: float) -> bool:
        """A SYN for another address: start connecting upstream; False if the policy refuses it."""
        if key in self.pending:
            self.sink.counters["relay_syn_retransmitted"] += 1
            return True  # still connecting: the client's retransmission is absorbed
        target = self.policy.target(key.local)
        if target is None:
            relay.log_denied(self.sink, "tcp", key)
            return False
        self.pending[key] = PendingSyn(syn, packet, now, now + self.connect_timeout)
        self.commands.append(relay.Open(key, relay.TCP, target, key.lport, self.keepalive))
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
        """The one JSON record of a relayed flow, when it ends."""
        relay.log_flow(self.sink, proto, key, record.started, now, reason, published=self.published.get(key, 0),
                       bytes_up=record.bytes_up, bytes_down=record.bytes_down, **record.extra)


class RelayService:
    """One established relayed connection: the stream on one side, the upstream socket on the other."""

    def __init__(self, stream: Stream, key: Flow, relay_: TcpRelay, now: float) -> None:
        self.stream = stream
        self.key = key
        self.relay = relay_
        self.record = FlowRecord(now)
        self.down = b""              # upstream bytes the stream had no room for yet
        self.paused = False          # upstream reading paused (our send buffer is full)
        self.blocked = False         # the upstream socket's send would block: stop reading the stream
        self.client_eof = False      # the client's FIN arrived
        self.upstream_eof = False    # the upstream's end of stream arrived
        self.shut_sent = False       # shutdown(SHUT_WR) asked for
        self.fin_sent = False        # our FIN toward the client queued
        self.finished = False        # socket released and record logged
        self.relay.commands.append(relay.Pause(key, False))  # handshake done: start reading upstream

    # -- the stream side (workers.services.tcp.Service protocol) --------------------

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
            self._maybe_done(self.relay.now)

    def on_writable(self) -> None:
        self._flush_down(self.relay.now)

    def on_eof(self) -> None:
        self.client_eof = True
        self.on_readable()

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
        self.record.extra["retransmissions"] = getattr(self.stream, "retransmissions", 0)
        self.relay.log_flow("tcp", self.key, self.record, now, reason)

    def on_closed(self, reason: str, now: float) -> None:
        """The connection is gone (closed, reset, timed out or aborted): the socket and the record."""
        self._finish(now, reason, reset=reason != "closed")
