"""The UDP worker's core: datagrams to services, port unreachable for the rest."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping

from pipeline.offload import Offload, checksum_vouched
from pipeline.process import Process
from pipeline.wire import Malformed
from pipeline.wire.addr import fmt_addr
from pipeline.wire.icmp import PORT_UNREACHABLE, dest_unreachable
from pipeline.wire.ipv4 import PROTO_ICMP, PROTO_UDP, Ipv4Header, build_ipv4, parse_ipv4
from pipeline.wire.udp import UdpDatagram, parse_udp
from workers.ratelimit import TokenBucket
from workers.shell import Outgoing, StatelessCore
from workers.udp.services import SERVICES

# RFC 1812 §4.3.2.8 / RFC 1122 §3.2.2: ICMP errors are rate limited so a flood of
# datagrams to closed ports cannot be turned into a flood of replies.
ICMP_ERRORS_PER_SECOND = 200


class UdpCore(StatelessCore):
    def __init__(self, proc: Process, services: Mapping[int, Callable[[bytes], bytes | None]] | None = None) -> None:
        self.proc = proc
        self.services = SERVICES if services is None else services
        self.address = proc.config.stack_addr_bytes
        self.icmp_errors = TokenBucket(ICMP_ERRORS_PER_SECOND, ICMP_ERRORS_PER_SECOND)

    def handle_packet(self, data: bytes, now: float, offload: Offload | None = None) -> list[Outgoing]:
        proc = self.proc
        try:
            ip, payload = parse_ipv4(data, verify_checksum=False)  # ingress verified it
            dgram = parse_udp(payload, ip.src, ip.dst, verify_checksum=not checksum_vouched(offload))
        except Malformed as exc:
            proc.drop(exc.reason, layer="udp")
            return []
        if proc.debug:
            proc.log.debug("udp_in", src=fmt_addr(ip.src), sport=dgram.src_port, dport=dgram.dst_port,
                           len=len(dgram.payload), **proc.payload(dgram.payload))
        service = self.services.get(dgram.dst_port)
        if service is None:
            proc.counters["port_unreachable"] += 1
            if not self.icmp_errors.allow(now):
                proc.drop("icmp_rate_limited")
                return []
            reply = dest_unreachable(PORT_UNREACHABLE, data).emit()
            return [(build_ipv4(Ipv4Header(src=self.address, dst=ip.src, protocol=PROTO_ICMP), reply), None)]
        try:
            reply = service(bytes(dgram.payload))
        except Exception as exc:  # a service's bug costs that datagram its answer, not the worker
            proc.counters["service_errors"] += 1
            proc.log.error("service_error", src=fmt_addr(ip.src), sport=dgram.src_port, dport=dgram.dst_port,
                           error=f"{type(exc).__name__}: {exc}")
            proc.log.debug("service_traceback", traceback=traceback.format_exc())
            return []
        if reply is None:
            proc.counters["datagrams_unanswered"] += 1
            return []
        proc.counters["datagrams_answered"] += 1
        answer = UdpDatagram(dgram.dst_port, dgram.src_port, bytes(reply))
        return [(build_ipv4(Ipv4Header(src=self.address, dst=ip.src, protocol=PROTO_UDP),
                            answer.emit(self.address, ip.src)), None)]
