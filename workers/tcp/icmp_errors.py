"""ICMP and ICMPv6 errors about our TCP segments: which connection, and what they mean for it.

Contract: sans-IO helper of the demux, which hands it every ICMP packet
ingress routed to this worker (ingress sends an error to the owner of the
flow its quote names). ``handle(ip, connections, now)`` checks the message
(checksum included), finds the connection it quotes, and

* ignores it unless the quoted sequence number lies in SND.UNA..SND.NXT
  (RFC 5927 §4.1), so a forged error cannot shrink or kill a connection;
* turns "fragmentation needed" (RFC 1191 §4) and Packet Too Big (RFC 8201
  §4) into ``Connection.path_mtu``, never below 552 octets for IPv4 (as
  Linux's min_pmtu, not RFC 1191's 68: a tiny MTU only helps an attacker)
  nor 1280 for IPv6 (RFC 8200 §5);
* hands anything else to ``Connection.icmp_error`` saying whether it is a
  hard error: protocol or port unreachable (RFC 1122 §4.2.3.9), for ICMPv6
  port unreachable and administratively prohibited (RFC 5461 §4).

It returns (flow, connection, state before) for an error that reached a
connection, for the demux to collect what it caused.
"""

from __future__ import annotations

from pipeline.flow import Flow
from pipeline.wire import Malformed, icmp, icmpv6, ipv6
from pipeline.wire.addr import fmt_addr
from pipeline.wire.ipv4 import PROTO_TCP
from pipeline.wire.seqnum import seq_le, seq_lt
from pipeline.wire.tcp import HEADER_LEN as TCP_HEADER_LEN
from workers.core import Sink, reply_header_len
from workers.tcp.connection import Connection, State

MIN_PMTU_IPV4 = 552  # Linux's net.ipv4.route.min_pmtu
MIN_PMTU_IPV6 = ipv6.MIN_MTU


class IcmpErrors:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def handle(self, ip, connections: dict[Flow, Connection], now: float) -> tuple[Flow, Connection, State] | None:
        sink = self.sink
        v6 = ip.protocol == ipv6.ICMPV6
        try:
            msg = icmpv6.parse(ip.payload, ip.src, ip.dst) if v6 else icmp.parse_icmp(ip.payload)
        except Malformed as exc:
            sink.drop(exc.reason, layer="icmp")
            return None
        quote = (icmpv6.quoted_ipv6 if v6 else icmp.quoted_ipv4)(msg.payload)
        if quote is None or quote.protocol != PROTO_TCP:
            sink.drop("icmp_error_unmatched")
            return None
        flow = Flow.from_key(quote.flow_key)
        conn = connections.get(flow)
        if conn is None:
            sink.drop("icmp_error_no_connection")
            return None
        # RFC 5927 §4.1: the quoted segment must be one we sent and is not yet acknowledged.
        snd = conn.sender
        if not (seq_le(snd.snd_una, quote.tcp_seq) and seq_lt(quote.tcp_seq, snd.snd_nxt)):
            sink.drop("icmp_error_out_of_window")
            return None
        sink.counters["icmp_errors_in"] += 1
        before = conn.state
        if isinstance(msg, icmpv6.Icmpv6Message) and msg.type == icmpv6.PACKET_TOO_BIG:  # v6 parsed it
            self._path_mtu(flow, conn, max(msg.mtu, MIN_PMTU_IPV6), now)
        elif (isinstance(msg, icmp.IcmpMessage) and msg.type == icmp.DEST_UNREACHABLE
              and msg.code == icmp.FRAGMENTATION_NEEDED):
            # RFC 1191 §5: an old router says no MTU (zero); take the floor.
            self._path_mtu(flow, conn, max(msg.next_hop_mtu, MIN_PMTU_IPV4), now)
        else:
            hard = (msg.type == icmpv6.DEST_UNREACHABLE and msg.code in icmpv6.HARD_UNREACHABLE) if v6 else (
                msg.type == icmp.DEST_UNREACHABLE and msg.code in icmp.HARD_UNREACHABLE)
            error = f"icmp{'v6' if v6 else ''}_{msg.type}_{msg.code}"
            sink.counters["icmp_hard_errors" if hard else "icmp_soft_errors"] += 1
            conn.icmp_error(error, hard)
        return flow, conn, before

    def _path_mtu(self, flow: Flow, conn: Connection, mtu: int, now: float) -> None:
        mss = mtu - reply_header_len(flow.remote) - TCP_HEADER_LEN
        if mss >= conn.sender.max_segment():
            return  # no news (a late duplicate, or the path is no narrower than our MSS)
        conn.path_mtu(mss, now)
        self.sink.counters["pmtu_lowered"] += 1
        self.sink.log.info("tcp_pmtu", remote=fmt_addr(flow.remote), rport=flow.rport, lport=flow.lport, mtu=mtu,
                           mss=mss)
