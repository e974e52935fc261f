"""What a relaying core and the shell's upstream sockets say to each other (attach mode).

Contract: a core that relays flows to real sockets stays sans-IO (STYLE.md
§2). It never touches a socket; it queues ``Command`` values (open an
upstream, write bytes, shut down the write side, pause or resume reading,
close or reset) that the shell takes with ``relay_commands()`` and carries
out with ``workers.attach.upstream.Upstreams``, and it is fed back ``Upstream``
events (connected, refused, unreachable, timed out, data, end of stream,
reset, write blocked and drained) with ``handle_upstream(events, now)``.
A key is any hashable value the core chooses per relayed flow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Hashable, Protocol

from pipeline.flow import Flow
from workers.attach.policy import ForwardPolicy, Verdict
from pipeline.wire import icmp, icmpv6, ipv6
from pipeline.wire.addr import fmt_addr
from pipeline.wire.ipv4 import PROTO_ICMP
from workers.core import Outgoing, Sink, StatelessCore, ip_reply

# Upstream protocols.
TCP = "tcp"
UDP = "udp"
ICMP = "icmp"  # echo through an unprivileged datagram ICMP socket

# Event kinds.
CONNECTED = "connected"
REFUSED = "refused"          # ECONNREFUSED: a reset (TCP) or port unreachable (UDP)
UNREACHABLE = "unreachable"  # EHOSTUNREACH / ENETUNREACH: ``detail`` is "host" or "net"
TIMED_OUT = "timed_out"
DATA = "data"
EOF = "eof"
RESET = "reset"
BLOCKED = "blocked"          # a write did not go out whole: the rest waits in the shell
DRAINED = "drained"          # everything written is out: send more
RECEIVED = "received"        # a published UDP port got a datagram: ``detail`` is its sender, "address|port"
ACCEPTED = "accepted"        # a published port took a connection: ``key`` is its provisional key,
                             # ``detail`` the listening port, ``data`` the client, b"address|port";
                             # the core renames it with ``Adopt``
LISTEN_FAILED = "listen_failed"  # a published port could not be bound: ``key`` is the listener's,
                                 # ``detail`` the error


@dataclass(frozen=True, slots=True)
class Keepalive:
    """Keepalive for a real TCP socket, the same settings as our own TCP's (RFC 1122 §4.2.3.6)."""

    idle: float       # seconds without traffic before the first probe
    interval: float   # seconds between probes
    probes: int       # unanswered probes before the connection is dropped


@dataclass(frozen=True, slots=True)
class Open:
    key: Hashable
    proto: str
    address: bytes  # packed, 4 or 16 bytes: the socket's family follows
    port: int       # the destination port (0 for ICMP)
    keepalive: Keepalive | None = None  # TCP: probe an idle upstream connection
    relayed: bool = True  # a namespace's flow (leaves from USTACK_OUTBOUND_ADDR*); False: the stack's own
                          # client (the DNS forwarder asking its resolvers, loopback ones included)


@dataclass(frozen=True, slots=True)
class Send:
    key: Hashable
    data: bytes


@dataclass(frozen=True, slots=True)
class ShutWrite:
    """FIN from the namespace side: shutdown(SHUT_WR) once everything queued is written."""

    key: Hashable


@dataclass(frozen=True, slots=True)
class Pause:
    """Stop (True) or resume (False) reading the upstream socket: back-pressure toward it."""

    key: Hashable
    paused: bool


@dataclass(frozen=True, slots=True)
class Close:
    """Release the socket; ``reset``: with SO_LINGER 0, so the upstream peer gets a RST."""

    key: Hashable
    reset: bool = False


@dataclass(frozen=True, slots=True)
class Listen:
    """Publish: accept connections (TCP, SO_REUSEPORT) or receive datagrams (UDP) on ``port``
    where the stack runs."""

    key: Hashable
    proto: str
    port: int
    keepalive: Keepalive | None = None  # TCP: accepted connections inherit it


@dataclass(frozen=True, slots=True)
class Adopt:
    """An accepted socket's provisional key becomes ``new`` (the flow the core opened for it)."""

    key: Hashable
    new: Hashable


@dataclass(frozen=True, slots=True)
class SendTo:
    """A datagram from a published UDP port back to the sender ``peer`` ("address|port") of one it got."""

    key: Hashable
    data: bytes
    peer: str


Command = Open | Send | ShutWrite | Pause | Close | Listen | Adopt | SendTo


@dataclass(frozen=True, slots=True)
class Upstream:
    key: Hashable
    kind: str
    data: bytes = b""
    detail: str = ""


class RelayCore(Protocol):
    def relay_commands(self) -> list[Command]:
        """Commands queued since the last call, in order."""
    def handle_upstream(self, events: list[Upstream], now: float) -> list[Outgoing]:
        """What the upstream sockets reported; packets to send out."""


def log_flow(sink: Sink, proto: str, key: Flow, started: float, now: float, reason: str, published: int = 0,
             name: str = "", client: tuple[str, int] = ("", 0), **fields: object) -> None:
    """The one JSON record of a relayed flow, when it ends (issue 10: observability).

    ``published``: an inbound flow from ``client`` (its address and port outside) accepted on
    that port where the stack runs, relayed to ``key.remote`` (the namespace's address) and
    ``key.rport``. ``name``: the name our resolver learned the destination from (issue 20), when
    it did."""
    sink.counters["relay_flows_closed"] += 1
    if published:
        ends = {"src": client[0], "sport": client[1], "dst": fmt_addr(key.remote), "dport": key.rport,
                "published": published}
    else:
        ends = {"src": fmt_addr(key.remote), "sport": key.rport, "dst": fmt_addr(key.local), "dport": key.lport}
    if name:
        fields["name"] = name
    sink.log.info("relay_flow", proto=proto, **ends, duration=round(now - started, 3), reason=reason, **fields)


def log_denied(sink: Sink, proto: str, key: Flow, verdict: Verdict) -> None:
    """A destination the policy refuses: counted and one record saying why."""
    sink.counters["relay_denied"] += 1
    sink.counters["relay_denied_" + verdict.reason] += 1
    sink.log.info("relay_denied", proto=proto, src=fmt_addr(key.remote), sport=key.rport, dst=fmt_addr(key.local),
                  dport=key.lport, reason=verdict.reason, **({"name": verdict.name} if verdict.name else {}))


def listen_failed(sink: Sink, proto: str, publish: dict[int, int], ev: Upstream) -> None:
    """A published port this worker could not bind (``LISTEN_FAILED``): counted, said once, and out of
    ``publish`` until the next table from ingress tries it again."""
    port = ev.key[1]  # type: ignore[index]
    publish.pop(port, None)
    sink.counters["publish_listen_failed"] += 1
    sink.log.error("publish_failed", proto=proto, port=port, error=ev.detail)


class DatagramFlows:
    """What the datagram relays (UDP, ICMP echo) share: their flows, admitted by the policy and a
    limit, and the commands queued for the shell."""

    proto = ""

    def __init__(self, sink: Sink, address: bytes, policy: ForwardPolicy, idle: float, max_flows: int) -> None:
        self.sink = sink
        self.address = address  # the stack's: administratively prohibited comes from the gateway
        self.policy = policy
        self.idle = idle
        self.max_flows = max_flows
        self.flows: dict[Flow, Any] = {}
        self.commands: list[Command] = []

    def admit(self, key: Flow, port: int, now: float, make: Callable[[bool], Any]) -> Any:
        """The flow of ``key``, new ones opened upstream (or marked denied); None when the table is full."""
        flow = self.flows.get(key)
        if flow is None:
            if len(self.flows) >= self.max_flows:
                self.sink.drop(f"relay_{self.proto}_flows_full")
                return None
            verdict = self.policy.decide(key.local, now)
            flow = self.flows[key] = make(verdict.target is None)
            flow.name = verdict.name
            if verdict.target is None:
                log_denied(self.sink, self.proto, key, verdict)
            else:
                self.commands.append(Open(key, self.proto, verdict.target, port))
        return flow

    def take_commands(self) -> list[Command]:
        commands, self.commands = self.commands, []
        return commands


class DatagramRelay(Protocol):
    """What a datagram relay (UDP, ICMP echo) offers the core that owns it."""

    def take_commands(self) -> list[Command]: ...
    def upstream(self, ev: Upstream, now: float) -> list[Outgoing]: ...
    def expire(self, now: float) -> None: ...
    def next_deadline(self) -> float | None: ...
    def close(self, now: float) -> None: ...


class DatagramRelayCore(StatelessCore):
    """A core holding no flows of its own whose relay (attach mode; None: off) owns idle-timed flows."""

    relay: DatagramRelay | None = None

    def relay_commands(self) -> list[Command]:
        return [] if self.relay is None else self.relay.take_commands()

    def handle_upstream(self, reported: list[Upstream], now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        if self.relay is not None:
            for ev in reported:
                out += self.relay.upstream(ev, now)
        return out

    def handle_timer(self, now: float) -> list[Outgoing]:
        if self.relay is not None:
            self.relay.expire(now)
        return []

    def next_deadline(self) -> float | None:
        return None if self.relay is None else self.relay.next_deadline()

    def close(self, now: float) -> list[Outgoing]:
        if self.relay is not None:
            self.relay.close(now)
        return []


# Destination unreachable codes per family (RFC 792 / RFC 1812 §5.2.7.1; RFC 4443 §3.1).
_UNREACHABLE_CODES = {"net": (icmp.NET_UNREACHABLE, icmpv6.NO_ROUTE),
                      "host": (icmp.HOST_UNREACHABLE, icmpv6.ADDRESS_UNREACHABLE),
                      "port": (icmp.PORT_UNREACHABLE, icmpv6.PORT_UNREACHABLE),
                      "admin": (icmp.ADMIN_PROHIBITED, icmpv6.ADMIN_PROHIBITED)}


def unreachable(local: bytes, remote: bytes, kind: str, quote: bytes) -> Outgoing:
    """Destination unreachable (``kind``: net, host, port, admin) from ``local`` to ``remote``,
    quoting the packet that caused it, in the family of the addresses."""
    code4, code6 = _UNREACHABLE_CODES[kind]
    if len(remote) == 16:
        return ip_reply(local, remote, ipv6.ICMPV6, icmpv6.dest_unreachable(code6, quote).to_bytes(local, remote)), None
    return ip_reply(local, remote, PROTO_ICMP, icmp.dest_unreachable(code4, quote).emit()), None
