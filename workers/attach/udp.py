"""UDP relaying for attach mode: one upstream socket per flow, closed when idle.

Contract (sans-IO, ``workers.attach.relay``): a datagram from the namespace to
another address opens (once per flow: client address and port, destination
address and port) a connected upstream UDP socket and is sent on it; each
datagram the socket receives goes back to the client from the destination's
address and port, fragmented to the device MTU when larger (RFC 791 §3.2).
A port unreachable the upstream network reports (ECONNREFUSED on the
connected socket) becomes ICMP port unreachable toward the client, quoting
the client's last datagram (RFC 1122 §3.2.2.1). A destination the policy
refuses gets ICMP administratively prohibited (RFC 1812 §5.2.7.1). A flow idle for ``idle`` seconds (``idle_dns`` for
port 53, whose flows are one question and one answer) is closed, and its
record logged.

Inbound (``USTACK_PUBLISH=udp:HOST:NS``): a datagram received on a published
port where the stack runs goes into the namespace from the stack's address
and a port kept per sender (RFC 6056 style, from a counter), to the
namespace's address and port; the namespace's answers to that port go back
to the sender from the published port. Idle mappings expire like flows.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.flow import Flow
from workers.attach.policy import ForwardPolicy
from pipeline.wire.ipv4 import PROTO_UDP
from pipeline.wire.udp import UdpDatagram
from workers.attach import relay
from workers.core import Outgoing, Sink, fit_mtu, ip_reply

MAX_QUOTE = 576   # bytes of the client's last datagram kept for an ICMP error's quote
MAX_FLOWS = 4096  # open upstream sockets per worker; beyond, new flows are refused (counted)


@dataclass(slots=True)
class UdpFlow:
    started: float
    last: float
    quote: bytes  # the client's last datagram (IP packet, truncated) for ICMP errors
    denied: bool = False
    name: str = ""  # the name our resolver learned the destination from
    bytes_up: int = 0
    bytes_down: int = 0
    datagrams_up: int = 0
    datagrams_down: int = 0


@dataclass(slots=True)
class Inbound:
    """One sender of datagrams to a published port, and the port we use for it inside."""

    listener: int   # the published port
    peer: str       # the sender, "address|port"
    port: int       # our source port toward the namespace
    last: float


INBOUND_FIRST, INBOUND_COUNT = 32768, 28232


class UdpRelay(relay.DatagramFlows):
    proto = relay.UDP

    def __init__(self, sink: Sink, address: bytes, policy: ForwardPolicy, mtu: int,
                 idle: float, idle_dns: float, max_flows: int = MAX_FLOWS,
                 publish: dict[int, int] | None = None, namespace_address: bytes = b"") -> None:
        super().__init__(sink, address, policy, idle, max_flows)
        self.mtu = mtu
        self.idle_dns = idle_dns
        self._ident = 0  # IPv4 Identification / IPv6 fragment id of the datagrams we fragment
        self.publish = publish or {}
        self.namespace_address = namespace_address
        self.inbound_by_peer: dict[tuple[int, str], Inbound] = {}
        self.inbound_by_port: dict[int, Inbound] = {}
        self._next_port = 0
        for port in self.publish:
            self.commands.append(relay.Listen(("listen", port), relay.UDP, port))

    # -- inbound (published ports) ------------------------------------------------------

    def received(self, ev: relay.Upstream, now: float) -> list[Outgoing]:
        """A datagram on a published port: into the namespace, from a port kept for its sender."""
        listener = ev.key[1]  # type: ignore[index]
        mapping = self.inbound_by_peer.get((listener, ev.detail))
        if mapping is None:
            port = self._free_port()
            if port is None:
                self.sink.drop("publish_udp_no_port")
                return []
            mapping = Inbound(listener, ev.detail, port, now)
            self.inbound_by_peer[(listener, ev.detail)] = mapping
            self.inbound_by_port[port] = mapping
            self.sink.counters["relay_published_udp_peers"] += 1
        mapping.last = now
        udp = UdpDatagram(mapping.port, self.publish[listener], ev.data).emit(self.address, self.namespace_address)
        return self._fitted(self.address, self.namespace_address, udp)

    def _fitted(self, src: bytes, dst: bytes, udp: bytes) -> list[Outgoing]:
        """A datagram toward the namespace, fragmented to the device MTU (RFC 791 §3.2, RFC 8200 §4.5)."""
        self._ident = (self._ident + 1) & 0xFFFFFFFF
        packet = ip_reply(src, dst, PROTO_UDP, udp, dont_fragment=False, ident=self._ident & 0xFFFF)
        return [(piece, None) for piece in fit_mtu(packet, self.mtu, self._ident) or []]

    def answer(self, src: bytes, sport: int, dport: int, payload: bytes, now: float) -> bool:
        """A datagram to the stack: if it answers a published port's sender, send it back; else False."""
        mapping = self.inbound_by_port.get(dport)
        if mapping is None or src != self.namespace_address or sport != self.publish[mapping.listener]:
            return False
        mapping.last = now
        self.commands.append(relay.SendTo(("listen", mapping.listener), payload, mapping.peer))
        return True

    def _free_port(self) -> int | None:
        for _ in range(INBOUND_COUNT):
            self._next_port = (self._next_port + 1) % INBOUND_COUNT
            port = INBOUND_FIRST + self._next_port
            if port not in self.inbound_by_port:
                return port
        return None

    def datagram(self, key: Flow, payload: bytes, packet: bytes, now: float) -> list[Outgoing]:
        """A datagram from the namespace to ``key.local``: relay it (opening the flow) or refuse it."""
        flow = self.admit(key, key.lport, now, lambda denied: UdpFlow(now, now, packet[:MAX_QUOTE], denied=denied))
        if flow is None:
            return []
        flow.last = now
        if flow.denied:
            # RFC 1812 §5.2.7.1 / RFC 4443 §3.1: administratively prohibited, from the destination.
            return [relay.unreachable(key.local, key.remote, "admin", packet)]
        flow.quote = packet[:MAX_QUOTE]
        flow.bytes_up += len(payload)
        flow.datagrams_up += 1
        self.commands.append(relay.Send(key, payload))
        return []

    def upstream(self, ev: relay.Upstream, now: float) -> list[Outgoing]:
        if ev.kind == relay.RECEIVED:
            return self.received(ev, now)
        key: Flow = ev.key  # type: ignore[assignment]
        flow = self.flows.get(key)
        if flow is None:
            return []
        if ev.kind == relay.DATA:
            flow.last = now
            flow.bytes_down += len(ev.data)
            flow.datagrams_down += 1
            udp = UdpDatagram(key.lport, key.rport, ev.data).emit(key.local, key.remote)
            return self._fitted(key.local, key.remote, udp)
        if ev.kind == relay.REFUSED:
            self.sink.counters["relay_udp_port_unreachable"] += 1
            return [relay.unreachable(key.local, key.remote, "port", flow.quote)]
        if ev.kind == relay.UNREACHABLE:  # no route, or the network said host/net unreachable
            self.sink.counters["relay_udp_unreachable"] += 1
            self.end(key, now, "upstream_unreachable")
            kind = ev.detail if ev.detail in ("host", "net") else "host"
            return [relay.unreachable(key.local, key.remote, kind, flow.quote)]
        return []

    def expire(self, now: float) -> None:
        for key, flow in list(self.flows.items()):
            if flow.last + self._idle(key) <= now:
                self.end(key, now, "idle")
        for mapping in list(self.inbound_by_port.values()):
            if mapping.last + self.idle <= now:
                del self.inbound_by_port[mapping.port]
                del self.inbound_by_peer[(mapping.listener, mapping.peer)]

    def next_deadline(self) -> float | None:
        flows = min((f.last + self._idle(k) for k, f in self.flows.items()), default=None)
        inbound = min((m.last + self.idle for m in self.inbound_by_port.values()), default=None)
        return inbound if flows is None else flows if inbound is None else min(flows, inbound)

    def end(self, key: Flow, now: float, reason: str) -> None:
        flow = self.flows.pop(key)
        if flow.denied:
            return
        self.commands.append(relay.Close(key))
        relay.log_flow(self.sink, "udp", key, flow.started, now, reason, name=flow.name, bytes_up=flow.bytes_up,
                       bytes_down=flow.bytes_down, packets_up=flow.datagrams_up, packets_down=flow.datagrams_down)

    def close(self, now: float) -> None:
        for key in list(self.flows):
            self.end(key, now, "shutdown")

    def _idle(self, key: Flow) -> float:
        return self.idle_dns if key.lport == 53 else self.idle
