"""ICMP and ICMPv6 errors about our TCP segments: path MTU, hard and soft errors.

Contract: sans-IO helper of the demux, which hands it every ICMP packet
ingress routed to this worker (ingress sends an error to the owner of the
flow its quote names). ``handle(ip, connections, now)`` checks the message
(checksum included), finds the connection it quotes, and

* ignores it unless the quoted sequence number lies in SND.UNA..SND.NXT
  (RFC 5927 §4.1), so a forged error cannot shrink or kill a connection;
* on "fragmentation needed" (RFC 1191 §4) or Packet Too Big (RFC 8201 §4)
  lowers the flow's path MTU, never below 552 octets for IPv4 (as Linux's
  min_pmtu, not RFC 1191's 68: a tiny MTU only helps an attacker) nor
  1280 for IPv6 (RFC 8200 §5); ``path_mss`` then caps every segment the
  demux emits for the flow, resends included;
* aborts a connection still being set up on a hard error (protocol or port
  unreachable, RFC 1122 §4.2.3.9, RFC 9293 §3.8.9; ICMPv6 port unreachable
  and administratively prohibited, RFC 5461 §4), and otherwise remembers the
  error as the flow's soft error (RFC 1122 §4.2.3.9: not fatal; the demux
  logs it if the connection ends).

It returns (flow, connection, state before) when it aborted a connection,
for the demux to collect what that caused.
"""

from __future__ import annotations

from pipeline.flow import Flow
from pipeline.wire import Malformed, icmp, icmpv6, ipv6
from pipeline.wire.addr import fmt_addr
from pipeline.wire.ipv4 import PROTO_TCP
from pipeline.wire.seqnum import SeqNum
from pipeline.wire.tcp import HEADER_LEN as TCP_HEADER_LEN
from workers.core import Sink, reply_header_len
from workers.tcp.connection import Connection, State

MIN_PMTU_IPV4 = 552  # Linux's net.ipv4.route.min_pmtu
MIN_PMTU_IPV6 = ipv6.MIN_MTU
_OPENING = (State.SYN_SENT, State.SYN_RECEIVED)


class IcmpErrors:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.mss: dict[Flow, int] = {}  # path MSS learnt from PMTU discovery
        self.soft: dict[Flow, str] = {}  # the last soft error per flow

    def path_mss(self, flow: Flow, mss: int) -> int:
        """The MSS to send with on flow: mss, or less if the path said so."""
        learnt = self.mss.get(flow)
        return mss if learnt is None or learnt >= mss else learnt

    def forget(self, flow: Flow) -> None:
        self.mss.pop(flow, None)
        self.soft.pop(flow, None)

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
        seq = SeqNum(quote.tcp_seq)
        if not (conn.snd_una <= seq < conn.snd_nxt):
            sink.drop("icmp_error_out_of_window")
            return None
        sink.counters["icmp_errors_in"] += 1
        if v6 and msg.type == icmpv6.PACKET_TOO_BIG:
            self._lower_mtu(flow, max(msg.mtu, MIN_PMTU_IPV6))
            return None
        if not v6 and msg.type == icmp.DEST_UNREACHABLE and msg.code == icmp.FRAGMENTATION_NEEDED:
            # RFC 1191 §5: an old router says no MTU (zero); take the floor.
            self._lower_mtu(flow, max(msg.next_hop_mtu, MIN_PMTU_IPV4))
            return None
        hard = (msg.type == icmpv6.DEST_UNREACHABLE and msg.code in icmpv6.HARD_UNREACHABLE) if v6 else (
            msg.type == icmp.DEST_UNREACHABLE and msg.code in icmp.HARD_UNREACHABLE)
        error = f"icmp{'v6' if v6 else ''}_{msg.type}_{msg.code}"
        if hard and conn.state in _OPENING:
            sink.counters["aborted_by_icmp"] += 1
            self.sink.log.info("tcp_icmp_abort", remote=fmt_addr(flow.remote), rport=flow.rport, lport=flow.lport,
                               error=error)
            before = conn.state
            conn.abort()
            return flow, conn, before
        self.soft[flow] = error
        sink.counters["icmp_soft_errors"] += 1
        return None

    def _lower_mtu(self, flow: Flow, mtu: int) -> None:
        mss = mtu - reply_header_len(flow.remote) - TCP_HEADER_LEN
        if mss >= self.mss.get(flow, mss + 1):
            return  # not lower than what we use already (RFC 1191 §6.3: never raise it from an error)
        self.mss[flow] = mss
        self.sink.counters["pmtu_lowered"] += 1
        self.sink.log.info("tcp_pmtu", remote=fmt_addr(flow.remote), rport=flow.rport, lport=flow.lport, mtu=mtu,
                           mss=mss)
