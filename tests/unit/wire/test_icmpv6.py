"""ICMPv6 codec: known bytes, truncations, checksum over the pseudo header, errors, RFC 4443 §2.4 rules, scapy."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6MLDone,
    ICMPv6MLReport,
    ICMPv6MLReport2,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_Redirect,
    ICMPv6ND_RS,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrHopByHop,
    RouterAlert,
)

from pipeline.wire import Malformed
from pipeline.wire import icmpv6, ipv6
from pipeline.wire.icmpv6 import Icmpv6Message, parse

SRC = ipaddress.IPv6Address("fd00::1").packed
DST = ipaddress.IPv6Address("fd00::2").packed

# The ICMPv6 part of scapy's IPv6(fd00::1 -> fd00::2) / ICMPv6EchoRequest(id=0x1c2a, seq=1, data=b"ping data").
ECHO = bytes.fromhex("8000a7da1c2a000170696e672064617461")


def test_deconstruct():
    msg = parse(ECHO, SRC, DST)
    assert msg == Icmpv6Message(icmpv6.ECHO_REQUEST, 0, 0x1C2A0001, b"ping data")
    assert (msg.identifier, msg.sequence, msg.is_error) == (0x1C2A, 1, False)


def test_construct_into_prefilled_buffer():
    msg = Icmpv6Message(icmpv6.ECHO_REQUEST, 0, 0x1C2A0001, b"ping data")
    buf = bytearray(b"\xa5" * (len(ECHO) + 3))
    msg.emit(buf, SRC, DST)
    assert bytes(buf[: len(ECHO)]) == ECHO
    assert buf[len(ECHO):] == b"\xa5" * 3
    assert msg.to_bytes(SRC, DST) == ECHO
    assert msg.buffer_len() == len(ECHO)


def test_truncated_at_every_length():
    for n in range(icmpv6.HEADER_LEN):
        with pytest.raises(Malformed) as e:
            parse(ECHO[:n], SRC, DST)
        assert e.value.reason == "truncated"
    for n in range(icmpv6.HEADER_LEN, len(ECHO)):
        with pytest.raises(Malformed) as e:
            parse(ECHO[:n], SRC, DST)
        assert e.value.reason == "bad_checksum"


def test_checksum_covers_the_pseudo_header():
    with pytest.raises(Malformed) as e:
        parse(ECHO, SRC, ipaddress.IPv6Address("fd00::3").packed)
    assert e.value.reason == "bad_checksum"
    flipped = bytearray(ECHO)
    flipped[-1] ^= 0x40
    with pytest.raises(Malformed):
        parse(bytes(flipped), SRC, DST)
    assert parse(bytes(flipped), SRC, DST, verify_checksum=False).payload == b"ping dat!"


def test_echo_reply_keeps_identifier_sequence_and_data():
    reply = icmpv6.echo_reply(parse(ECHO, SRC, DST))
    wire = reply.to_bytes(DST, SRC)
    theirs = IPv6(src="fd00::2", dst="fd00::1") / ICMPv6EchoReply(id=0x1C2A, seq=1, data=b"ping data")
    assert bytes(theirs)[40:] == wire


BIG = bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=4000, dport=9) / (b"q" * 3000))


@pytest.mark.parametrize(
    "message, layer",
    [
        (icmpv6.dest_unreachable(icmpv6.PORT_UNREACHABLE, BIG), ICMPv6DestUnreach),
        (icmpv6.dest_unreachable(icmpv6.ADMIN_PROHIBITED, BIG[:60]), ICMPv6DestUnreach),
        (icmpv6.packet_too_big(1280, BIG), ICMPv6PacketTooBig),
        (icmpv6.time_exceeded(icmpv6.FRAGMENT_REASSEMBLY_TIME_EXCEEDED, BIG), ICMPv6TimeExceeded),
        (icmpv6.param_problem(ipv6.ParamProblem(1, 6, "unknown_next_header"), BIG), ICMPv6ParamProblem),
    ],
)
def test_scapy_parses_our_errors(message, layer):
    packet = ipv6.Ipv6Header(DST, SRC, ipv6.ICMPV6).to_bytes(message.buffer_len()) + message.to_bytes(DST, SRC)
    # RFC 4443 §2.4 (c): never bigger than the minimum MTU, and as big as the quote allows.
    assert len(packet) == min(ipv6.MIN_MTU, 48 + len(message.payload))
    assert len(message.payload) <= icmpv6.MAX_QUOTE
    got = IPv6(packet)
    icmp = got.payload
    assert isinstance(icmp, layer)
    assert icmp.code == message.code
    if layer is ICMPv6PacketTooBig:
        assert icmp.mtu == 1280
    if layer is ICMPv6ParamProblem:
        assert icmp.ptr == 6
    # The quote is the start of the offending packet; scapy dissects it as IPv6 too.
    assert bytes(icmp.payload)[:48] == BIG[:48]
    expected = icmp.cksum
    del icmp.cksum
    assert IPv6(bytes(got)).payload.cksum == expected


@pytest.mark.parametrize(
    "layer, fields",
    [
        (ICMPv6DestUnreach, {"code": 4}),
        (ICMPv6PacketTooBig, {"mtu": 1400}),
        (ICMPv6TimeExceeded, {"code": 1}),
        (ICMPv6ParamProblem, {"code": 2, "ptr": 43}),
    ],
)
def test_we_parse_scapy_errors(layer, fields):
    pkt = bytes(IPv6(src="fd00::1", dst="fd00::2") / layer(**fields) / BIG[:200])
    msg = parse(pkt[40:], SRC, DST)
    assert msg.is_error and msg.type == layer().type
    assert msg.payload == BIG[:200]
    if "mtu" in fields:
        assert msg.mtu == 1400
    if "ptr" in fields:
        assert (msg.code, msg.pointer) == (2, 43)


def v6(src: str = "fd00::1", dst: str = "fd00::2") -> IPv6:
    return IPv6(src=src, dst=dst)


def test_error_allowed_for_ordinary_packets():
    assert icmpv6.error_allowed(bytes(v6() / UDP(dport=9)), icmpv6.DEST_UNREACHABLE, icmpv6.PORT_UNREACHABLE)
    assert icmpv6.error_allowed(bytes(v6() / ICMPv6EchoRequest()), icmpv6.PARAM_PROBLEM, 1)


def test_no_error_about_an_error_or_a_redirect():
    # RFC 4443 §2.4 (e.1), (e.2), also behind extension headers.
    for layer in (ICMPv6DestUnreach(), ICMPv6PacketTooBig(), ICMPv6TimeExceeded(), ICMPv6ParamProblem(),
                  ICMPv6ND_Redirect()):
        assert not icmpv6.error_allowed(bytes(v6() / layer), icmpv6.PARAM_PROBLEM, 0)
        assert not icmpv6.error_allowed(bytes(v6() / IPv6ExtHdrHopByHop() / layer), icmpv6.PARAM_PROBLEM, 2)


def test_multicast_destination_only_packet_too_big_and_option_code_2():
    # RFC 4443 §2.4 (e.3).
    pkt = bytes(v6(dst="ff02::1") / UDP(dport=9))
    assert not icmpv6.error_allowed(pkt, icmpv6.DEST_UNREACHABLE, icmpv6.PORT_UNREACHABLE)
    assert not icmpv6.error_allowed(pkt, icmpv6.PARAM_PROBLEM, icmpv6.UNRECOGNIZED_NEXT_HEADER)
    assert icmpv6.error_allowed(pkt, icmpv6.PACKET_TOO_BIG, 0)
    assert icmpv6.error_allowed(pkt, icmpv6.PARAM_PROBLEM, icmpv6.UNRECOGNIZED_OPTION)


def test_no_error_to_unspecified_or_multicast_source():
    # RFC 4443 §2.4 (e.6).
    assert not icmpv6.error_allowed(bytes(v6(src="::") / UDP()), icmpv6.DEST_UNREACHABLE, 4)
    assert not icmpv6.error_allowed(bytes(v6(src="ff05::2") / UDP()), icmpv6.PACKET_TOO_BIG, 0)
    assert not icmpv6.error_allowed(b"\x60" + bytes(30), icmpv6.DEST_UNREACHABLE, 4)


def kernel(pkt: IPv6) -> tuple[Icmpv6Message, bytes]:
    raw = bytes(pkt)
    parsed = ipv6.parse(raw)
    assert parsed.error is None and parsed.protocol == ipv6.ICMPV6
    src = parsed.header.src
    return parse(raw[parsed.payload_offset:parsed.payload_end], src, parsed.header.dst), src


def test_kernel_chatter_is_recognised():
    rs, src = kernel(IPv6(src="fe80::1", dst="ff02::2", hlim=255) / ICMPv6ND_RS())
    assert icmpv6.chatter(rs, src) == "router_solicitation"
    hbh = IPv6ExtHdrHopByHop(options=[RouterAlert()])
    mld2, src = kernel(IPv6(src="fe80::1", dst="ff02::16", hlim=1) / hbh / ICMPv6MLReport2())
    assert icmpv6.chatter(mld2, src) == "mld_report"
    mld1, src = kernel(IPv6(src="fe80::1", dst="ff02::1:ff00:1", hlim=1) / hbh / ICMPv6MLReport())
    assert icmpv6.chatter(mld1, src) == "mld_report"
    done, src = kernel(IPv6(src="fe80::1", dst="ff02::2", hlim=1) / hbh / ICMPv6MLDone())
    assert icmpv6.chatter(done, src) == "mld_report"
    dad, src = kernel(IPv6(src="::", dst="ff02::1:ff00:2", hlim=255) / ICMPv6ND_NS(tgt="fd00::2"))
    assert icmpv6.chatter(dad, src) == "duplicate_address_detection"


def test_other_messages_are_not_chatter():
    ns, src = kernel(IPv6(src="fd00::1", dst="ff02::1:ff00:2", hlim=255) / ICMPv6ND_NS(tgt="fd00::2"))
    assert icmpv6.chatter(ns, src) is None
    for layer in (ICMPv6EchoRequest(), ICMPv6ND_NA(), ICMPv6DestUnreach()):
        msg, src = kernel(v6() / layer)
        assert icmpv6.chatter(msg, src) is None


messages = st.builds(
    Icmpv6Message,
    type=st.integers(0, 255),
    code=st.integers(0, 255),
    rest=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=100),
)
addresses = st.binary(min_size=16, max_size=16)


@given(messages, addresses, addresses)
def test_round_trip(message, src, dst):
    assert parse(message.to_bytes(src, dst), src, dst) == message


@given(st.binary(max_size=40), addresses, addresses)
def test_random_bytes_only_raise_malformed(data, src, dst):
    try:
        parse(data, src, dst)
    except Malformed:
        pass


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=64))
def test_scapy_echo_both_ways(ident, seq, data):
    ours = Icmpv6Message(icmpv6.ECHO_REQUEST, 0, ident << 16 | seq, data).to_bytes(SRC, DST)
    theirs = bytes(IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(id=ident, seq=seq, data=data))[40:]
    assert ours == theirs
    assert parse(theirs, SRC, DST) == Icmpv6Message(128, 0, ident << 16 | seq, data)
