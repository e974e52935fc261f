"""The UDP worker's core, both families: datagrams to services, port unreachable for the rest.

Ingress also routes here the ICMP errors that quote a datagram of ours
(RFC 1122 §4.1.3.3: UDP passes them up); we have no sockets to tell, so they
are counted (``icmp_errors_in``).

In attach mode (a ``UdpRelay``) datagrams to other addresses are relayed
(``workers.attach.udp``), which makes this a relaying core (``workers.attach.relay``),
and queries to our port 53 go to the stack's resolver (``workers.attach.dns``).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING

from pipeline.flow import Flow
from pipeline.offload import Offload, checksum_vouched
from pipeline.wire import Malformed, icmpv6, ipv6
from pipeline.wire.addr import fmt_addr
from pipeline.wire.icmp import PORT_UNREACHABLE, dest_unreachable, parse_icmp
from pipeline.wire.ipv4 import PROTO_ICMP, PROTO_UDP
from pipeline.wire.udp import UdpDatagram, parse_udp
from workers.core import Addresses, Outgoing, Sink, fit_mtu, ip_reply, ip_view
from pipeline.ratelimit import TokenBucket
from workers.attach.relay import Command, DatagramRelayCore, Upstream
from workers.services.udp import SERVICES

# RFC 1812 §4.3.2.8 / RFC 1122 §3.2.2 / RFC 4443 §2.4 (f): ICMP errors are rate limited so a
# flood of datagrams to closed ports cannot be turned into a flood of replies.
ICMP_ERRORS_PER_SECOND = 200
DEFAULT_MTU = 1500
DNS_PORT = 53

if TYPE_CHECKING:  # the relay and dnspython are loaded only by a worker that relays or resolves
    from workers.attach.dns import DnsForwarder
    from workers.attach.udp import UdpRelay


class UdpCore(DatagramRelayCore):
    def __init__(self, sink: Sink, address: bytes,
                 services: Mapping[int, Callable[[bytes], bytes | None]] | None = None,
                 address6: bytes | None = None, mtu: int = DEFAULT_MTU, ident_seed: int = 0,
                 relay_: UdpRelay | None = None, dns: DnsForwarder | None = None) -> None:
        self.relay = relay_
        self.dns = dns  # attach mode's resolver on port 53 (workers.attach.dns)
        self.sink = sink
        self.address = address
        self.services = SERVICES if services is None else services  # the worker passes the registry's
        self.addresses = Addresses(address, address6)
        self.mtu = mtu
        self._ident = ident_seed  # Identification of fragmented replies
        self.icmp_errors = TokenBucket(ICMP_ERRORS_PER_SECOND, ICMP_ERRORS_PER_SECOND)

    def handle_packet(self, data: bytes, now: float, offload: Offload | None = None) -> list[Outgoing]:
        sink = self.sink
        ip = ip_view(data)  # ingress checked it
        src = ip.src
        if ip.protocol in (PROTO_ICMP, ipv6.ICMPV6):
            self._icmp_error(ip.payload, src, ip.dst, ip.protocol)
            return []
        try:
            dgram = parse_udp(ip.payload, src, ip.dst, verify_checksum=not checksum_vouched(offload))
        except Malformed as exc:
            sink.drop(exc.reason, layer="udp")
            return []
        if sink.debug:
            sink.log.debug("udp_in", src=fmt_addr(src), sport=dgram.src_port, dport=dgram.dst_port,
                           len=len(dgram.payload), **sink.payload(dgram.payload))
        local = self.addresses.local(src)
        if ip.dst != local:  # ingress forwards other destinations only in attach mode
            if self.relay is None:
                sink.drop("not_for_us")
                return []
            return self.relay.datagram(Flow(src, dgram.src_port, dgram.dst_port, bytes(ip.dst)),
                                       bytes(dgram.payload), bytes(data), now)
        if self.relay is not None and self.relay.answer(src, dgram.src_port, dgram.dst_port,
                                                        bytes(dgram.payload), now):
            return []  # the namespace answering a published port's sender
        if self.dns is not None and dgram.dst_port == DNS_PORT:
            return self.dns.query(src, dgram.src_port, local, bytes(dgram.payload), now)
        service = self.services.get(dgram.dst_port)
        if service is None:
            sink.counters["port_unreachable"] += 1
            if not self.icmp_errors.take(now):
                sink.drop("icmp_rate_limited")
                return []
            if len(src) == len(self.address):
                reply = dest_unreachable(PORT_UNREACHABLE, data).emit()
                return [(ip_reply(local, src, PROTO_ICMP, reply), None)]
            if not icmpv6.error_allowed(data, icmpv6.DEST_UNREACHABLE, icmpv6.PORT_UNREACHABLE):
                sink.drop("icmpv6_error_not_allowed")  # RFC 4443 §2.4 (e)
                return []
            error = icmpv6.dest_unreachable(icmpv6.PORT_UNREACHABLE, data).to_bytes(local, src)
            return [(ip_reply(local, src, ipv6.ICMPV6, error), None)]
        try:
            response = service(bytes(dgram.payload))
        except Exception as exc:  # a service's bug costs that datagram its answer, not the worker
            sink.counters["service_errors"] += 1
            sink.log.error("service_error", src=fmt_addr(src), sport=dgram.src_port, dport=dgram.dst_port,
                           error=f"{type(exc).__name__}: {exc}")
            sink.log.debug("service_traceback", traceback=traceback.format_exc())
            return []
        if response is None:
            sink.counters["datagrams_unanswered"] += 1
            return []
        sink.counters["datagrams_answered"] += 1
        answer = UdpDatagram(dgram.dst_port, dgram.src_port, bytes(response))
        self._ident = (self._ident + 1) & 0xFFFFFFFF
        # RFC 791 §3.2: a reply larger than the link is fragmented, unless the request asked for DF.
        packet = ip_reply(local, src, PROTO_UDP, answer.payload, dont_fragment=ip.dont_fragment,
                          ident=self._ident & 0xFFFF, transport_header=answer.header(local, src))
        pieces = fit_mtu(packet, self.mtu, self._ident)
        if pieces is None:
            sink.drop("reply_too_big_df")
            return []
        return [(piece, None) for piece in pieces]

    # -- the relay's and the resolver's upstream sockets (workers.attach.relay) ------------

    def set_published(self, table: Collection[tuple[str, int, int]], now: float) -> None:
        """The table of published ports ingress sent: the relay listens on its UDP ones."""
        if self.relay is not None:
            self.relay.set_published(table, now)

    def relay_commands(self) -> list[Command]:
        commands = super().relay_commands()
        return commands if self.dns is None else commands + self.dns.take_commands()

    def handle_upstream(self, reported: list[Upstream], now: float) -> list[Outgoing]:
        dns = self.dns
        if dns is None:
            return super().handle_upstream(reported, now)
        out: list[Outgoing] = []
        for ev in reported:
            out += dns.upstream(ev, now) if dns.owns(ev.key) else super().handle_upstream([ev], now)
        return out

    def handle_timer(self, now: float) -> list[Outgoing]:
        out = super().handle_timer(now)
        return out if self.dns is None else out + self.dns.expire(now)

    def next_deadline(self) -> float | None:
        relay, dns = super().next_deadline(), None if self.dns is None else self.dns.next_deadline()
        return dns if relay is None else relay if dns is None else min(relay, dns)

    def close(self, now: float) -> list[Outgoing]:
        out = super().close(now)
        return out if self.dns is None else out + self.dns.close(now)

    def _icmp_error(self, body: memoryview, src: bytes, dst: bytes, protocol: int) -> None:
        """An ICMP error about a datagram we sent (ingress matched the quote): count it."""
        try:
            msg = icmpv6.parse(body, src, dst) if protocol == ipv6.ICMPV6 else parse_icmp(body)
        except Malformed as exc:
            self.sink.drop(exc.reason, layer="icmp")
            return
        self.sink.counters["icmp_errors_in"] += 1
        if self.sink.debug:
            self.sink.log.debug("udp_icmp_error", src=fmt_addr(src), type=msg.type, code=msg.code)
