"""The ICMP worker's core: echo replies, and protocol-unreachable for protocols we lack.

Ingress already checked the IPv4 header and that the packet is ours; this
core parses the ICMP message (checksum included) and answers.
"""

from __future__ import annotations

from pipeline.offload import Offload
from pipeline.process import Process
from pipeline.wire import Malformed
from pipeline.wire.addr import fmt_addr
from pipeline.wire.icmp import ECHO_REQUEST, PROTOCOL_UNREACHABLE, dest_unreachable, echo_reply, parse_icmp
from pipeline.wire.ipv4 import PROTO_ICMP, Ipv4Header, build_ipv4, parse_ipv4
from workers.shell import Outgoing, StatelessCore


class IcmpCore(StatelessCore):
    def __init__(self, proc: Process) -> None:
        self.proc = proc
        self.address = proc.config.stack_addr_bytes

    def handle_packet(self, data: bytes, now: float, offload: Offload | None = None) -> list[Outgoing]:
        proc = self.proc
        try:
            ip, payload = parse_ipv4(data, verify_checksum=False)  # ingress verified it
        except Malformed as exc:
            proc.drop(exc.reason, layer="ipv4")
            return []
        if ip.protocol != PROTO_ICMP:
            # RFC 1122 §3.2.2.1: a host SHOULD answer an unknown transport protocol with
            # protocol unreachable.
            proc.counters["protocol_unreachable"] += 1
            reply = dest_unreachable(PROTOCOL_UNREACHABLE, data)
            return [(self._ip_reply(ip, reply.emit()), None)]
        try:
            msg = parse_icmp(payload)
        except Malformed as exc:
            proc.drop(exc.reason, layer="icmp", src=fmt_addr(ip.src))
            return []
        if proc.debug:
            proc.log.debug("icmp_in", src=fmt_addr(ip.src), type=msg.type, code=msg.code, len=len(msg.payload),
                           **proc.payload(msg.payload))
        if msg.type != ECHO_REQUEST:
            proc.counters["icmp_ignored"] += 1  # replies, errors: nothing to answer (RFC 1122 §3.2.2)
            return []
        proc.counters["echo_replies"] += 1
        return [(self._ip_reply(ip, echo_reply(msg).emit()), None)]

    def _ip_reply(self, request: Ipv4Header, payload: bytes) -> bytes:
        return build_ipv4(Ipv4Header(src=self.address, dst=request.src, protocol=PROTO_ICMP, tos=request.tos), payload)
