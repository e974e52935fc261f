"""ICMP codec: a real ping both ways, truncation, checksum, replies, errors, scapy cross-checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP

from pipeline.wire import Malformed
from pipeline.wire.icmp import (
    DEST_UNREACHABLE,
    ECHO_REPLY,
    ECHO_REQUEST,
    MAX_QUOTE,
    PORT_UNREACHABLE,
    PROTOCOL_UNREACHABLE,
    TIME_EXCEEDED,
    IcmpMessage,
    dest_unreachable,
    echo_reply,
    parse_icmp,
)

# Echo request as Linux ping sends it: id 0x1c2a, seq 1, 16 bytes of
# timestamp then 0x10..0x37.
PING_DATA = bytes.fromhex("60b625690000000040e2010000000000") + bytes(range(0x10, 0x38))
ECHO = bytes.fromhex("080055001c2a0001") + PING_DATA
ECHO_MSG = IcmpMessage(type=ECHO_REQUEST, code=0, rest=0x1C2A0001, payload=PING_DATA)
# The same packet with its IP header, as a destination unreachable would quote it.
PING_IP = bytes.fromhex("45000054beef400040017065c0a84501c0a84502") + ECHO


def test_constants():
    assert (ECHO_REPLY, DEST_UNREACHABLE, ECHO_REQUEST, TIME_EXCEEDED) == (0, 3, 8, 11)
    assert (PROTOCOL_UNREACHABLE, PORT_UNREACHABLE) == (2, 3)


def test_deconstruct():
    msg = parse_icmp(ECHO)
    assert msg == ECHO_MSG
    assert (msg.identifier, msg.sequence) == (0x1C2A, 1)


def test_construct():
    assert ECHO_MSG.emit() == ECHO


def test_parse_from_view_of_larger_buffer():
    buf = bytearray(b"\xa5" * 20 + ECHO + b"\xa5" * 20)
    assert parse_icmp(memoryview(buf)[20 : 20 + len(ECHO)]) == ECHO_MSG


def test_truncated_at_every_length():
    for n in range(8):
        with pytest.raises(Malformed) as e:
            parse_icmp(ECHO[:n])
        assert e.value.reason == "truncated"
    # Longer cuts keep a valid header but break the checksum.
    for n in range(8, len(ECHO)):
        with pytest.raises(Malformed):
            parse_icmp(ECHO[:n])


def test_bad_checksum():
    for i in (2, 5, len(ECHO) - 1):
        bad = bytearray(ECHO)
        bad[i] ^= 0x40
        with pytest.raises(Malformed) as e:
            parse_icmp(bytes(bad))
        assert e.value.reason == "bad_checksum"


def test_odd_length_payload():
    msg = IcmpMessage(ECHO_REQUEST, 0, 0x00010002, b"abc")
    wire = msg.emit()
    assert parse_icmp(wire) == msg
    assert ICMP(wire).chksum == int.from_bytes(wire[2:4], "big")
    assert bytes(ICMP(type=8, id=1, seq=2) / b"abc") == wire


def test_echo_reply():
    reply = echo_reply(ECHO_MSG)
    assert reply == IcmpMessage(ECHO_REPLY, 0, 0x1C2A0001, PING_DATA)
    # Only the type and the checksum change (RFC 792).
    wire = reply.emit()
    assert wire[0] == 0 and wire[1:2] == ECHO[1:2] and wire[4:] == ECHO[4:]
    assert wire[2:4] == (0x5D00).to_bytes(2, "big")


def test_dest_unreachable_quotes_header_and_data():
    err = dest_unreachable(PORT_UNREACHABLE, PING_IP)
    assert (err.type, err.code, err.rest) == (DEST_UNREACHABLE, PORT_UNREACHABLE, 0)
    assert err.payload == PING_IP  # short enough to quote whole
    assert parse_icmp(err.emit()) == err
    quoted = IP(err.emit()[8:])
    assert quoted.src == "192.168.69.1" and quoted[ICMP].id == 0x1C2A


def test_dest_unreachable_is_capped():
    big = PING_IP[:20] + bytes(2000)
    err = dest_unreachable(PROTOCOL_UNREACHABLE, big)
    assert len(err.payload) == MAX_QUOTE
    assert err.payload == big[:MAX_QUOTE]
    # With the 20-byte IP header it fits in the 576 octets every host accepts.
    assert 20 + len(err.emit()) == 576


messages = st.builds(
    IcmpMessage,
    type=st.integers(0, 255),
    code=st.integers(0, 255),
    rest=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=200),
)


@given(messages)
def test_round_trip(msg):
    assert parse_icmp(msg.emit()) == msg


@given(st.binary(max_size=64))
def test_random_bytes_only_raise_malformed(data):
    try:
        parse_icmp(data)
    except Malformed:
        pass


# Types whose 4 bytes after the checksum scapy treats as one header word (not
# timestamp or address-mask messages, which scapy lays out with extra fields).
scapy_messages = st.builds(
    IcmpMessage,
    type=st.sampled_from([ECHO_REPLY, DEST_UNREACHABLE, 4, 5, ECHO_REQUEST, TIME_EXCEEDED, 12]),
    code=st.integers(0, 255),
    rest=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=200),
)


@given(scapy_messages)
def test_scapy_parses_what_we_emit(msg):
    pkt = ICMP(msg.emit())
    assert (pkt.type, pkt.code) == (msg.type, msg.code)
    rebuilt = ICMP(bytes(pkt))
    del rebuilt.chksum  # scapy recomputes it: it must agree with ours
    assert bytes(rebuilt) == msg.emit()


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=100), st.sampled_from([0, 8]))
def test_we_parse_what_scapy_builds(ident, seq, data, type_):
    msg = parse_icmp(bytes(ICMP(type=type_, id=ident, seq=seq) / data))
    assert (msg.type, msg.code, msg.identifier, msg.sequence, msg.payload) == (type_, 0, ident, seq, data)


def test_we_parse_scapy_port_unreachable():
    inner = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / b"12345678")
    msg = parse_icmp(bytes(ICMP(type=3, code=3) / inner))
    assert (msg.type, msg.code, msg.rest, msg.payload) == (3, 3, 0, inner)
