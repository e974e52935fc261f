"""The ICMP worker's core: echo replies, and protocol-unreachable for protocols we lack.

Ingress already checked the IPv4 header; this core parses the ICMP message
(checksum included) and answers. In attach mode (an ``EchoRelay``) echo
requests to other addresses are relayed to the real host
(``workers.icmp.relay``); other ICMP to other addresses is dropped.
"""

from __future__ import annotations

from pipeline.offload import Offload
from pipeline.wire import Malformed
from pipeline.wire.addr import fmt_addr
from pipeline.wire.icmp import ECHO_REQUEST, PROTOCOL_UNREACHABLE, dest_unreachable, echo_reply, parse_icmp
from pipeline.wire.ipv4 import PROTO_ICMP, Ipv4Packet
from workers.core import Outgoing, Sink, ip_reply
from workers.icmp.relay import EchoRelay
from workers.relay import DatagramRelayCore


class IcmpCore(DatagramRelayCore):
    def __init__(self, sink: Sink, address: bytes, relay_: EchoRelay | None = None) -> None:
        self.sink = sink
        self.address = address
        self.relay = relay_

    def handle_packet(self, data: bytes, now: float, offload: Offload | None = None) -> list[Outgoing]:
        sink = self.sink
        ip = Ipv4Packet.trusted(data)  # ingress checked it
        relayed = ip.dst != self.address  # ingress forwards other destinations only in attach mode
        if relayed and (self.relay is None or ip.protocol != PROTO_ICMP):
            sink.drop("not_for_us" if self.relay is None else "relay_protocol")
            return []
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
        if relayed:
            return self.relay.request(bytes(ip.src), bytes(ip.dst), msg, bytes(data), now)  # type: ignore[union-attr]
        sink.counters["echo_replies"] += 1
        return [(ip_reply(self.address, ip.src, PROTO_ICMP, echo_reply(msg).emit(), ip.tos), None)]
