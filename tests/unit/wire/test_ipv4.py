"""IPv4 codec: known bytes both ways, every truncation, each check, scapy cross-checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP

from pipeline.wire import Malformed
from pipeline.wire.checksum import internet_checksum
from pipeline.wire.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, Ipv4Header, build_ipv4, parse_ipv4

# A ping from 192.168.69.1 to .2: DF, TTL 64, id 0xbeef, 64 bytes of ICMP.
PING = bytes.fromhex(
    "45000054beef400040017065c0a84501c0a84502"
    "080055001c2a000160b625690000000040e2010000000000"
    "101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637"
)
SRC = bytes([192, 168, 69, 1])
DST = bytes([192, 168, 69, 2])
PING_HEADER = Ipv4Header(src=SRC, dst=DST, protocol=PROTO_ICMP, ttl=64, ident=0xBEEF, dont_fragment=True)


def with_checksum(header: bytearray) -> bytes:
    """Refill the header checksum after a test edited a field."""
    header[10:12] = b"\x00\x00"
    ihl = (header[0] & 0x0F) * 4
    header[10:12] = internet_checksum(bytes(header[:ihl])).to_bytes(2, "big")
    return bytes(header)


def test_deconstruct():
    header, payload = parse_ipv4(PING)
    assert header == PING_HEADER
    assert header.header_len == 20
    assert isinstance(payload, memoryview)
    assert bytes(payload) == PING[20:]


def test_construct():
    assert PING_HEADER.emit(len(PING) - 20) == PING[:20]
    assert build_ipv4(PING_HEADER, PING[20:]) == PING


def test_constants():
    assert (PROTO_ICMP, PROTO_TCP, PROTO_UDP) == (1, 6, 17)


def test_truncated_at_every_length():
    for n in range(len(PING)):
        with pytest.raises(Malformed):
            parse_ipv4(PING[:n])


def test_payload_is_a_view_cut_to_total_length():
    # Link padding after Total Length: ignored, and the view does not see it.
    buf = bytearray(PING + b"\xa5" * 32)
    header, payload = parse_ipv4(memoryview(buf))
    assert header == PING_HEADER
    assert bytes(payload) == PING[20:]
    buf[20] = 0x00  # no copy: the view follows the buffer
    assert payload[0] == 0x00


def test_bad_version():
    pkt = bytearray(PING)
    pkt[0] = 0x65
    with pytest.raises(Malformed) as e:
        parse_ipv4(with_checksum(pkt))
    assert e.value.reason == "bad_version"


@pytest.mark.parametrize("ihl", [0, 1, 4])
def test_ihl_too_small(ihl):
    pkt = bytearray(PING)
    pkt[0] = 0x40 | ihl
    with pytest.raises(Malformed) as e:
        parse_ipv4(bytes(pkt))
    assert e.value.reason == "bad_ihl"


def test_ihl_past_buffer():
    pkt = bytearray(PING[:40])
    pkt[0] = 0x4F  # 60 bytes of header in a 40-byte buffer
    with pytest.raises(Malformed) as e:
        parse_ipv4(bytes(pkt))
    assert e.value.reason == "bad_ihl"


@pytest.mark.parametrize("total", [0, 19, len(PING) + 1, 0xFFFF])
def test_bad_total_length(total):
    pkt = bytearray(PING)
    pkt[2:4] = total.to_bytes(2, "big")
    with pytest.raises(Malformed) as e:
        parse_ipv4(with_checksum(pkt))
    assert e.value.reason == "bad_total_length"


def test_bad_checksum():
    pkt = bytearray(PING)
    pkt[11] ^= 0x01
    with pytest.raises(Malformed) as e:
        parse_ipv4(bytes(pkt))
    assert e.value.reason == "bad_checksum"
    header, _ = parse_ipv4(bytes(pkt), verify_checksum=False)
    assert header == PING_HEADER


@pytest.mark.parametrize("frag", [0x2000, 0x0001, 0x4001, 0x1FFF, 0x3FFF])
def test_fragments_dropped(frag):
    pkt = bytearray(PING)
    pkt[6:8] = frag.to_bytes(2, "big")
    with pytest.raises(Malformed) as e:
        parse_ipv4(with_checksum(pkt))
    assert e.value.reason == "fragment"


def test_df_clear_and_reserved_bit():
    pkt = bytearray(PING)
    pkt[6:8] = b"\x00\x00"
    header, _ = parse_ipv4(with_checksum(pkt))
    assert header.dont_fragment is False
    assert Ipv4Header(SRC, DST, PROTO_ICMP, ident=0xBEEF, dont_fragment=False).emit(len(PING) - 20)[6:8] == b"\x00\x00"


def test_options_skipped():
    # IHL 6 with a 4-byte NOP option row: the payload starts after it.
    pkt = bytearray(PING[:20] + b"\x01\x01\x01\x00" + PING[20:])
    pkt[0] = 0x46
    pkt[2:4] = (len(pkt)).to_bytes(2, "big")
    header, payload = parse_ipv4(with_checksum(pkt))
    assert header.header_len == 24
    assert bytes(payload) == PING[20:]


def test_emit_rejects_oversize():
    with pytest.raises(ValueError):
        PING_HEADER.emit(0xFFFF - 19)
    assert len(PING_HEADER.emit(0xFFFF - 20)) == 20


headers = st.builds(
    Ipv4Header,
    src=st.binary(min_size=4, max_size=4),
    dst=st.binary(min_size=4, max_size=4),
    protocol=st.integers(0, 255),
    ttl=st.integers(0, 255),
    ident=st.integers(0, 0xFFFF),
    dont_fragment=st.booleans(),
    tos=st.integers(0, 255),
)


@given(headers, st.binary(max_size=200))
def test_round_trip(header, payload):
    parsed, got = parse_ipv4(build_ipv4(header, payload))
    assert parsed == header
    assert bytes(got) == payload


@given(st.binary(max_size=80))
def test_random_bytes_only_raise_malformed(data):
    for verify_checksum in (True, False):
        try:
            parse_ipv4(data, verify_checksum=verify_checksum)
        except Malformed:
            pass


@given(st.binary(min_size=20, max_size=20), st.binary(max_size=40))
def test_random_headers_with_version_4_only_raise_malformed(head, rest):
    data = bytes([0x40 | (head[0] & 0x0F)]) + head[1:] + rest
    try:
        parse_ipv4(data, verify_checksum=False)
    except Malformed:
        pass


@given(headers, st.binary(max_size=64))
def test_scapy_parses_what_we_emit(header, payload):
    pkt = IP(build_ipv4(header, payload))
    assert pkt.version == 4 and pkt.ihl == 5
    assert pkt.src == ".".join(map(str, header.src))
    assert pkt.dst == ".".join(map(str, header.dst))
    assert (pkt.proto, pkt.ttl, pkt.id, pkt.tos) == (header.protocol, header.ttl, header.ident, header.tos)
    assert bool(pkt.flags.DF) == header.dont_fragment
    assert pkt.frag == 0 and pkt.len == 20 + len(payload)
    # scapy recomputes the checksum on rebuild; it must equal ours.
    rebuilt = IP(bytes(pkt))
    del rebuilt.chksum
    assert bytes(rebuilt) == build_ipv4(header, payload)


@given(headers, st.binary(max_size=64))
def test_we_parse_what_scapy_builds(header, payload):
    pkt = IP(
        src=".".join(map(str, header.src)), dst=".".join(map(str, header.dst)), proto=header.protocol,
        ttl=header.ttl, id=header.ident, tos=header.tos, flags="DF" if header.dont_fragment else 0,
    ) / payload
    parsed, got = parse_ipv4(bytes(pkt))
    assert parsed == header
    assert bytes(got) == payload
