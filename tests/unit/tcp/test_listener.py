"""Segments of no connection (workers.tcp.listener): the SYN queue, cookies, resets and their limit, orphans.

The listener is driven through its own door, ``segment``: what it answers goes
to ``out``, a connection it opens comes back for the demux to register.
"""

import collections

import structlog

from pipeline.flow import Flow
from pipeline.wire.ipv4 import parse_ipv4
from pipeline.wire.seqnum import seq_add
from pipeline.wire.tcp import Flags, TcpOptions, TcpSegment, parse_tcp
from workers.core import Sink
from workers.tcp.config import TcpConfig
from workers.tcp.connection import State
from workers.tcp.encapsulation import Encapsulation
from workers.tcp.listener import RESETS_PER_SECOND, Listener

US = bytes([10, 0, 0, 2])
PEER = bytes([10, 0, 0, 1])
T0 = 100.0


def listener(syn_queue_limit: int = 2) -> Listener:
    sink = Sink(collections.Counter(), structlog.get_logger())
    return Listener(sink, Encapsulation(US, None, TcpConfig(), offload=False), b"s" * 32, syn_queue_limit)


def parse(out) -> list[TcpSegment]:
    segs = []
    for pkt, offload in out:
        assert offload is None
        ip, payload = parse_ipv4(pkt)
        assert (ip.src, ip.dst) == (US, PEER)
        segs.append(parse_tcp(payload, ip.src, ip.dst))
    return segs


def syn(sport: int, seq: int = 1000) -> TcpSegment:
    return TcpSegment(sport, 7, seq, 0, Flags.SYN, 65535, options=TcpOptions(mss=1460))


def test_a_syn_opens_a_connection_in_its_ports_syn_queue_until_the_queue_is_full():
    lis = listener(syn_queue_limit=2)
    out: list = []
    opened = [lis.segment(Flow(PEER, 40000 + i, 7), syn(40000 + i), T0, out) for i in range(3)]
    assert [c.state for c in opened[:2]] == [State.SYN_RECEIVED] * 2 and opened[2] is None
    assert lis.syn_queue[7] == {Flow(PEER, 40000, 7), Flow(PEER, 40001, 7)}
    # The third got a cookie SYN-ACK and nothing is kept for it; the final ACK opens it.
    [cookie] = parse(out)
    assert cookie.flags == Flags.SYN | Flags.ACK and lis.sink.counters["syn_cookies_sent"] == 1
    ack = TcpSegment(40002, 7, 1001, seq_add(cookie.seq, 1), Flags.ACK, 65535)
    conn = lis.segment(Flow(PEER, 40002, 7), ack, T0 + 0.1, out)
    assert conn is not None and conn.state is State.ESTABLISHED
    lis.leave_queue(Flow(PEER, 40000, 7))  # established, say: its place is free again
    assert lis.segment(Flow(PEER, 40003, 7), syn(40003), T0, []) is not None


def test_a_rst_is_ignored_and_stray_segments_are_reset_or_dropped():
    lis = listener()
    out: list = []
    assert lis.segment(Flow(PEER, 40000, 7), TcpSegment(40000, 7, 1, 0, Flags.RST, 0), T0, out) is None
    assert out == [] and lis.sink.counters["drop_rst_no_connection"] == 1
    # §3.10.7.2: an ACK that carries no valid cookie is reset; a segment without SYN or ACK is dropped.
    assert lis.segment(Flow(PEER, 40000, 7), TcpSegment(40000, 7, 1, 777, Flags.ACK, 0), T0, out) is None
    [rst] = parse(out)
    assert rst.flags == Flags.RST and rst.seq == 777
    assert lis.segment(Flow(PEER, 40000, 7), TcpSegment(40000, 7, 1, 0, Flags.PSH, 0, b"x"), T0, out) is None
    assert len(out) == 1 and lis.sink.counters["drop_no_syn_no_connection"] == 1


def test_resets_are_rate_limited_and_counted_by_reason():
    lis = listener()
    out: list = []
    for i in range(RESETS_PER_SECOND + 5):
        lis.reset(Flow(PEER, 1000 + i, 4444), syn(1000 + i), T0, out, "closed_port")
    assert len(out) == RESETS_PER_SECOND  # a scan cannot make us flood
    assert lis.sink.counters["resets_sent_closed_port"] == RESETS_PER_SECOND + 5
    assert lis.sink.counters["drop_reset_rate_limited"] == 5
    lis.reset(Flow(PEER, 999, 4444), syn(999), T0 + 0.01, out, "closed_port")  # the bucket refills
    assert len(out) == RESETS_PER_SECOND + 1


def test_an_orphans_peer_is_provoked_with_an_ack_far_outside_its_window():
    lis = listener()
    out: list = []
    lis.provoke_reset(Flow(PEER, 40000, 7), out)
    [probe] = parse(out)
    assert (probe.src_port, probe.dst_port, probe.seq, probe.ack, probe.flags) == (7, 40000, 0, 0, Flags.ACK)
    assert lis.sink.counters["orphans_reset"] == 1
