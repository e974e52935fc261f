"""What a protocol core is, for the worker shell (``workers/shell.py``) to drive.

Contract: a core is sans-IO (STYLE.md §2). In: IP packets with their
offload metadata, and the time. Out: packets to send, the flows it holds
(and their changes) and its next deadline. It never imports the shell, the
bus or a clock; what it counts and drops goes to a ``Sink``, and the shell
reads the same counters for its heartbeats. Cores read both IP families
through ``ip_view`` (the same accessors for each) and build every reply's IP
header with ``ip_reply``, which chooses the family by the remote address's
length; ``fit_mtu`` fragments a reply (not TCP) that exceeds the link MTU.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from pipeline import fragments
from pipeline.flow import Flow
from pipeline.offload import Offload
from pipeline.wire import ipv6
from pipeline.wire.ipv4 import HEADER_LEN as IPV4_HEADER_LEN
from pipeline.wire.ipv4 import Ipv4Header, Ipv4Packet

# An IP packet to send, with the virtio-net header fields egress should write
# with it (None: a complete packet, checksums filled in).
Outgoing = tuple[bytes, Offload | None]

REPLY_IP_HEADER_LEN = IPV4_HEADER_LEN  # ip_reply writes no IPv4 options
REPLY_IP6_HEADER_LEN = ipv6.HEADER_LEN  # nor IPv6 extension headers
IPV6_ADDRESS_LEN = ipv6.ADDRESS_LEN


class Sink:
    """Where a core counts: named counters, drops (counted plus one debug line) and a logger."""

    __slots__ = ("counters", "log", "debug", "log_payload")

    def __init__(self, counters: Counter[str], log: Any, debug: bool = False, log_payload: bool = False) -> None:
        self.counters = counters
        self.log = log  # a structlog logger (the core never configures one)
        self.debug = debug
        self.log_payload = log_payload

    def drop(self, reason: str, **fields: object) -> None:
        """Count a dropped packet and write one debug line saying why (STYLE.md §4)."""
        self.counters["drop_" + reason] += 1
        if self.debug:
            self.log.debug("drop", reason=reason, **fields)

    def payload(self, data: bytes | memoryview) -> dict[str, str]:
        """Log fields for a packet's payload: none unless LOG_PAYLOAD=1 asked for them."""
        return {"payload": bytes(data[:64]).hex()} if self.log_payload else {}


def ip_view(data: bytes | memoryview) -> Ipv4Packet | ipv6.Ipv6Datagram:
    """A trusted view of a packet ingress accepted, of either family (src, dst, protocol, payload, tos, ttl)."""
    if data[0] >> 4 == 6:
        return ipv6.Ipv6Datagram.trusted(data)
    return Ipv4Packet.trusted(data)


def ip_reply(local: bytes, remote: bytes, protocol: int, payload: bytes, tos: int = 0,
             dont_fragment: bool = True, ident: int = 0, transport_header: bytes = b"") -> bytes:
    """A reply's IP packet from us to remote: the one place a core builds an IP header.

    The family follows the address length; for IPv6 ``protocol`` is the Next
    Header, and the traffic class carries ``tos`` (RFC 8200 §7). A transport
    header given apart goes between the IP header and ``payload``: the packet
    is then made with one copy of the payload, not one for the transport
    message and another for the IP packet.
    """
    length = len(transport_header) + len(payload)
    if len(remote) == IPV6_ADDRESS_LEN:
        header = ipv6.Ipv6Header(local, remote, protocol, traffic_class=tos).to_bytes(length)
    else:
        header = Ipv4Header(src=local, dst=remote, protocol=protocol, tos=tos, dont_fragment=dont_fragment,
                            ident=ident).emit(length)
    return b"".join((header, transport_header, payload))


def reply_header_len(remote: bytes) -> int:
    """Bytes of IP header ip_reply writes for remote's family."""
    return REPLY_IP6_HEADER_LEN if len(remote) == IPV6_ADDRESS_LEN else REPLY_IP_HEADER_LEN


def fit_mtu(packet: bytes, mtu: int, ident: int) -> list[bytes] | None:
    """packet as is if it fits the link, else its fragments; None if IPv4 DF forbids cutting it.

    IPv4 per RFC 791 §3.2 (the packet's own Identification); IPv6 with a
    Fragment header carrying ``ident`` (RFC 8200 §4.5). TCP never comes here:
    it sizes its segments to the path MTU.
    """
    if len(packet) <= mtu:
        return [packet]
    try:
        if packet[0] >> 4 == 6:
            return fragments.fragment_ipv6(packet, mtu, ident)
        return fragments.fragment_ipv4(packet, mtu)
    except ValueError:  # Don't Fragment set
        return None


class Addresses:
    """Our address per family, chosen by the length of the remote one."""

    __slots__ = ("by_length",)

    def __init__(self, address: bytes, address6: bytes | None = None) -> None:
        self.by_length = {len(address): address}
        if address6 is not None:
            self.by_length[IPV6_ADDRESS_LEN] = address6

    def local(self, remote: bytes) -> bytes:
        return self.by_length[len(remote)]


class WorkerCore(Protocol):
    def handle_packet(self, data: bytes, now: float, offload: Offload | None) -> list[Outgoing]:
        """One IP packet (and its offload metadata from the device) in; packets to send out."""
    def handle_timer(self, now: float) -> list[Outgoing]:
        """Fire what is due at ``now``; packets to send out."""
    def next_deadline(self) -> float | None: ...
    def close(self, now: float) -> list[Outgoing]:
        """Shutting down: release what is held (e.g. reset connections)."""
    def stats(self) -> dict[str, int]:
        """Gauges for the heartbeat (e.g. open connections)."""
    def flows(self) -> list[Flow]:
        """Every flow this worker holds."""
    def flow_changes(self) -> tuple[list[Flow], list[Flow]]:
        """Flows opened and closed since the last call."""
    def reset_orphans(self, flows: tuple[Flow, ...], now: float) -> list[Outgoing]:
        """Make the peers of another (dead) worker's flows reset their connections."""


class StatelessCore:
    """The membership part of WorkerCore for cores that hold no flows (ICMP, UDP)."""

    def handle_timer(self, now: float) -> list[Outgoing]:
        return []

    def next_deadline(self) -> float | None:
        return None

    def close(self, now: float) -> list[Outgoing]:
        return []

    def stats(self) -> dict[str, int]:
        return {}

    def flows(self) -> list[Flow]:
        return []

    def flow_changes(self) -> tuple[list[Flow], list[Flow]]:
        return [], []

    def reset_orphans(self, flows: tuple[Flow, ...], now: float) -> list[Outgoing]:
        return []
