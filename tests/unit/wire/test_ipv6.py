"""IPv6 codec and extension-header walk: known bytes, truncations, every rule of RFC 8200 §4, scapy both ways."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    HBHOptUnknown,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    Jumbo,
    Pad1,
    PadN,
    RouterAlert,
)

from pipeline.wire import Malformed
from pipeline.wire import ipv6
from pipeline.wire.ipv6 import Ipv6Header, Ipv6View, parse

SRC = ipaddress.IPv6Address("fd00::1").packed
DST = ipaddress.IPv6Address("fd00::2").packed
MCAST = ipaddress.IPv6Address("ff02::1").packed

# scapy: IPv6(src=fd00::1, dst=fd00::2, tc=0x2b, fl=0x12345, hlim=63)
#        / ICMPv6EchoRequest(id=0x1c2a, seq=1, data=b"ping data")
PING = bytes.fromhex(
    "62b1234500113a3f"
    "fd000000000000000000000000000001"
    "fd000000000000000000000000000002"
    "8000a7da1c2a000170696e672064617461"
)
PING_HEADER = Ipv6Header(SRC, DST, ipv6.ICMPV6, hop_limit=63, traffic_class=0x2B, flow_label=0x12345)


def base(**kw) -> IPv6:
    return IPv6(src="fd00::1", dst="fd00::2", **kw)


def test_deconstruct():
    view = Ipv6View.checked(PING)
    assert (view.traffic_class, view.flow_label, view.payload_len, view.next_header, view.hop_limit) == (
        0x2B, 0x12345, 17, 58, 63)
    assert (view.src, view.dst) == (SRC, DST)
    assert bytes(view.payload) == PING[40:]
    got = parse(PING)
    assert got == ipv6.Ipv6Packet(PING_HEADER, ipv6.ICMPV6, 40, len(PING))
    assert got.header.ecn == 0x03


def test_construct_into_prefilled_buffer():
    buf = bytearray(b"\xa5" * 48)
    PING_HEADER.emit(buf, 17)
    assert bytes(buf[:40]) == PING[:40]
    assert buf[40:] == b"\xa5" * 8  # nothing written past the header
    assert PING_HEADER.to_bytes(17) == PING[:40]
    assert PING_HEADER.buffer_len() == 40


def test_constants():
    assert (ipv6.HOP_BY_HOP, ipv6.TCP, ipv6.UDP, ipv6.ROUTING, ipv6.FRAGMENT, ipv6.ICMPV6,
            ipv6.NO_NEXT_HEADER, ipv6.DEST_OPTIONS) == (0, 6, 17, 43, 44, 58, 59, 60)


def test_truncated_at_every_length():
    for n in range(len(PING)):
        with pytest.raises(Malformed):
            parse(PING[:n])


def test_trailing_bytes_past_payload_length_ignored():
    got = parse(memoryview(PING + b"\xa5" * 7))
    assert got.payload_end == len(PING)
    assert bytes(Ipv6View.checked(PING + b"\x00").payload) == PING[40:]


def test_bad_version():
    with pytest.raises(Malformed) as e:
        parse(b"\x45" + PING[1:])
    assert e.value.reason == "bad_version"


def test_payload_length_past_buffer():
    pkt = bytearray(PING)
    pkt[4:6] = (18).to_bytes(2, "big")
    with pytest.raises(Malformed) as e:
        parse(bytes(pkt))
    assert e.value.reason == "bad_payload_length"


def test_multicast_source_dropped():
    with pytest.raises(Malformed) as e:
        parse(bytes(IPv6(src="ff02::1", dst="fd00::2") / UDP()))
    assert e.value.reason == "multicast_source"


def test_emit_range_checks():
    with pytest.raises(ValueError):
        PING_HEADER.emit(bytearray(40), 0x10000)
    with pytest.raises(ValueError):
        Ipv6Header(SRC, DST, 6, flow_label=1 << 20).to_bytes(0)
    with pytest.raises(ValueError):
        Ipv6Header(SRC, DST, 6, traffic_class=256).to_bytes(0)
    with pytest.raises(ValueError):
        Ipv6Header(bytes(4), DST, 6).to_bytes(0)


def test_every_extension_header_walked():
    pkt = bytes(
        base() / IPv6ExtHdrHopByHop(options=[RouterAlert()]) / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0\0")])
        / IPv6ExtHdrRouting(segleft=0) / IPv6ExtHdrDestOpt(options=[Pad1(), Pad1()]) / UDP(sport=1, dport=7) / b"x"
    )
    got = parse(pkt)
    assert got.error is None and got.fragment is None
    assert got.protocol == ipv6.UDP
    assert got.payload_offset == 40 + 8 + 8 + 8 + 8
    assert bytes(UDP(pkt[got.payload_offset:]).payload) == b"x"


def test_no_next_header():
    got = parse(bytes(base(nh=59) / b"ignored bytes"))
    assert (got.protocol, got.payload_offset, got.error) == (59, 40, None)


def test_fragment_header_ends_the_walk():
    pkt = bytes(base() / IPv6ExtHdrDestOpt() / IPv6ExtHdrFragment(id=0xDEADBEEF, offset=3, m=1, nh=60)
                / (b"\x11\x00" + b"\x01\x04" + b"\0" * 4 + b"y" * 8))
    got = parse(pkt)
    assert got.error is None
    assert got.fragment == ipv6.Fragment(ident=0xDEADBEEF, offset=24, more=True, next_header=60,
                                         header_offset=48, next_header_at=40)
    assert (got.protocol, got.payload_offset) == (60, 56)


def test_atomic_fragment_is_reported_as_a_fragment():
    got = parse(bytes(base() / IPv6ExtHdrFragment(id=9) / UDP(sport=1, dport=2)))
    assert got.fragment == ipv6.Fragment(9, 0, False, ipv6.UDP, 40, 6)
    assert got.protocol == ipv6.UDP and got.payload_offset == 48


def test_unknown_next_header_is_parameter_problem_code_1():
    # RFC 8200 §4, RFC 4443 §3.4: pointer at the Next Header field naming the unknown value.
    got = parse(bytes(base(nh=253) / (b"\0" * 8)))
    assert got.error == ipv6.ParamProblem(1, 6, "unknown_next_header")
    got = parse(bytes(base() / IPv6ExtHdrDestOpt(nh=253) / (b"\0" * 8)))
    assert got.error == ipv6.ParamProblem(1, 40, "unknown_next_header")
    # A protocol the caller does not serve is unknown too.
    assert parse(bytes(base() / TCP()), upper_layers=frozenset({17})).error.code == 1


def test_hop_by_hop_not_first_is_parameter_problem():
    pkt = bytes(base() / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / UDP())
    assert parse(pkt).error == ipv6.ParamProblem(1, 40, "hop_by_hop_not_first")


def test_routing_segments_left_is_parameter_problem_at_routing_type():
    pkt = bytes(base() / IPv6ExtHdrRouting(addresses=["fd00::3"], segleft=1) / UDP())
    got = parse(pkt)
    assert got.error == ipv6.ParamProblem(0, 42, "routing_segments_left")
    assert got.protocol == ipv6.ROUTING


def test_routing_segments_left_zero_is_ignored():
    pkt = bytes(base() / IPv6ExtHdrRouting(addresses=["fd00::3"], segleft=0) / UDP(sport=5, dport=6))
    got = parse(pkt)
    assert got.error is None and got.protocol == ipv6.UDP and got.payload_offset == 40 + 24


def unknown_option(otype: int, dst: str = "fd00::2", header=IPv6ExtHdrDestOpt) -> bytes:
    return bytes(IPv6(src="fd00::1", dst=dst) / header(options=[Pad1(), HBHOptUnknown(otype=otype, optdata=b"ab")])
                 / UDP())


@pytest.mark.parametrize("header", [IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop])
def test_option_actions(header):
    # RFC 8200 §4.2: 00 skip, 01 discard, 10 discard + ICMP, 11 discard + ICMP unless multicast.
    assert parse(unknown_option(0x1E, header=header)).error is None
    for otype in (0x5E, 0x7F):
        with pytest.raises(Malformed) as e:
            parse(unknown_option(otype, header=header))
        assert e.value.reason == "unrecognized_option"
    for otype in (0x9E, 0xDE):
        # Pointer at the option type: 40 + 2 header bytes + 1 Pad1.
        assert parse(unknown_option(otype, header=header)).error == ipv6.ParamProblem(2, 43, "unrecognized_option")
    assert parse(unknown_option(0x9E, dst="ff02::1", header=header)).error.code == 2
    with pytest.raises(Malformed):
        parse(unknown_option(0xDE, dst="ff02::1", header=header))


def test_jumbo_option_is_unrecognized():
    pkt = bytes(base() / IPv6ExtHdrHopByHop(options=[Jumbo(jumboplen=70000)]) / UDP())
    assert parse(pkt).error.code == ipv6.UNRECOGNIZED_OPTION


@pytest.mark.parametrize("options", [b"\x01\x05\0\0\0\0", b"\x00\x00\x00\x00\x00\x01", b"\x1e\x07\0\0\0\0"])
def test_options_running_past_their_header(options):
    pkt = bytes(base(nh=60) / (b"\x11\x00" + options) / UDP())
    with pytest.raises(Malformed) as e:
        parse(pkt)
    assert e.value.reason == "bad_option"


@pytest.mark.parametrize("layer", [IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting])
def test_extension_header_truncated_at_every_length(layer):
    pkt = bytes(base() / layer(nh=59) / b"")
    assert parse(pkt).protocol == 59
    for n in range(41, len(pkt)):
        trimmed = bytearray(pkt[:n])
        trimmed[4:6] = (n - 40).to_bytes(2, "big")
        with pytest.raises(Malformed) as e:
            parse(bytes(trimmed))
        assert e.value.reason == "truncated"


def test_fragment_header_truncated():
    for n in range(41, 48):
        pkt = bytearray(bytes(base(nh=44, plen=n - 40) / (b"\0" * (n - 40))))
        with pytest.raises(Malformed):
            parse(bytes(pkt))


def test_non_last_fragment_not_multiple_of_8():
    # RFC 8200 §4.5: Parameter Problem code 0 pointing at the Payload Length field.
    pkt = bytes(base() / IPv6ExtHdrFragment(m=1, offset=1) / (b"z" * 12))
    assert parse(pkt).error == ipv6.ParamProblem(0, 4, "fragment_not_multiple_of_8")
    assert parse(bytes(base() / IPv6ExtHdrFragment(m=0, offset=1) / (b"z" * 12))).error is None


def test_fragment_past_65535_octets():
    # RFC 8200 §4.5: code 0 pointing at the Fragment Offset field (header at 40, field at 42).
    pkt = bytes(base() / IPv6ExtHdrFragment(m=0, offset=8191) / (b"z" * 16))
    assert parse(pkt).error == ipv6.ParamProblem(0, 42, "fragment_too_far")
    assert parse(bytes(base() / IPv6ExtHdrFragment(m=0, offset=8190) / (b"z" * 15))).error is None
    # The unfragmentable extension headers count too: here 8 bytes of Destination Options.
    behind_options = bytes(base() / IPv6ExtHdrDestOpt() / IPv6ExtHdrFragment(m=0, offset=8190) / (b"z" * 15))
    assert parse(behind_options).error == ipv6.ParamProblem(0, 50, "fragment_too_far")
    behind_options = bytes(base() / IPv6ExtHdrDestOpt() / IPv6ExtHdrFragment(m=0, offset=8189) / (b"z" * 15))
    assert parse(behind_options).error is None


def test_first_fragment_with_incomplete_header_chain():
    # RFC 7112 §5 / RFC 8200 §4.5: code 3, pointer 0.
    short_tcp = bytes(base() / IPv6ExtHdrFragment(m=1, nh=6) / (b"t" * 16))
    assert parse(short_tcp).error == ipv6.ParamProblem(3, 0, "incomplete_header_chain")
    chain_cut = bytes(base() / IPv6ExtHdrFragment(m=1, nh=60) / (b"\x11\x02" + b"\0" * 6))
    assert parse(chain_cut).error.code == 3
    whole = bytes(base() / IPv6ExtHdrFragment(m=1, nh=60) / IPv6ExtHdrDestOpt(nh=17) / (b"u" * 8))
    assert parse(whole).error is None
    # A later fragment need not hold any header.
    assert parse(bytes(base() / IPv6ExtHdrFragment(m=1, nh=6, offset=2) / (b"t" * 8))).error is None


def test_skip_extension_headers():
    pkt = bytes(base() / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(offset=0) / ICMPv6EchoRequest())
    buf = memoryview(pkt)
    assert ipv6.skip_extension_headers(buf, 0, 40, len(pkt)) == (58, 56)
    later = bytes(base() / IPv6ExtHdrFragment(offset=1) / ICMPv6EchoRequest())
    assert ipv6.skip_extension_headers(memoryview(later), 44, 40, len(later)) == (44, 40)
    assert ipv6.skip_extension_headers(buf, 0, 40, 41) is None
    assert ipv6.skip_extension_headers(buf, 0, 40, 50) is None  # fragment header cut


def test_fragment_header_emit():
    buf = bytearray(b"\xa5" * 10)
    ipv6.emit_fragment_header(buf, 17, 1480, True, 0x01020304)
    assert bytes(buf[:8]) == bytes(IPv6ExtHdrFragment(nh=17, offset=185, m=1, id=0x01020304))
    assert buf[8:] == b"\xa5\xa5"
    with pytest.raises(ValueError):
        ipv6.emit_fragment_header(buf, 17, 12, False, 1)


def test_upper_layer_checksums():
    udp = bytes(base() / UDP(sport=9, dport=7) / b"data")[40:]
    assert ipv6.upper_layer_checksum_ok(SRC, DST, 17, udp)
    assert not ipv6.upper_layer_checksum_ok(SRC, DST, 17, udp[:-1] + b"e")
    # RFC 8200 §8.1: a zero UDP checksum is invalid over IPv6, even though it is fine over IPv4.
    assert not ipv6.upper_layer_checksum_ok(SRC, DST, 17, udp[:6] + b"\0\0" + udp[8:])
    tcp = bytes(base() / TCP(sport=9, dport=7, flags="S"))[40:]
    assert ipv6.upper_layer_checksum_ok(SRC, DST, 6, tcp)
    assert ipv6.upper_layer_checksum_ok(SRC, DST, 58, PING[40:])


headers = st.builds(
    Ipv6Header,
    src=st.binary(min_size=16, max_size=16).filter(lambda a: a[0] != 0xFF),
    dst=st.binary(min_size=16, max_size=16),
    next_header=st.sampled_from([6, 17, 58, 59]),
    hop_limit=st.integers(0, 255),
    traffic_class=st.integers(0, 255),
    flow_label=st.integers(0, 0xFFFFF),
)


@given(headers, st.binary(max_size=200))
def test_round_trip(header, payload):
    buf = bytearray(b"\xa5" * (40 + len(payload)))
    header.emit(buf, len(payload))
    buf[40:] = payload
    got = parse(bytes(buf))
    assert got.header == header
    assert (got.protocol, got.payload_offset, got.payload_end) == (header.next_header, 40, 40 + len(payload))


@given(st.binary(max_size=120))
def test_random_bytes_only_raise_malformed(data):
    try:
        parse(data)
    except Malformed:
        pass


@given(st.lists(st.sampled_from([0, 43, 44, 60, 6, 17, 58, 59, 253]), min_size=1, max_size=5),
       st.binary(max_size=60))
def test_random_extension_chains_only_raise_malformed(chain, body):
    data = bytes([0x60, 0, 0, 0, 0, 0, chain[0], 64]) + SRC + DST
    rest = b""
    for nh in chain[1:] + [59]:
        rest += bytes([nh]) + body[:7].ljust(7, b"\0")
        body = body[7:]
    rest += body
    data = data[:4] + len(rest).to_bytes(2, "big") + data[6:] + rest
    try:
        got = parse(data)
    except Malformed:
        return
    assert got.payload_offset <= got.payload_end == len(data)


def addr(a: bytes) -> str:
    return str(ipaddress.IPv6Address(a))


@given(headers, st.binary(max_size=64))
def test_scapy_parses_what_we_emit(header, payload):
    pkt = IPv6(header.to_bytes(len(payload)) + payload)
    assert (pkt.version, pkt.tc, pkt.fl, pkt.plen, pkt.nh, pkt.hlim) == (
        6, header.traffic_class, header.flow_label, len(payload), header.next_header, header.hop_limit)
    assert (pkt.src, pkt.dst) == (addr(header.src), addr(header.dst))


@given(headers, st.binary(max_size=64))
def test_we_parse_what_scapy_builds(header, payload):
    pkt = IPv6(src=addr(header.src), dst=addr(header.dst), nh=header.next_header, hlim=header.hop_limit,
               tc=header.traffic_class, fl=header.flow_label) / payload
    got = parse(bytes(pkt))
    assert got.header == header and got.payload_end == 40 + len(payload)
