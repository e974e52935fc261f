"""The ICMP worker's core: echo replies, and protocol-unreachable for protocols we lack.

Ingress already checked the IPv4 header and that the packet is ours; this
core parses the ICMP message (checksum included) and answers.
"""

from __future__ import annotations

from pipeline.offload import Offload
from pipeline.wire import Malformed
from pipeline.wire.addr import fmt_addr
from pipeline.wire.icmp import ECHO_REQUEST, PROTOCOL_UNREACHABLE, dest_unreachable, echo_reply, parse_icmp
from pipeline.wire.ipv4 import PROTO_ICMP, Ipv4Packet
from workers.core import Outgoing, Sink, StatelessCore, ip_reply


class IcmpCore(StatelessCore):
    def __init__(self, sink: Sink, address: bytes) -> None:
        self.sink = sink
        self.address = address

    def handle_packet(self, data: bytes, now: float, offload: Offload | None = None) -> list[Outgoing]:
        sink = self.sink
        ip = Ipv4Packet.trusted(data)  # ingress checked it
        if ip.protocol != PROTO_ICMP:
            # RFC 1122 §3.2.2.1: a host SHOULD answer an unknown transport protocol with
            # protocol unreachable.
            sink.counters["protocol_unreachable"] += 1
            reply = dest_unreachable(PROTOCOL_UNREACHABLE, data)
            return [(ip_reply(self.address, ip.src, PROTO_ICMP, reply.emit(), ip.tos), None)]
        try:
            msg = parse_icmp(ip.payload)
        except Malformed as exc:
            sink.drop(exc.reason, layer="icmp", src=fmt_addr(ip.src))
            return []
        if sink.debug:
            sink.log.debug("icmp_in", src=fmt_addr(ip.src), type=msg.type, code=msg.code, len=len(msg.payload),
                           **sink.payload(msg.payload))
        if msg.type != ECHO_REQUEST:
            sink.counters["icmp_ignored"] += 1  # replies, errors: nothing to answer (RFC 1122 §3.2.2)
            return []
        sink.counters["echo_replies"] += 1
        return [(ip_reply(self.address, ip.src, PROTO_ICMP, echo_reply(msg).emit(), ip.tos), None)]
