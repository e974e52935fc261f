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

Inbound (published ports, ``udp:HOST:NS``): a datagram received on a
published port where the stack runs goes into the namespace, to its address
and port, from the sender's own address and port, or from the stack's
address and a port kept per sender (RFC 6056 style, from a counter)
(``workers.attach.inbound`` says which). The namespace's answers -- to the
sender's address, which reach us as a datagram for another address, or to
our kept port -- are recognised before anything else and go back to the
sender from the published port. Idle mappings expire like flows, each with
its record; those of a port that is unpublished end with it. The table
comes from ingress and changes while the stack runs (``set_published``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.flow import Flow
from workers.attach.policy import ForwardPolicy
from workers.attach.inbound import Inside, Table, changes, client_text, ports_of, split_peer
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
    """One sender of datagrams to a published port, and how it appears inside."""

    listener: int   # the published port
    peer: str       # the sender, "address|port" as the listening socket reported it (answers go there)
    client: str     # the sender's address, for the record (an IPv4-mapped one as IPv4)
    client_port: int
    src: bytes      # its address inside: its own, the host alias, or the stack's
    sport: int      # its port inside: its own, or one we keep for it (from the stack's address)
    dst: bytes      # the namespace's address
    dport: int      # the namespace's port (the one published when the sender first came)
    answers: Flow   # the flow of the namespace's answers as they arrive (local: b"" for the stack's address)
    started: float
    last: float
    bytes_up: int = 0        # namespace -> sender
    bytes_down: int = 0      # sender -> namespace
    datagrams_up: int = 0
    datagrams_down: int = 0


INBOUND_FIRST, INBOUND_COUNT = 32768, 28232


class UdpRelay(relay.DatagramFlows):
    proto = relay.UDP

    def __init__(self, sink: Sink, address: bytes, policy: ForwardPolicy, mtu: int,
                 idle: float, idle_dns: float, max_flows: int = MAX_FLOWS,
                 publish: dict[int, int] | None = None, namespace_address: bytes = b"",
                 inside: Inside | None = None) -> None:
        super().__init__(sink, address, policy, idle, max_flows)
        self.mtu = mtu
        self.idle_dns = idle_dns
        self._ident = 0  # IPv4 Identification / IPv6 fragment id of the datagrams we fragment
        # Inbound: port where the stack runs -> port in the namespace (the table ingress sends,
        # set_published; ``publish`` listens at once), where senders enter, and their mappings.
        self.publish: dict[int, int] = {}
        self.inside = inside or Inside(namespace_address, address)  # default: from the stack's address
        self.inbound_by_peer: dict[tuple[int, str], Inbound] = {}
        self.inbound_by_answer: dict[Flow, Inbound] = {}
        self.inbound_by_port: dict[int, Inbound] = {}  # the ports we keep for senders (the stack's address)
        self._next_port = 0
        if publish:
            self._set_ports(publish, 0.0)

    # -- inbound (published ports) ------------------------------------------------------

    def set_published(self, table: Table, now: float) -> None:
        """The table of published ports ingress sent (both protocols): listen on what came; what went
        stops, with its senders' mappings; a changed port applies to new senders."""
        self._set_ports(ports_of(table, "udp"), now)

    def _set_ports(self, ports: dict[int, int], now: float) -> None:
        listen, close, _ = changes(self.publish, ports)
        for port in close:
            self.commands.append(relay.Close(("listen", port)))
            for mapping in [m for m in self.inbound_by_peer.values() if m.listener == port]:
                self._unmap(mapping, now, "unpublished")
        for port in listen:
            self.commands.append(relay.Listen(("listen", port), relay.UDP, port))
        self.publish = dict(ports)

    def received(self, ev: relay.Upstream, now: float) -> list[Outgoing]:
        """A datagram on a published port: into the namespace, as its sender's mapping says."""
        listener = ev.key[1]  # type: ignore[index]
        mapping = self.inbound_by_peer.get((listener, ev.detail))
        if mapping is None:
            to_port = self.publish.get(listener)
            if to_port is None:  # read just before the port was unpublished
                self.sink.drop("publish_unpublished")
                return []
            mapping = self._map(listener, to_port, ev.detail, now)
            if mapping is None:
                return []
        mapping.last = now
        mapping.bytes_down += len(ev.data)
        mapping.datagrams_down += 1
        udp = UdpDatagram(mapping.sport, mapping.dport, ev.data).emit(mapping.src, mapping.dst)
        return self._fitted(mapping.src, mapping.dst, udp)

    def _map(self, listener: int, to_port: int, peer: str, now: float) -> Inbound | None:
        """A new sender: its own address and port inside if it can keep them, else a port of ours."""
        address, client_port = split_peer(peer)
        entry = self.inside.entry(address, client_port)
        answers = Flow(entry.dst, to_port, entry.sport, entry.src)
        if entry.sport and (answers in self.inbound_by_answer or answers in self.flows):
            self.sink.counters["publish_source_taken"] += 1  # that flow is in use inside: the stack's
            entry = self.inside.from_stack(entry.dst)
        if not entry.sport:
            port = self._free_port()
            if port is None:
                self.sink.drop("publish_udp_no_port")
                return None
            entry = entry._replace(sport=port)
            answers = Flow(entry.dst, to_port, port)  # answers come to the stack's own address
        mapping = Inbound(listener, peer, client_text(address), client_port, entry.src, entry.sport, entry.dst,
                          to_port, answers, now, now)
        self.inbound_by_peer[(listener, peer)] = mapping
        self.inbound_by_answer[answers] = mapping
        if not answers.local:
            self.inbound_by_port[entry.sport] = mapping
        self.sink.counters["relay_published_udp_peers"] += 1
        return mapping

    def _unmap(self, mapping: Inbound, now: float, reason: str) -> None:
        """A sender's mapping ends (idle, unpublished, shutdown): its record, like a flow's."""
        del self.inbound_by_peer[(mapping.listener, mapping.peer)]
        del self.inbound_by_answer[mapping.answers]
        if not mapping.answers.local:
            del self.inbound_by_port[mapping.sport]
        relay.log_flow(self.sink, "udp", mapping.answers, mapping.started, now, reason, published=mapping.listener,
                       client=(mapping.client, mapping.client_port), bytes_up=mapping.bytes_up,
                       bytes_down=mapping.bytes_down, packets_up=mapping.datagrams_up,
                       packets_down=mapping.datagrams_down)

    def _answered(self, mapping: Inbound, payload: bytes, now: float) -> None:
        """The namespace answered a sender: back to it from the published port."""
        mapping.last = now
        mapping.bytes_up += len(payload)
        mapping.datagrams_up += 1
        self.commands.append(relay.SendTo(("listen", mapping.listener), payload, mapping.peer))

    def _fitted(self, src: bytes, dst: bytes, udp: bytes) -> list[Outgoing]:
        """A datagram toward the namespace, fragmented to the device MTU (RFC 791 §3.2, RFC 8200 §4.5)."""
        self._ident = (self._ident + 1) & 0xFFFFFFFF
        packet = ip_reply(src, dst, PROTO_UDP, udp, dont_fragment=False, ident=self._ident & 0xFFFF)
        return [(piece, None) for piece in fit_mtu(packet, self.mtu, self._ident) or []]

    def answer(self, src: bytes, sport: int, dport: int, payload: bytes, now: float) -> bool:
        """A datagram to the stack: if it answers a published port's sender, send it back; else False."""
        mapping = self.inbound_by_answer.get(Flow(src, sport, dport))
        if mapping is None:
            return False
        self._answered(mapping, payload, now)
        return True

    def _free_port(self) -> int | None:
        for _ in range(INBOUND_COUNT):
            self._next_port = (self._next_port + 1) % INBOUND_COUNT
            port = INBOUND_FIRST + self._next_port
            if port not in self.inbound_by_port:
                return port
        return None

    def datagram(self, key: Flow, payload: bytes, packet: bytes, now: float) -> list[Outgoing]:
        """A datagram from the namespace to ``key.local``: relay it (opening the flow) or refuse it.
        Unless it answers a published port's sender, who entered from its own address (or the alias)."""
        mapping = self.inbound_by_answer.get(key)
        if mapping is not None:
            self._answered(mapping, payload, now)
            return []
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
        if ev.kind == relay.LISTEN_FAILED:
            relay.listen_failed(self.sink, "udp", self.publish, ev)
            return []
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
        for mapping in list(self.inbound_by_peer.values()):
            if mapping.last + self.idle <= now:
                self._unmap(mapping, now, "idle")

    def next_deadline(self) -> float | None:
        flows = min((f.last + self._idle(k) for k, f in self.flows.items()), default=None)
        inbound = min((m.last + self.idle for m in self.inbound_by_peer.values()), default=None)
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
        for mapping in list(self.inbound_by_peer.values()):
            self._unmap(mapping, now, "shutdown")

    def _idle(self, key: Flow) -> float:
        return self.idle_dns if key.lport == 53 else self.idle
