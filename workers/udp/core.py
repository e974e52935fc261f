"""The UDP worker's core: datagrams to services, port unreachable for the rest.

In attach mode (a ``UdpRelay``) datagrams to other addresses are relayed
(``workers.udp.relay``), which makes this a relaying core (``workers.relay``).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping

from pipeline.flow import Flow
from pipeline.offload import Offload, checksum_vouched
from pipeline.wire import Malformed
from pipeline.wire.addr import fmt_addr
from pipeline.wire.icmp import PORT_UNREACHABLE, dest_unreachable
from pipeline.wire.ipv4 import PROTO_ICMP, PROTO_UDP, Ipv4Packet
from pipeline.wire.udp import UdpDatagram, parse_udp
from workers.core import Outgoing, Sink, ip_reply
from workers.ratelimit import TokenBucket
from workers.relay import DatagramRelayCore
from workers.udp.relay import UdpRelay
from workers.udp.services import SERVICES

# RFC 1812 §4.3.2.8 / RFC 1122 §3.2.2: ICMP errors are rate limited so a flood of
# datagrams to closed ports cannot be turned into a flood of replies.
ICMP_ERRORS_PER_SECOND = 200


class UdpCore(DatagramRelayCore):
    def __init__(self, sink: Sink, address: bytes,
                 services: Mapping[int, Callable[[bytes], bytes | None]] | None = None,
                 relay_: UdpRelay | None = None) -> None:
        self.sink = sink
        self.address = address
        self.services = SERVICES if services is None else services  # the worker passes the registry's
        self.icmp_errors = TokenBucket(ICMP_ERRORS_PER_SECOND, ICMP_ERRORS_PER_SECOND)
        self.relay = relay_

    def handle_packet(self, data: bytes, now: float, offload: Offload | None = None) -> list[Outgoing]:
        sink = self.sink
        ip = Ipv4Packet.trusted(data)  # ingress checked it
        src = ip.src
        try:
            dgram = parse_udp(ip.payload, src, ip.dst, verify_checksum=not checksum_vouched(offload))
        except Malformed as exc:
            sink.drop(exc.reason, layer="udp")
            return []
        if sink.debug:
            sink.log.debug("udp_in", src=fmt_addr(src), sport=dgram.src_port, dport=dgram.dst_port,
                           len=len(dgram.payload), **sink.payload(dgram.payload))
        if ip.dst != self.address:  # ingress forwards only in attach mode
            if self.relay is None:
                sink.drop("not_for_us")
                return []
            return self.relay.datagram(Flow(src, dgram.src_port, dgram.dst_port, bytes(ip.dst)),
                                       bytes(dgram.payload), bytes(data), now)
        if self.relay is not None and self.relay.answer(src, dgram.src_port, dgram.dst_port,
                                                        bytes(dgram.payload), now):
            return []  # the namespace answering a published port's sender
        service = self.services.get(dgram.dst_port)
        if service is None:
            sink.counters["port_unreachable"] += 1
            if not self.icmp_errors.allow(now):
                sink.drop("icmp_rate_limited")
                return []
            reply = dest_unreachable(PORT_UNREACHABLE, data).emit()
            return [(ip_reply(self.address, src, PROTO_ICMP, reply), None)]
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
        return [(ip_reply(self.address, src, PROTO_UDP, answer.emit(self.address, src)), None)]
