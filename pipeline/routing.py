"""Ingress routing: which worker gets each packet (pure: no sockets, no clock).

The one checked parse of the pipeline happens here, for both families: IPv4
(version, lengths, header checksum, destination) and IPv6 with its
extension-header walk (RFC 8200 §4), and for TCP the check of the header's
lengths that routing by ports needs; workers trust the bus and read those
headers through trusted views, re-verifying nothing.

Fragments of either family go to the ``Reassembler`` (RFC 791, RFC 8200
§4.5) before anything else looks at them: a worker always sees whole
datagrams, which are routed like any packet. Packets owed an ICMP error that
ingress finds (IPv4 protocols we lack, IPv6 Parameter Problems) go to
``icmp``, which builds the error: replies stay out of ingress. The kernel's
own IPv6 interface chatter (router solicitations, MLD, DAD) is counted
quietly (``chatter_<kind>``) and never answered.

ICMP and ICMPv6 go to ``icmp``, UDP to ``udp``, any other IPv4 protocol to
``icmp`` (protocol unreachable, RFC 1122 §3.2.2.1), and TCP to the worker
that owns the flow. An ICMP error that quotes a packet of ours goes where
the quoted flow lives (RFC 1122 §4.2.3.9, RFC 4443 §2.4 (b)): a TCP flow's
owner, the UDP worker for UDP. For TCP:

* a flow a worker has announced (it holds the connection) goes to that
  worker while it lives: a worker joining never steals existing flows;
* any other segment goes to the live ``tcp`` worker chosen by rendezvous
  hashing of the flow. For a SYN that worker takes the new connection; for
  anything else it has no connection and answers with a reset, which is
  right (RFC 9293 §3.10.7.1) — that is how the connections of a dead worker
  end instead of hanging;
* except that a port some workers announced as steered by client (in their
  heartbeats: a service declares it, as iperf3's does, whose test is a
  control connection plus data connections that must meet in one worker)
  is hashed by (client address, port) instead, among the workers that
  announced it: every connection of one client to that port reaches the
  same worker. Ingress itself knows no port numbers.

A TCP segment's checked view (``Segment``: its source, flow key and TCP
view) is handed on with the route, so that admission reads it without
parsing the packet again. Flow keys come from ``pipeline.flow`` only.

With forwarding on (attach mode), a packet for another address is relayed:
it goes to the worker of its protocol the same way (fragments are
reassembled first), and a TCP flow's key then ends with its destination
address (``Flow.local``), so relayed flows spread over the ``tcp`` workers,
keep their affinity and are reset by a dead worker's successor exactly like
the stack's own. Multicast and broadcast destinations are never relayed.

Right after ingress (re)starts it knows no flows yet: for a short settling
time TCP segments of unknown flows are held until the workers have joined
and re-announced what they own, so an ingress restart resets nothing.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from pipeline.bus.messages import HEARTBEAT_INTERVAL
from pipeline.flow import Flow, client_key, inbound_key, local_port
from pipeline.fragments import Reassembler
from pipeline.membership import Membership
from pipeline.offload import Offload
from pipeline.wire import Malformed, icmp, icmpv6, ipv6
from pipeline.wire.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, Ipv4Packet
from pipeline.wire.tcp import TcpPacket

PENDING_LIMIT = 512    # packets held per role while it has no live worker (or while settling)
PENDING_MAX_AGE = 2.0  # seconds; older ones are dropped (the peer retransmits)
# Long enough for every live worker's next heartbeat and its flow list to arrive.
SETTLE_TIME = HEARTBEAT_INTERVAL * 1.5

_ROLE_BY_PROTO = {PROTO_ICMP: "icmp", PROTO_UDP: "udp", PROTO_TCP: "tcp", ipv6.ICMPV6: "icmp"}
_ICMP_HEADER_LEN = 8  # type, code, checksum, one 32-bit word: then the quote (RFC 792, RFC 4443 §2.1)

# A packet as ingress reads it: bytes, or a view of bytes for a large one (``pipeline.tun``).
Packet = bytes | memoryview
Pending = tuple[float, Packet, Offload | None]


class Segment:
    """A TCP segment as routing checked it, handed on with its route (to ``pipeline.admission``):
    the source address, the flow key (``pipeline.flow.inbound_key``) and the checked TCP view."""

    __slots__ = ("src", "key", "tcp")

    def __init__(self, src: bytes, key: bytes, tcp: TcpPacket) -> None:
        self.src = src
        self.key = key
        self.tcp = tcp


# (worker, role, packet, segment): worker None and a role: hold the packet; role "": dropped (or
# a fragment kept for reassembly). packet: what to forward (the whole datagram after reassembly).
# segment: the checked view of a TCP segment, None for anything else (ICMP errors about TCP flows too).
Route = tuple[str | None, str, Packet, Segment | None]
_DROPPED: Route = (None, "", b"", None)


class Router:
    def __init__(self, address: bytes, members: Membership, drop: Callable[..., None], started: float,
                 address6: bytes | None = None, quiet: Callable[..., None] | None = None,
                 reassembler: Reassembler | None = None, forward: bool = False) -> None:
        self.address = address
        self.forward = forward  # attach mode: relay what is addressed elsewhere
        self.address6 = address6  # None: IPv6 is off, and a counted drop as before
        self.members = members
        self.drop = drop
        self.quiet = quiet or drop  # the kernel's IPv6 chatter: counted, logged at debug only
        self.reassembler = reassembler or Reassembler()
        self.settle_until = started + SETTLE_TIME
        self.flows: dict[bytes, str] = {}  # Flow.key -> the worker that announced it
        self.pending: dict[str, collections.deque[Pending]] = collections.defaultdict(
            lambda: collections.deque(maxlen=PENDING_LIMIT))

    def route(self, packet: Packet, now: float) -> Route:
        """(worker, role, packet to forward, checked TCP segment or None) for a packet read from the device."""
        version = packet[0] >> 4 if packet else None
        if version == 4:
            return self._route_ipv4(packet, now)
        if version == 6 and self.address6 is not None:
            return self._route_ipv6(packet, now)
        self.drop("not_ipv4" if self.address6 is None else "bad_version", version=version)
        return _DROPPED

    def _route_ipv4(self, packet: Packet, now: float, reassembled: bool = False) -> Route:
        try:
            ip = Ipv4Packet.checked(packet, fragments=not reassembled)
        except Malformed as exc:
            self.drop(exc.reason, layer="ipv4")
            return _DROPPED
        relayed = b""
        if ip.dst != self.address:
            relayed = self._relayed(ip.dst)
            if not relayed:
                return _DROPPED
        if ip.is_fragment:
            whole = self.reassembler.add_ipv4(ip.buf[:ip.total_len], now)
            return _DROPPED if whole is None else self._route_ipv4(whole, now, reassembled=True)
        protocol = ip.protocol
        if protocol == PROTO_ICMP and len(ip.payload) > _ICMP_HEADER_LEN and ip.payload[0] in icmp.QUOTING_ERRORS:
            return self._route_error(icmp.quoted_ipv4(ip.payload[_ICMP_HEADER_LEN:]), packet, now)
        return self._route_transport(packet, protocol, ip.src, ip.payload, now, relayed)

    def _relayed(self, dst: bytes) -> bytes:
        """``dst`` if packets to it are relayed, else b"" (counted as dropped)."""
        if not self.forward:
            self.drop("not_for_us")
            return b""
        if not _relayable(dst):
            self.drop("not_unicast")
            return b""
        return bytes(dst)

    def _route_ipv6(self, packet: Packet, now: float, reassembled: bool = False) -> Route:
        try:
            parsed = ipv6.parse(packet)
        except Malformed as exc:
            self.drop(exc.reason, layer="ipv6")
            return _DROPPED
        header = parsed.header
        relayed = b""
        if header.dst != self.address6:
            # Checked before not_for_us: the kernel's chatter goes to multicast groups.
            kind = self._chatter(packet, parsed)
            if kind is not None:
                self.quiet("chatter_" + kind)
                return _DROPPED
            relayed = self._relayed(header.dst)
            if not relayed:
                return _DROPPED
        if parsed.error is not None:
            return self.members.pick("icmp", b""), "icmp", packet, None  # it builds the Parameter Problem
        if parsed.fragment is not None:
            if reassembled:  # a Fragment header inside a reassembled packet
                self.drop("nested_fragment", layer="ipv6")
                return _DROPPED
            whole = self.reassembler.add_ipv6(packet, parsed, now)
            return _DROPPED if whole is None else self._route_ipv6(whole, now, reassembled=True)
        if parsed.protocol == ipv6.NO_NEXT_HEADER:
            self.drop("no_next_header", layer="ipv6")  # RFC 8200 §4.7: nothing to deliver
            return _DROPPED
        payload = memoryview(packet)[parsed.payload_offset:parsed.payload_end]
        if parsed.protocol == ipv6.ICMPV6 and len(payload) > _ICMP_HEADER_LEN and payload[0] < icmpv6.ECHO_REQUEST:
            return self._route_error(icmpv6.quoted_ipv6(payload[_ICMP_HEADER_LEN:]), packet, now)
        return self._route_transport(packet, parsed.protocol, header.src, payload, now, relayed)

    def _chatter(self, packet: Packet, parsed: ipv6.Ipv6Packet) -> str | None:
        """The kind of the local kernel's own ICMPv6 chatter this packet is, if it is (RFC 4861, 3810, 4862)."""
        if parsed.protocol != ipv6.ICMPV6 or parsed.error is not None or parsed.fragment is not None:
            return None
        try:
            msg = icmpv6.parse(memoryview(packet)[parsed.payload_offset:parsed.payload_end],
                               parsed.header.src, parsed.header.dst, verify_checksum=False)
        except Malformed:
            return None
        return icmpv6.chatter(msg, parsed.header.src)

    def _route_error(self, quote: icmp.Quote | None, packet: Packet, now: float) -> Route:
        """An ICMP error: to the owner of the flow whose packet it quotes (ICMP ones, and junk, to icmp)."""
        if quote is None or quote.src not in (self.address, self.address6) \
                or quote.protocol not in (PROTO_TCP, PROTO_UDP):
            return self.members.pick("icmp", b""), "icmp", packet, None  # counted and ignored there
        if quote.protocol == PROTO_UDP:
            return self.members.pick("udp", b""), "udp", packet, None
        return self._route_flow(quote.flow_key, False, packet, now, None)

    def _route_transport(self, packet: Packet, protocol: int, src: bytes, payload: memoryview, now: float,
                         relayed: bytes = b"") -> Route:
        if protocol != PROTO_TCP:
            role = _ROLE_BY_PROTO.get(protocol, "icmp")
            return self.members.pick(role, b""), role, packet, None
        try:
            tcp = TcpPacket.checked(payload)
        except Malformed as exc:
            self.drop(exc.reason, layer="tcp")
            return _DROPPED
        segment = Segment(src, inbound_key(src, tcp.port_bytes, relayed), tcp)
        return self._route_flow(segment.key, tcp.starts_connection, packet, now, segment)

    def _route_flow(self, key: bytes, starts_connection: bool, packet: Packet, now: float,
                    segment: Segment | None) -> Route:
        owner = self.flows.get(key)
        if owner is not None and self.members.is_alive(owner):
            return owner, "tcp", packet, segment
        if now < self.settle_until and not starts_connection:
            return None, "tcp", packet, segment  # an existing flow whose owner has not re-announced yet
        return self._pick_new(key), "tcp", packet, segment

    def _pick_new(self, key: bytes) -> str | None:
        """The worker for a flow no worker holds: rendezvous hashing of its key, or, for a port
        workers announced as steered by client, of (client address, port) among those workers."""
        members = self.members
        steered = members.steered_ports("tcp")
        if steered:
            port = local_port(key)  # -1 for a relayed flow: those are never steered
            if port in steered:
                return members.pick_steered("tcp", port, client_key(key))
        return members.pick("tcp", key)

    def hold(self, role: str, born: float, item: tuple[Packet, Offload | None]) -> None:
        """Keep a packet until its role has a worker (bounded: the oldest goes first)."""
        queue = self.pending[role]
        if len(queue) == queue.maxlen:
            self.drop("pending_full", role=role)
        queue.append((born, *item))

    def update_flows(self, worker: str, full: bool, opened: tuple[Flow, ...], closed: tuple[Flow, ...]) -> None:
        """A worker says which flows it holds (all of them if ``full``)."""
        flows = self.flows
        if full:
            for key in [k for k, w in flows.items() if w == worker]:
                del flows[key]
        for flow in opened:
            flows[flow.key] = worker
        for flow in closed:
            key = flow.key
            if flows.get(key) == worker:
                del flows[key]

    def forget_worker(self, worker: str) -> list[Flow]:
        """The worker is gone: drop its flows and return them (their peers must be reset)."""
        keys = [k for k, w in self.flows.items() if w == worker]
        for key in keys:
            del self.flows[key]
        return [Flow.from_key(k) for k in keys]

    def owned_flows(self) -> list[tuple[Flow, str]]:
        """Every announced flow with the worker that owns it."""
        return [(Flow.from_key(key), worker) for key, worker in self.flows.items()]

    def flows_by_worker(self) -> collections.Counter[str]:
        return collections.Counter(self.flows.values())


def _relayable(dst: bytes) -> bool:
    """A unicast destination: IPv4 not 0/8, multicast (224/4) or broadcast (RFC 1122 §3.2.1.3);
    IPv6 not unspecified or multicast (ff00::/8, RFC 4291 §2.7)."""
    if len(dst) == ipv6.ADDRESS_LEN:
        return not ipv6.is_multicast(dst) and any(dst)
    return 0 < dst[0] < 224
