"""The ICMP worker's core, both families: echo replies, and the errors ingress leaves to it.

Ingress already checked the IP header and that the packet is ours; this core
parses the ICMP or ICMPv6 message (checksum included) and answers. Ingress
also sends it the packets owed an error, since building replies stays out of
ingress:

* IPv4 with a protocol we lack: protocol unreachable (RFC 1122 §3.2.2.1);
* IPv6 whose extension headers ``ipv6.parse`` answers with a Parameter
  Problem (RFC 8200 §4, RFC 4443 §3.4);
* a first fragment whose datagram was never completed (ingress forwards the
  bare fragment only then): Time Exceeded, fragment reassembly (RFC 1122
  §3.3.2, RFC 8200 §4.5).

Every error is rate limited (RFC 1812 §4.3.2.8, RFC 4443 §2.4 (f)); ICMPv6
ones also pass ``icmpv6.error_allowed`` (RFC 4443 §2.4 (e)). Replies larger
than the link MTU are fragmented (IPv4 only when the request allowed it).

In attach mode (an ``EchoRelay``) IPv4 echo requests to other addresses are
relayed to the real host (``workers.attach.icmp``); other ICMP to other
addresses is dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.offload import Offload, checksum_vouched
from pipeline.wire import Malformed, icmpv6, ipv6
from pipeline.wire.addr import fmt_addr
from pipeline.wire.icmp import (ECHO_REQUEST, PROTOCOL_UNREACHABLE, REASSEMBLY_TIME_EXCEEDED, IcmpMessage,
                                dest_unreachable, echo_reply, parse_icmp, time_exceeded)
from pipeline.wire.ipv4 import PROTO_ICMP, Ipv4Packet
from workers.core import Addresses, Outgoing, Sink, fit_mtu, ip_reply
from pipeline.ratelimit import TokenBucket
from workers.attach.relay import DatagramRelayCore

if TYPE_CHECKING:  # the relay is loaded only by a worker that relays (attach mode)
    from workers.attach.icmp import EchoRelay

ICMP_ERRORS_PER_SECOND = 200  # as the UDP worker's port unreachables
DEFAULT_MTU = 1500


class IcmpCore(DatagramRelayCore):
    def __init__(self, sink: Sink, address: bytes, address6: bytes | None = None, mtu: int = DEFAULT_MTU,
                 ident_seed: int = 0, relay_: EchoRelay | None = None) -> None:
        self.relay = relay_
        self.sink = sink
        self.address = address
        self.addresses = Addresses(address, address6)
        self.mtu = mtu
        self._ident = ident_seed  # Identification of fragmented replies (the shell seeds it at random)
        self.errors = TokenBucket(ICMP_ERRORS_PER_SECOND, ICMP_ERRORS_PER_SECOND)

    def handle_packet(self, data: bytes, now: float, offload: Offload | None = None) -> list[Outgoing]:
        if data[0] >> 4 == 6:
            return self._ipv6(data, now, offload)
        sink = self.sink
        ip = Ipv4Packet.trusted(data)  # ingress checked it
        relayed = ip.dst != self.address  # ingress forwards other destinations only in attach mode
        if relayed and (self.relay is None or ip.protocol != PROTO_ICMP or ip.is_fragment):
            sink.drop("not_for_us" if self.relay is None else "relay_protocol")
            return []
        if ip.is_fragment:
            return self._error(now, "reassembly_time_exceeded", ip.src,
                               lambda: ip_reply(self.address, ip.src, PROTO_ICMP,
                                                time_exceeded(REASSEMBLY_TIME_EXCEEDED, data).emit()))
        if ip.protocol != PROTO_ICMP:
            # RFC 1122 §3.2.2.1: a host SHOULD answer an unknown transport protocol with
            # protocol unreachable.
            return self._error(now, "protocol_unreachable", ip.src,
                               lambda: ip_reply(self.address, ip.src, PROTO_ICMP,
                                                dest_unreachable(PROTOCOL_UNREACHABLE, data).emit(), ip.tos))
        try:
            msg = parse_icmp(ip.payload)
        except Malformed as exc:
            sink.drop(exc.reason, layer="icmp", src=fmt_addr(ip.src))
            return []
        if not self._is_echo_request(msg, ip.src):
            return []
        if relayed:
            return self.relay.request(bytes(ip.src), bytes(ip.dst), msg, bytes(data), now)  # type: ignore[union-attr]
        # RFC 791 §3.2: the reply may be cut into fragments unless the request asked for DF.
        reply = echo_reply(msg)
        return self._send(ip_reply(self.address, ip.src, PROTO_ICMP, reply.payload, ip.tos,
                                   dont_fragment=ip.dont_fragment, ident=self._next_ident() & 0xFFFF,
                                   transport_header=reply.header()))

    def _ipv6(self, data: bytes, now: float, offload: Offload | None) -> list[Outgoing]:
        sink = self.sink
        try:
            parsed = ipv6.parse(data)  # ingress accepted it; the parse names what is owed
        except Malformed as exc:
            sink.drop(exc.reason, layer="ipv6")
            return []
        src = parsed.header.src
        local = self.addresses.local(src)
        relayed = parsed.header.dst != local and parsed.error is None and parsed.fragment is None
        if relayed and (self.relay is None or parsed.protocol != ipv6.ICMPV6):
            sink.drop("not_for_us" if self.relay is None else "relay_protocol")
            return []
        if parsed.error is not None:
            error = icmpv6.param_problem(parsed.error, data)
            sink.counters["param_problem_" + parsed.error.reason] += 1
            return self._error6(now, "param_problem", local, src, error, data)
        if parsed.fragment is not None:
            error = icmpv6.time_exceeded(icmpv6.FRAGMENT_REASSEMBLY_TIME_EXCEEDED, data)
            return self._error6(now, "reassembly_time_exceeded", local, src, error, data)
        body = memoryview(data)[parsed.payload_offset:parsed.payload_end]
        try:
            msg = icmpv6.parse(body, src, parsed.header.dst, verify_checksum=not checksum_vouched(offload))
        except Malformed as exc:
            sink.drop(exc.reason, layer="icmpv6", src=fmt_addr(src))
            return []
        if not self._is_echo_request(msg, src, icmpv6.ECHO_REQUEST):
            return []
        if relayed:
            return self.relay.request(bytes(src), bytes(parsed.header.dst), msg, bytes(data), now)  # type: ignore[union-attr]
        reply = icmpv6.echo_reply(msg).to_bytes(local, src)
        return self._send(ip_reply(local, src, ipv6.ICMPV6, reply, parsed.header.traffic_class))

    def _is_echo_request(self, msg: IcmpMessage | icmpv6.Icmpv6Message, src: bytes,
                         echo_request: int = ECHO_REQUEST) -> bool:
        sink = self.sink
        if sink.debug:
            sink.log.debug("icmp_in", src=fmt_addr(src), type=msg.type, code=msg.code, len=len(msg.payload),
                           **sink.payload(msg.payload))
        if msg.type != echo_request:
            sink.counters["icmp_ignored"] += 1  # replies, errors: nothing to answer (RFC 1122 §3.2.2, RFC 4443)
            return False
        sink.counters["echo_replies"] += 1
        return True

    def _send(self, packet: bytes) -> list[Outgoing]:
        """The reply, fragmented when larger than the link MTU (counted; dropped if DF forbids it)."""
        pieces = fit_mtu(packet, self.mtu, self._next_ident())
        if pieces is None:
            self.sink.drop("reply_too_big_df")
            return []
        if len(pieces) > 1:
            self.sink.counters["replies_fragmented"] += 1
        return [(piece, None) for piece in pieces]

    def _next_ident(self) -> int:
        self._ident = (self._ident + 1) & 0xFFFFFFFF
        return self._ident

    def _error(self, now: float, name: str, remote: bytes, build) -> list[Outgoing]:
        """Count an owed error and send what build() makes, within the rate limit."""
        self.sink.counters[name] += 1
        if not self.errors.take(now):
            self.sink.drop("icmp_rate_limited")
            return []
        return [(build(), None)]

    def _error6(self, now: float, name: str, local: bytes, remote: bytes, error: icmpv6.Icmpv6Message,
                offending: bytes) -> list[Outgoing]:
        if not icmpv6.error_allowed(offending, error.type, error.code):
            self.sink.drop("icmpv6_error_not_allowed", why=name)  # RFC 4443 §2.4 (e)
            return []
        return self._error(now, name, remote,
                           lambda: ip_reply(local, remote, ipv6.ICMPV6, error.to_bytes(local, remote)))
