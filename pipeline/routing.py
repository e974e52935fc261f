"""Ingress routing: which worker gets each packet (pure: no sockets, no clock).

The one checked IPv4 parse of the pipeline happens here (version, lengths,
header checksum, fragments, destination), and for TCP the check of the
header's lengths that routing by ports needs; workers trust the bus and read
those headers through trusted views, re-verifying nothing. ICMP goes to ``icmp``, UDP to ``udp``, any
other protocol to ``icmp`` (which answers protocol unreachable, RFC 1122
§3.2.2.1), and TCP to the worker that owns the flow:

* a flow a worker has announced (it holds the connection) goes to that
  worker while it lives: a worker joining never steals existing flows;
* any other segment goes to the live ``tcp`` worker chosen by rendezvous
  hashing of the flow. For a SYN that worker takes the new connection; for
  anything else it has no connection and answers with a reset, which is
  right (RFC 9293 §3.10.7.1) — that is how the connections of a dead worker
  end instead of hanging.

With forwarding on (attach mode), a packet for another address is relayed:
it goes to the worker of its protocol the same way, and a TCP flow's key
then ends with its destination address (``Flow.local``), so relayed flows
spread over the ``tcp`` workers, keep their affinity and are reset by a
dead worker's successor exactly like the stack's own. Multicast and
broadcast destinations are never relayed.

Right after ingress (re)starts it knows no flows yet: for a short settling
time TCP segments of unknown flows are held until the workers have joined
and re-announced what they own, so an ingress restart resets nothing.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from pipeline.bus.messages import HEARTBEAT_INTERVAL
from pipeline.flow import Flow
from pipeline.membership import Membership
from pipeline.offload import Offload
from pipeline.wire import Malformed
from pipeline.wire.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, Ipv4Packet
from pipeline.wire.tcp import TcpPacket

PENDING_LIMIT = 512    # packets held per role while it has no live worker (or while settling)
PENDING_MAX_AGE = 2.0  # seconds; older ones are dropped (the peer retransmits)
# Long enough for every live worker's next heartbeat and its flow list to arrive.
SETTLE_TIME = HEARTBEAT_INTERVAL * 1.5

_ROLE_BY_PROTO = {PROTO_ICMP: "icmp", PROTO_UDP: "udp", PROTO_TCP: "tcp"}

Pending = tuple[float, bytes, Offload | None]


# Services whose connections must share a worker with the client's other connections to them:
# an iperf3 test is a control connection plus data streams, matched by cookie in one worker.
STEERED_PORTS = frozenset({5201})
_STEERED = frozenset(port.to_bytes(2, "big") for port in STEERED_PORTS)


_LOCAL_KEY_LENGTHS = (8, 20)  # Flow.key of the stack's own flows: IPv4, IPv6 (no relayed destination)


def affinity_key(key: bytes) -> bytes:
    """What a new flow's worker is chosen by: its Flow.key, or for STEERED_PORTS only (remote
    address, local port), so that every connection of one client to such a port lands on the
    same worker (rendezvous hashing keeps that true while the workers stay the same)."""
    if key[-2:] in _STEERED and len(key) in _LOCAL_KEY_LENGTHS:  # relayed flows (Flow.local) are not steered
        return key[:-4] + key[-2:]
    return key


class Router:
    def __init__(self, address: bytes, members: Membership, drop: Callable[..., None], started: float,
                 forward: bool = False) -> None:
        self.address = address
        self.forward = forward
        self.members = members
        self.drop = drop
        self.settle_until = started + SETTLE_TIME
        self.flows: dict[bytes, str] = {}  # Flow.key -> the worker that announced it
        self.pending: dict[str, collections.deque[Pending]] = collections.defaultdict(
            lambda: collections.deque(maxlen=PENDING_LIMIT))

    def route(self, packet: bytes, now: float) -> tuple[str | None, str]:
        """(worker, role) for a packet. (None, role): hold it for later; (None, ""): dropped."""
        if not packet or packet[0] >> 4 != 4:
            self.drop("not_ipv4", version=packet[0] >> 4 if packet else None)
            return None, ""
        try:
            ip = Ipv4Packet.checked(packet)
        except Malformed as exc:
            self.drop(exc.reason, layer="ipv4")
            return None, ""
        relayed = b""
        if ip.dst != self.address:
            if not self.forward:
                self.drop("not_for_us")
                return None, ""
            if not _relayable(ip.dst):
                self.drop("not_unicast")
                return None, ""
            relayed = ip.dst
        role = _ROLE_BY_PROTO.get(ip.protocol, "icmp")
        if role != "tcp":
            return self.members.pick(role, b""), role
        try:
            tcp = TcpPacket.checked(ip.payload)
        except Malformed as exc:
            self.drop(exc.reason, layer="tcp")
            return None, ""
        key = ip.src + tcp.port_bytes + relayed  # Flow(src, sport, dport, relayed).key without making the Flow
        owner = self.flows.get(key)
        if owner is not None and self.members.is_alive(owner):
            return owner, role
        if now < self.settle_until and not tcp.starts_connection:
            return None, role  # an existing flow whose owner has not re-announced yet
        return self.members.pick(role, affinity_key(key)), role

    def hold(self, role: str, born: float, item: tuple[bytes, Offload | None]) -> None:
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
    if len(dst) == 16:
        return dst[0] != 0xFF and any(dst)
    return 0 < dst[0] < 224
