"""Our end of a flow per family and the IP packet around a segment (workers.tcp.encapsulation)."""

from pipeline.flow import Flow
from pipeline.offload import GSO_TCPV6, NEEDS_CSUM
from pipeline.wire import ipv6
from pipeline.wire.ipv4 import parse_ipv4
from pipeline.wire.tcp import Flags, TcpSegment, parse_tcp
from workers.tcp.config import TcpConfig
from workers.tcp.encapsulation import Encapsulation

US4, PEER4, ELSEWHERE = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1]), bytes([192, 0, 2, 10])
US6, PEER6 = bytes.fromhex("fd00" + "00" * 13 + "02"), bytes.fromhex("fd00" + "00" * 13 + "01")


def test_ipv6_connections_offer_twenty_bytes_less_mss():
    encap = Encapsulation(US4, US6, TcpConfig(mss=1460), offload=False)
    assert encap.config(PEER4).mss == 1460 and encap.config(PEER6).mss == 1440


def test_a_relayed_flow_is_answered_from_its_destination():
    encap = Encapsulation(US4, US6, TcpConfig(), offload=False)
    key = Flow(PEER4, 40000, 80, ELSEWHERE)
    assert encap.local(key) == ELSEWHERE and encap.local(Flow(PEER6, 40000, 80)) == US6
    packet, offload = encap.packet(key, TcpSegment(80, 40000, 5, 6, Flags.ACK, 100, b"hi"))
    ip, payload = parse_ipv4(packet)
    assert offload is None and (ip.src, ip.dst) == (ELSEWHERE, PEER4)
    assert parse_tcp(payload, ip.src, ip.dst).payload == b"hi"  # checksum ours, and right


def test_with_offload_a_large_segment_asks_the_kernel_to_cut_it():
    encap = Encapsulation(US4, US6, TcpConfig(mss=1460), offload=True)
    seg = TcpSegment(80, 40000, 5, 6, Flags.ACK, 100, b"x" * 5000)
    _, (flags, gso_type, hdr_len, gso_size, csum_start, _) = encap.packet(Flow(PEER6, 40000, 80), seg)
    assert flags == NEEDS_CSUM and gso_type == GSO_TCPV6 and gso_size == 1440
    assert csum_start == ipv6.HEADER_LEN and hdr_len == ipv6.HEADER_LEN + seg.header_len
