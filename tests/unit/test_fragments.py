"""Reassembly and fragmentation, both families: scapy both ways, any order, overlaps, bounds, timers."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP, defragment, fragment
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    defragment6,
    fragment6,
)

from pipeline.fragments import Limits, Reassembler, fragment_ipv4, fragment_ipv6
from pipeline.wire import ipv6
from pipeline.wire.checksum import internet_checksum, verify

DATA = bytes(range(256)) * 16  # 4096 bytes, every offset distinguishable


def v4_packet(size: int = 4000, **kw) -> bytes:
    return bytes(IP(src="10.0.0.1", dst="10.0.0.2", id=0x4242, **kw) / ICMP(id=7, seq=1) / DATA[:size])


def v6_packet(size: int = 4000, *ext) -> bytes:
    pkt = IPv6(src="fd00::1", dst="fd00::2")
    for layer in ext:
        pkt = pkt / layer
    return bytes(pkt / ICMPv6EchoRequest(id=7, seq=1, data=DATA[:size]))


def feed(reassembler: Reassembler, fragments: list[bytes], now: float = 0.0) -> list[bytes]:
    """Every datagram the fragments complete, in order."""
    out = []
    for frag in fragments:
        if frag[0] >> 4 == 4:
            got = reassembler.add_ipv4(frag, now)
        else:
            parsed = ipv6.parse(frag)
            assert parsed.error is None and parsed.fragment is not None
            got = reassembler.add_ipv6(frag, parsed, now)
        if got is not None:
            out.append(got)
    return out


def v4_fragment(offset: int, data: bytes, more: bool, ident: int = 1, src: str = "10.0.0.1") -> bytes:
    """A hand-made IPv4 fragment (UDP protocol) with data at byte offset."""
    return bytes(IP(src=src, dst="10.0.0.2", id=ident, proto=17, flags="MF" if more else 0, frag=offset // 8)
                 / data)


def v6_fragment(offset: int, data: bytes, more: bool, ident: int = 1, src: str = "fd00::1") -> bytes:
    return bytes(IPv6(src=src, dst="fd00::2") / IPv6ExtHdrFragment(nh=59, offset=offset // 8, m=more, id=ident)
                 / data)


# scapy fragments, our reassembly


@pytest.mark.parametrize("order", ["in_order", "reversed", "duplicated", "interleaved"])
def test_scapy_ipv4_fragments_reassembled(order):
    original = v4_packet()
    frags = [bytes(f) for f in fragment(IP(original), fragsize=1480)]
    assert len(frags) == 3
    frags = {"in_order": frags, "reversed": frags[::-1], "duplicated": [frags[1], frags[1], frags[0], frags[0],
             frags[2]], "interleaved": [frags[2], frags[0], frags[2], frags[1]]}[order]
    r = Reassembler()
    assert feed(r, frags) == [original]
    assert r.datagrams == 0 and r.bytes_held == 0
    assert not r.drops


@pytest.mark.parametrize("order", ["in_order", "reversed", "duplicated"])
def test_scapy_ipv6_fragments_reassembled(order):
    original = v6_packet()
    with_header = IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrFragment() / ICMPv6EchoRequest(
        id=7, seq=1, data=DATA[:4000])
    frags = [bytes(f) for f in fragment6(with_header, 1280)]
    assert len(frags) == 4
    frags = {"in_order": frags, "reversed": frags[::-1], "duplicated": frags[:2] + frags}[order]
    r = Reassembler()
    assert feed(r, frags) == [original]
    assert r.datagrams == 0 and r.bytes_held == 0


def test_tiny_8_byte_fragments_both_families():
    original4 = v4_packet(56)
    frags4 = [bytes(f) for f in fragment(IP(original4), fragsize=8)]
    assert len(frags4) == 8 and all(len(f) == 28 for f in frags4)
    original6 = v6_packet(56)
    frags6 = fragment_ipv6(original6, 40 + 8 + 8, ident=5)
    assert len(frags6) == 8 and all(len(f) == 56 for f in frags6)
    r = Reassembler()
    assert feed(r, frags4[::-1] + frags6[::-1]) == [original4, original6]


def test_ipv6_extension_headers_stay_in_front():
    original = v6_packet(3000, IPv6ExtHdrHopByHop(), IPv6ExtHdrRouting(addresses=["fd00::9"], segleft=0),
                         IPv6ExtHdrDestOpt())
    frags = fragment_ipv6(original, 1280, ident=0xABCDEF01)
    unfragmentable = 40 + 8 + 24  # Hop-by-Hop and Routing; the Destination Options after them travel in the data
    for f in frags:
        parsed = ipv6.parse(f)
        assert parsed.error is None
        assert parsed.fragment.header_offset == unfragmentable
        assert parsed.fragment.ident == 0xABCDEF01
        assert len(f) <= 1280
    assert ipv6.parse(frags[0]).fragment.next_header == ipv6.DEST_OPTIONS
    assert feed(Reassembler(), frags[::-1]) == [original]
    # scapy agrees on every fragment and on the reassembly.
    rebuilt = defragment6([IPv6(f) for f in frags])
    assert bytes(rebuilt[ICMPv6EchoRequest].data) == DATA[:3000]


def test_destination_options_before_routing_are_unfragmentable():
    original = v6_packet(2000, IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(segleft=0))
    frags = fragment_ipv6(original, 1280, ident=1)
    assert ipv6.parse(frags[1]).fragment.header_offset == 40 + 8 + 8
    assert feed(Reassembler(), frags) == [original]


# our fragments, scapy's reassembly


def test_scapy_reassembles_our_ipv4_fragments():
    original = v4_packet(3000)
    frags = fragment_ipv4(original, 576)
    assert all(len(f) <= 576 for f in frags)
    whole = defragment([IP(f) for f in frags])
    assert bytes(whole[0]) == original


def test_scapy_reassembles_our_ipv6_fragments():
    original = v6_packet(4000)
    frags = fragment_ipv6(original, 1500, ident=0x01020304)
    parsed = [IPv6(f) for f in frags]
    assert all(p[IPv6ExtHdrFragment].id == 0x01020304 for p in parsed)
    assert [p[IPv6ExtHdrFragment].m for p in parsed] == [1, 1, 0]
    whole = defragment6(parsed)
    assert bytes(whole[ICMPv6EchoRequest].data) == DATA[:4000]
    assert whole[ICMPv6EchoRequest].cksum == IPv6(original)[ICMPv6EchoRequest].cksum


def test_fragment_ipv4_refuses_df_and_tiny_mtu():
    with pytest.raises(ValueError):
        fragment_ipv4(v4_packet(flags="DF"), 1500)
    assert fragment_ipv4(v4_packet(1000, flags="DF"), 1500) == [v4_packet(1000, flags="DF")]
    with pytest.raises(ValueError):
        fragment_ipv4(v4_packet(), 67)


def test_fragment_ipv4_copies_only_copied_options():
    # RFC 791 §3.1: Record Route (7) is not copied, 0x82 (copied flag set) is; a NOP pads.
    options = bytes([7, 7, 4, 0, 0, 0, 0, 0x82, 4, 0xAA, 0xBB, 1])
    body = bytes(UDP(sport=1, dport=2) / DATA[:2000])
    header = bytearray(bytes(IP(src="10.0.0.1", dst="10.0.0.2", id=9, proto=17))[:20] + options)
    header[0] = 0x48
    header[2:4] = (len(header) + len(body)).to_bytes(2, "big")
    header[10:12] = internet_checksum(bytes(header[:10]) + b"\0\0" + bytes(header[12:])).to_bytes(2, "big")
    packet = bytes(header) + body
    frags = fragment_ipv4(packet, 600)
    assert (frags[0][0] & 0x0F) * 4 == 32
    assert all((f[0] & 0x0F) * 4 == 24 for f in frags[1:])
    assert all(f[20:24] == bytes([0x82, 4, 0xAA, 0xBB]) for f in frags[1:])
    assert all(verify(f[:(f[0] & 0x0F) * 4]) for f in frags)
    assert feed(Reassembler(), frags[::-1]) == [packet]


def test_fragment_ipv4_refragments_a_fragment():
    original = v4_packet(3000)
    first_cut = fragment_ipv4(original, 1500)
    second_cut = [g for f in first_cut for g in fragment_ipv4(f, 576)]
    assert all(len(f) <= 576 for f in second_cut)
    assert feed(Reassembler(), second_cut[::-1]) == [original]


def test_fragment_ipv6_limits():
    assert fragment_ipv6(v6_packet(100), 1280, 1) == [v6_packet(100)]
    with pytest.raises(ValueError):
        fragment_ipv6(v6_packet(4000), 40 + 8 + 7, 1)
    with pytest.raises(ValueError):
        fragment_ipv6(fragment_ipv6(v6_packet(2000), 1280, 1)[0] + bytes(2000), 1280, 2)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_round_trip_any_order_with_duplicates(data):
    family = data.draw(st.sampled_from([4, 6]))
    size = data.draw(st.integers(1, 4000))
    if family == 4:
        original = v4_packet(size)
        mtu = data.draw(st.integers(68, 1500))
        frags = fragment_ipv4(original, mtu)
    else:
        original = v6_packet(size)
        mtu = data.draw(st.integers(1280, 1500))
        frags = fragment_ipv6(original, mtu, data.draw(st.integers(0, 0xFFFFFFFF)))
    assert all(len(f) <= mtu for f in frags)
    if len(frags) == 1:
        assert frags == [original]  # fits: sent whole, no atomic fragment (RFC 8021)
        return
    arrivals = list(data.draw(st.permutations(frags)))
    last = arrivals.pop()
    for dup in data.draw(st.lists(st.sampled_from(arrivals), max_size=5)):
        arrivals.insert(data.draw(st.integers(0, len(arrivals))), dup)
    r = Reassembler(Limits(max_fragments_per_datagram=128))
    assert feed(r, arrivals) == []
    assert feed(r, [last]) == [original]
    assert not r.drops and r.datagrams == 0 and r.bytes_held == 0


# RFC 5722: overlaps


@pytest.mark.parametrize("family", [4, 6])
def test_overlap_discards_the_whole_datagram(family):
    make = v4_fragment if family == 4 else v6_fragment
    r = Reassembler()
    assert feed(r, [make(0, b"a" * 16, True), make(8, b"b" * 16, True)]) == []
    assert r.drops["overlap"] == 1
    assert r.bytes_held == 0
    # The rest, even pieces that would have completed it, are dropped silently until the timer runs out.
    assert feed(r, [make(16, b"c" * 8, False), make(8, b"b" * 8, True)]) == []
    assert r.drops["discarded_datagram"] == 2
    assert r.expire(1000.0) == []  # no ICMP for a discarded datagram
    assert feed(r, [make(0, b"a" * 8, True), make(8, b"b" * 8, False)], now=1000.0) != []


@pytest.mark.parametrize("family", [4, 6])
def test_overlap_at_the_tail_and_inside(family):
    make = v4_fragment if family == 4 else v6_fragment
    r = Reassembler()
    feed(r, [make(16, b"x" * 16, False), make(8, b"y" * 16, True)])
    assert r.drops["overlap"] == 1
    r = Reassembler()
    feed(r, [make(0, b"x" * 32, True), make(8, b"y" * 8, True)], now=0)  # wholly inside
    assert r.drops["overlap"] == 1


def test_scapy_overlapping_fragments_never_reassemble():
    original = v4_packet(3000)
    frags = [IP(bytes(f)) for f in fragment(IP(original), fragsize=1000)]
    evil = IP(bytes(frags[1]))
    evil.frag -= 1  # starts 8 bytes early: overlaps the first fragment
    del evil.chksum
    r = Reassembler()
    assert feed(r, [bytes(frags[0]), bytes(evil)] + [bytes(f) for f in frags[1:]]) == []
    assert r.drops["overlap"] == 1


def test_inconsistent_lengths_discard():
    r = Reassembler()
    feed(r, [v4_fragment(0, b"a" * 8, True), v4_fragment(16, b"c" * 8, False), v4_fragment(24, b"b" * 8, True)])
    assert r.drops["inconsistent_length"] == 1
    r = Reassembler()
    feed(r, [v4_fragment(16, b"c" * 8, False), v4_fragment(24, b"d" * 8, False)])
    assert r.drops["inconsistent_length"] == 1
    r = Reassembler()
    feed(r, [v6_fragment(32, b"c" * 8, True), v6_fragment(8, b"d" * 8, False)])
    assert r.drops["inconsistent_length"] == 1


def test_empty_odd_and_oversize_fragments_counted():
    r = Reassembler()
    assert feed(r, [v4_fragment(8, b"", True), v4_fragment(0, b"z" * 12, True), v4_fragment(65528, b"q" * 8, False)]
                ) == []
    assert r.drops == {"empty_fragment": 1, "odd_length": 1, "oversize": 1}
    assert r.datagrams == 0


def test_ipv6_reassembled_past_65535_is_refused():
    # A last fragment ending at 65,535 octets of data plus a 16-byte unfragmentable part.
    big_first = bytes(IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrDestOpt()
                      / IPv6ExtHdrRouting(segleft=0) / IPv6ExtHdrFragment(nh=59, m=1, id=3) / (b"a" * 8))
    last = bytes(IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrFragment(nh=59, offset=8190, id=3) / (b"z" * 15))
    r = Reassembler(Limits(max_fragments_per_datagram=3))
    parsed_first = ipv6.parse(big_first)
    assert parsed_first.fragment.header_offset == 40 + 8 + 8
    assert r.add_ipv6(big_first, parsed_first, 0.0) is None
    r.add_ipv6(last, ipv6.parse(last), 0.0)
    assert r.drops == {}  # still incomplete; nothing wrong yet
    # Fill the gap cheaply by making the datagram complete with one middle piece.
    middle = bytes(IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrFragment(nh=59, offset=1, m=1, id=3)
                   / (b"m" * (65520 - 8)))
    r.add_ipv6(middle, ipv6.parse(middle), 0.0)
    assert r.drops["oversize"] == 1 and r.datagrams == 0


def test_api_misuse_raises():
    r = Reassembler()
    with pytest.raises(ValueError):
        r.add_ipv4(v4_packet(100), 0.0)
    with pytest.raises(ValueError):
        pkt = v6_packet(100)
        r.add_ipv6(pkt, ipv6.parse(pkt), 0.0)


def test_atomic_fragment_is_delivered_at_once():
    original = v6_packet(100)
    atomic = original[:6] + b"\x2c" + original[7:40] + bytes(IPv6ExtHdrFragment(nh=58, id=77)) + original[40:]
    atomic = atomic[:4] + (len(atomic) - 40).to_bytes(2, "big") + atomic[6:]
    r = Reassembler()
    assert feed(r, [atomic]) == [original]
    assert r.datagrams == 0


# Timers


def test_timeouts_with_a_hand_driven_clock():
    r = Reassembler()
    assert r.next_deadline() is None
    first4 = v4_fragment(0, b"a" * 8, True, ident=1)
    feed(r, [first4], now=100.0)
    feed(r, [v4_fragment(16, b"c" * 8, False, ident=2)], now=101.0)  # no first fragment
    feed(r, [v6_fragment(0, b"a" * 8, True, ident=3)], now=102.0)
    feed(r, [v6_fragment(8, b"b" * 8, True, ident=4)], now=103.0)
    assert r.next_deadline() == 130.0
    assert r.expire(129.9) == []
    expired = r.expire(130.0)
    assert [(e.family, e.icmp_owed) for e in expired] == [(4, True)]
    assert expired[0].first_fragment == first4
    assert expired[0].src == bytes([10, 0, 0, 1])
    assert r.next_deadline() == 131.0
    assert [(e.family, e.icmp_owed) for e in r.expire(131.0)] == [(4, False)]
    assert r.next_deadline() == 162.0  # IPv6: 60 s after its first-arriving fragment
    expired = r.expire(1000.0)
    assert [(e.family, e.icmp_owed) for e in expired] == [(6, True), (6, False)]
    assert expired[0].src == ipaddress.IPv6Address("fd00::1").packed
    assert ipv6.parse(expired[0].first_fragment).fragment.offset == 0
    assert r.drops["timeout"] == 4
    assert r.next_deadline() is None and r.bytes_held == 0 and r.datagrams == 0


def test_the_timer_starts_with_the_first_arriving_fragment():
    r = Reassembler()
    feed(r, [v6_fragment(8, b"b" * 8, False)], now=0.0)
    feed(r, [v6_fragment(8, b"b" * 8, False)], now=50.0)  # later arrivals do not restart it
    assert r.next_deadline() == 60.0
    assert feed(r, [v6_fragment(0, b"a" * 8, True)], now=59.0) == [
        bytes(IPv6(src="fd00::1", dst="fd00::2", nh=59) / (b"a" * 8 + b"b" * 8))]


# Bounds


def test_flood_of_first_fragments_from_one_source():
    limits = Limits(max_datagrams_per_source=8)
    r = Reassembler(limits)
    for ident in range(100):
        feed(r, [v4_fragment(0, b"f" * 1024, True, ident=ident)])
    assert r.datagrams == 8
    assert r.drops["source_limit"] == 92
    # Another source still gets through.
    assert feed(r, [v4_fragment(0, b"a" * 8, True, src="10.0.0.9"), v4_fragment(8, b"b", False, src="10.0.0.9")])


@pytest.mark.parametrize("family", [4, 6])
def test_flood_from_many_sources_stays_within_bounds(family):
    limits = Limits(max_bytes=64 * 1024, max_datagrams=100)
    r = Reassembler(limits)
    for i in range(2000):
        if family == 4:
            src = str(ipaddress.IPv4Address("10.1.0.0") + i)
            feed(r, [v4_fragment(0, b"f" * 1200, True, ident=i, src=src)], now=i / 1000)
        else:
            src = str(ipaddress.IPv6Address("fd00::1:0") + i)
            feed(r, [v6_fragment(0, b"f" * 1200, True, ident=i, src=src)], now=i / 1000)
        assert r.bytes_held <= limits.max_bytes
        assert r.datagrams <= limits.max_datagrams
    assert r.drops["evicted"] >= 1900
    # A real datagram still completes after the flood.
    complete = v4_fragment if family == 4 else v6_fragment
    assert feed(r, [complete(0, b"a" * 8, True, ident=9999), complete(8, b"b", False, ident=9999)], now=3.0)


def test_flood_of_tiny_fragments_is_charged_its_overhead():
    limits = Limits(max_bytes=32 * 1024, max_fragments_per_datagram=10_000, max_datagrams_per_source=10_000)
    r = Reassembler(limits)
    for i in range(5000):
        feed(r, [v4_fragment(8 + 16 * i, b"t" * 8, True, ident=i % 3)])
        assert r.bytes_held <= limits.max_bytes
    assert r.drops["evicted"] > 0


def test_too_many_fragments_per_datagram():
    r = Reassembler(Limits(max_fragments_per_datagram=4))
    frags = [v4_fragment(8 * i, b"x" * 8, True) for i in range(6)]
    assert feed(r, frags) == []
    assert r.drops["too_many_fragments"] == 1 and r.drops["discarded_datagram"] == 1
    assert r.bytes_held == 0


arrivals = st.lists(
    st.tuples(st.sampled_from([4, 6]), st.integers(0, 3), st.integers(0, 40), st.integers(0, 5), st.booleans(),
              st.floats(0, 5)),
    max_size=80,
)


@settings(max_examples=80, deadline=None)
@given(arrivals)
def test_any_fragment_sequence_keeps_the_books(sequence):
    """Random fragments (overlaps, gaps, odd sizes, conflicting ends): no exception, bounds hold, all freed."""
    limits = Limits(max_bytes=4096, max_datagrams=5, max_datagrams_per_source=3, max_fragments_per_datagram=6,
                    timeout_ipv4=3.0, timeout_ipv6=4.0)
    r = Reassembler(limits)
    now = 0.0
    for family, ident, offset_units, size_units, more, step in sequence:
        now += step
        r.expire(now)
        more = more or offset_units == 0  # offset 0 without M is no fragment at all
        data = bytes([ident]) * (size_units * 8 + (0 if more else ident))
        make = v4_fragment if family == 4 else v6_fragment
        feed(r, [make(offset_units * 8, data, more, ident=ident, src="10.0.0.1" if family == 4 else "fd00::1")],
             now=now)
        assert r.bytes_held <= limits.max_bytes
        assert r.datagrams <= limits.max_datagrams
        deadline = r.next_deadline()
        assert deadline is None or deadline > now
    r.expire(now + 10.0)
    assert r.datagrams == 0 and r.bytes_held == 0 and r.next_deadline() is None
