"""Checked views (smoltcp style): known bytes read in place, every truncation refused,
``trusted`` reads what ``checked`` read, and ``emit_into`` writes into a buffer
pre-filled with 0xA5 exactly what ``emit`` returns (no code may assume zeroes)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.flow import Flow
from pipeline.wire import Malformed
from pipeline.wire.icmp import IcmpPacket, parse_icmp
from pipeline.wire.ipv4 import Ipv4Header, Ipv4Packet, parse_ipv4
from pipeline.wire.tcp import Flags, TcpOptions, TcpPacket, TcpSegment, parse_tcp
from pipeline.wire.udp import UdpDatagram, UdpPacket, parse_udp
from tests.unit.wire.test_icmp import ECHO, ECHO_MSG
from tests.unit.wire.test_ipv4 import PING, PING_HEADER
from tests.unit.wire.test_tcp import KNOWN
from tests.unit.wire.test_udp import DNS, DNS_MSG
from tests.unit.wire.test_udp import DST as UDP_DST
from tests.unit.wire.test_udp import SRC as UDP_SRC

FILL = 0xA5


def prefilled(n: int) -> bytearray:
    return bytearray([FILL]) * n


# --- IPv4 ------------------------------------------------------------------------------


def test_ipv4_view_reads_the_known_packet_in_place():
    view = Ipv4Packet.checked(PING)
    assert (view.src, view.dst, view.protocol, view.ttl, view.ident, view.dont_fragment, view.tos) == (
        PING_HEADER.src, PING_HEADER.dst, PING_HEADER.protocol, 64, 0xBEEF, True, 0)
    assert view.header() == PING_HEADER and view.header_len == 20 and view.total_len == len(PING)
    assert isinstance(view.payload, memoryview) and view.payload.obj is view.buf.obj  # no copy
    assert bytes(view.payload) == PING[20:]


def test_ipv4_trusted_reads_what_checked_read():
    padded = PING + bytes([FILL]) * 7  # link padding past Total Length
    checked, trusted = Ipv4Packet.checked(padded), Ipv4Packet.trusted(padded)
    assert trusted.header() == checked.header() and bytes(trusted.payload) == bytes(checked.payload) == PING[20:]


def test_ipv4_view_truncated_at_every_length():
    for n in range(len(PING)):
        with pytest.raises(Malformed):
            Ipv4Packet.checked(PING[:n])


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4), st.integers(0, 255),
       st.integers(0, 255), st.integers(0, 0xFFFF), st.booleans(), st.integers(0, 255), st.integers(0, 1000))
def test_ipv4_emit_into_a_dirty_buffer(src, dst, protocol, ttl, ident, df, tos, payload_len):
    header = Ipv4Header(src, dst, protocol, ttl, ident, df, tos)
    buf = prefilled(30)
    header.emit_into(buf, 5, payload_len)
    assert buf[5:25] == header.emit(payload_len)
    assert buf[:5] == prefilled(5) and buf[25:] == prefilled(5)
    parsed = Ipv4Packet.checked(bytes(buf[5:25]) + bytes(payload_len)).header()
    assert parsed == header


# --- TCP -------------------------------------------------------------------------------


@pytest.mark.parametrize("wire, seg, src, dst", KNOWN)
def test_tcp_view_reads_the_known_segments(wire, seg, src, dst):
    view = TcpPacket.checked(wire)
    assert view.ports == (seg.src_port, seg.dst_port)
    assert src + view.port_bytes == Flow(src, seg.src_port, seg.dst_port).key  # how ingress keys a flow
    assert (view.src_port, view.dst_port, view.seq, view.ack, view.flags, view.window) == (
        seg.src_port, seg.dst_port, seg.seq, seg.ack, seg.flags, seg.window)
    assert view.header_len == seg.header_len and bytes(view.payload) == seg.payload
    assert view.starts_connection == (seg.flags & (Flags.SYN | Flags.ACK) == Flags.SYN)
    assert view.verify_checksum(src, dst) and not view.verify_checksum(dst, bytes(4))
    assert view.segment() == seg == TcpPacket.trusted(wire).segment()


@pytest.mark.parametrize("wire, seg, src, dst", KNOWN)
def test_tcp_view_truncated_inside_the_header(wire, seg, src, dst):
    for n in range(seg.header_len):
        with pytest.raises(Malformed):
            TcpPacket.checked(wire[:n])


@pytest.mark.parametrize("wire, seg, src, dst", KNOWN)
def test_tcp_emit_into_a_dirty_buffer(wire, seg, src, dst):
    for checksum in (True, False):
        buf = prefilled(len(wire) + 6)
        assert seg.emit_into(buf, 3, src, dst, checksum) == len(wire)
        assert buf[3:-3] == seg.emit(src, dst, checksum) and buf[:3] == buf[-3:] == prefilled(3)
    assert parse_tcp(bytes(buf[3:-3]), src, dst, verify_checksum=False) == seg


def test_tcp_starts_connection_only_for_syn_without_ack():
    for flags, opens in ((Flags.SYN, True), (Flags.SYN | Flags.ACK, False), (Flags.ACK, False),
                         (Flags.SYN | Flags.FIN, True), (Flags.RST, False)):
        wire = TcpSegment(1, 2, 3, 4, flags, 5, options=TcpOptions(mss=1460)).emit(bytes(4), bytes(4))
        assert TcpPacket.checked(wire).starts_connection is opens


# --- UDP -------------------------------------------------------------------------------


def test_udp_view_reads_the_known_datagram():
    view = UdpPacket.checked(DNS + b"\xa5\xa5")  # bytes past Length are not the datagram's
    assert (view.src_port, view.dst_port, bytes(view.payload)) == (52011, 53, DNS_MSG.payload)
    assert view.verify_checksum(UDP_SRC, UDP_DST) and view.datagram() == DNS_MSG
    assert parse_udp(DNS, UDP_SRC, UDP_DST) == DNS_MSG


def test_udp_view_truncated_at_every_length():
    for n in range(len(DNS)):
        with pytest.raises(Malformed):
            UdpPacket.checked(DNS[:n])


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=300))
def test_udp_emit_into_a_dirty_buffer(sport, dport, payload):
    d = UdpDatagram(sport, dport, payload)
    buf = prefilled(len(payload) + 12)
    assert d.emit_into(buf, 2, UDP_SRC, UDP_DST) == len(payload) + 8
    assert buf[2:-2] == d.emit(UDP_SRC, UDP_DST) and buf[:2] == buf[-2:] == prefilled(2)


# --- ICMP ------------------------------------------------------------------------------


def test_icmp_view_reads_the_known_message():
    view = IcmpPacket.checked(ECHO)
    assert (view.type, view.code, view.rest, bytes(view.payload)) == (
        ECHO_MSG.type, ECHO_MSG.code, ECHO_MSG.rest, ECHO_MSG.payload)
    assert view.verify_checksum() and view.message() == ECHO_MSG == parse_icmp(ECHO)


def test_icmp_view_truncated_inside_the_header():
    for n in range(8):
        with pytest.raises(Malformed):
            IcmpPacket.checked(ECHO[:n])


def test_icmp_emit_into_a_dirty_buffer():
    buf = prefilled(len(ECHO) + 8)
    assert ECHO_MSG.emit_into(buf, 4) == len(ECHO)
    assert buf[4:-4] == ECHO == ECHO_MSG.emit() and buf[:4] == buf[-4:] == prefilled(4)


def test_parse_forms_still_return_values():
    header, payload = parse_ipv4(PING)
    assert header == PING_HEADER and bytes(payload) == PING[20:]
