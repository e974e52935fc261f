"""UDP codec: a DNS query both ways, truncation, length, checksum rules, scapy cross-checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP

from pipeline.wire import Malformed
from pipeline.wire.udp import UdpDatagram, parse_udp

SRC = bytes([192, 168, 69, 1])
DST = bytes([192, 168, 69, 2])
# A DNS query for example.com A, port 52011 -> 53 (odd length: 37 bytes).
QUERY = bytes.fromhex("3b0e01000001000000000000076578616d706c6503636f6d0000010001")
DNS = bytes.fromhex("cb2b003500251e73") + QUERY
DNS_MSG = UdpDatagram(src_port=52011, dst_port=53, payload=QUERY)


def ip(addr: bytes) -> str:
    return ".".join(map(str, addr))


def test_deconstruct():
    assert parse_udp(DNS, SRC, DST) == DNS_MSG


def test_construct():
    assert DNS_MSG.emit(SRC, DST) == DNS


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=2000))
def test_the_header_alone_is_the_datagram_without_its_payload(sport, dport, payload):
    msg = UdpDatagram(src_port=sport, dst_port=dport, payload=payload)
    assert msg.header(SRC, DST) + payload == msg.emit(SRC, DST)


def test_checksum_covers_pseudo_header():
    with pytest.raises(Malformed) as e:
        parse_udp(DNS, SRC, bytes([192, 168, 69, 3]))
    assert e.value.reason == "bad_checksum"


def test_truncated_at_every_length():
    for n in range(len(DNS)):
        with pytest.raises(Malformed) as e:
            parse_udp(DNS[:n], SRC, DST)
        assert e.value.reason == ("truncated" if n < 8 else "bad_length")


def test_trailing_bytes_past_length_ignored():
    buf = bytearray(b"\xa5" * 8 + DNS + b"\xa5" * 8)
    assert parse_udp(memoryview(buf)[8:], SRC, DST) == DNS_MSG


@pytest.mark.parametrize("length", [0, 7])
def test_length_below_header(length):
    bad = bytearray(DNS)
    bad[4:6] = length.to_bytes(2, "big")
    with pytest.raises(Malformed) as e:
        parse_udp(bytes(bad), SRC, DST)
    assert e.value.reason == "bad_length"


def test_bad_checksum():
    bad = bytearray(DNS)
    bad[-1] ^= 0x01
    with pytest.raises(Malformed) as e:
        parse_udp(bytes(bad), SRC, DST)
    assert e.value.reason == "bad_checksum"


def test_zero_checksum_means_none():
    # RFC 768: all zeros means the sender computed no checksum.
    bad = bytearray(DNS)
    bad[6:8] = b"\x00\x00"
    bad[-1] ^= 0x01
    assert parse_udp(bytes(bad), SRC, DST).payload == QUERY[:-1] + bytes([QUERY[-1] ^ 1])


def test_computed_zero_sent_as_all_ones():
    # Pick a payload word that makes the sum 0xFFFF: the checksum must go out as 0xFFFF.
    base = UdpDatagram(1, 2, b"\x00\x00").emit(SRC, DST)
    csum = int.from_bytes(base[6:8], "big")
    msg = UdpDatagram(1, 2, csum.to_bytes(2, "big"))
    wire = msg.emit(SRC, DST)
    assert wire[6:8] == b"\xff\xff"
    assert parse_udp(wire, SRC, DST) == msg


def test_emit_rejects_oversize():
    with pytest.raises(ValueError):
        UdpDatagram(1, 2, bytes(0xFFFF - 7)).emit(SRC, DST)
    assert len(UdpDatagram(1, 2, bytes(0xFFFF - 8)).emit(SRC, DST)) == 0xFFFF


addrs = st.binary(min_size=4, max_size=4)
datagrams = st.builds(
    UdpDatagram, src_port=st.integers(0, 0xFFFF), dst_port=st.integers(0, 0xFFFF), payload=st.binary(max_size=300)
)


@given(datagrams, addrs, addrs)
def test_round_trip(msg, src, dst):
    assert parse_udp(msg.emit(src, dst), src, dst) == msg


@given(st.binary(max_size=64), addrs, addrs)
def test_random_bytes_only_raise_malformed(data, src, dst):
    try:
        parse_udp(data, src, dst)
    except Malformed:
        pass


@given(datagrams, addrs, addrs)
def test_scapy_parses_what_we_emit(msg, src, dst):
    wire = msg.emit(src, dst)
    pkt = IP(src=ip(src), dst=ip(dst), proto=17) / UDP(wire)
    udp = pkt[UDP]
    assert (udp.sport, udp.dport, udp.len) == (msg.src_port, msg.dst_port, 8 + len(msg.payload))
    # scapy's own checksum over the same pseudo header must match ours.
    fresh = IP(bytes(IP(src=ip(src), dst=ip(dst)) / UDP(sport=msg.src_port, dport=msg.dst_port) / msg.payload))
    assert fresh[UDP].chksum == udp.chksum


@given(datagrams, addrs, addrs)
def test_we_parse_what_scapy_builds(msg, src, dst):
    pkt = IP(bytes(IP(src=ip(src), dst=ip(dst)) / UDP(sport=msg.src_port, dport=msg.dst_port) / msg.payload))
    assert parse_udp(bytes(pkt[UDP]), src, dst) == msg
