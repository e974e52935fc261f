"""IPv6 through the cores and routing: echo, UDP, TCP, fragments both ways, ICMP errors in and out.

Packets are built with scapy (an independent implementation) where it can;
the stack's replies are read back with scapy or our own checked parses.
"""

import collections

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6PacketTooBig,
                                ICMPv6ParamProblem, ICMPv6TimeExceeded, IPv6, IPv6ExtHdrDestOpt,
                                IPv6ExtHdrFragment, IPv6ExtHdrRouting, PadN, fragment6)

from pipeline.config import DEFAULT_MAX_TIME_WAIT, DEFAULT_SYN_QUEUE
from pipeline.flow import Flow
from pipeline.fragments import Reassembler, fragment_ipv4
from pipeline.membership import Membership
from pipeline.pcap import FlowFilter
from pipeline.routing import Router
from pipeline.wire import icmp, icmpv6, ipv6
from pipeline.wire.addr import split_endpoint
from pipeline.wire.seqnum import seq_add, seq_lt
from workers.core import Sink, fit_mtu, ip_view
from workers.icmp.core import IcmpCore
from workers.tcp.config import TcpConfig
from workers.tcp.connection import State
from workers.tcp.demux import TcpDemux
from workers.tcp.isn import TICKS_PER_SECOND, isn_offset
from workers.udp.core import UdpCore

US4, PEER4 = "10.0.0.2", "10.0.0.1"
US6, PEER6 = "fd00::2", "fd00::1"
US4_B, US6_B = bytes([10, 0, 0, 2]), bytes.fromhex("fd00" + "00" * 13 + "02")
PEER6_B = bytes.fromhex("fd00" + "00" * 13 + "01")
T0 = 100.0


def sink():
    return Sink(collections.Counter(), structlog.get_logger())


def replies(out):
    return [bytes(pkt) for pkt, _ in out]


# -- ICMPv6 echo and the errors the icmp worker builds --------------------------------------


@pytest.fixture
def icmp_core():
    return IcmpCore(sink(), US4_B, US6_B, mtu=1500)


def test_icmpv6_echo_reply(icmp_core):
    req = IPv6(src=PEER6, dst=US6, tc=0x20) / ICMPv6EchoRequest(id=0x1234, seq=7, data=b"abc" * 10)
    [reply] = replies(icmp_core.handle_packet(bytes(req), T0))
    got = IPv6(reply)
    assert got.src == US6 and got.dst == PEER6 and got.tc == 0x20
    echo = got[ICMPv6EchoReply]
    assert (echo.id, echo.seq, echo.data) == (0x1234, 7, b"abc" * 10)
    assert icmpv6.parse(reply[40:], US6_B, PEER6_B).type == icmpv6.ECHO_REPLY  # checksum over the pseudo header


@pytest.mark.parametrize("v6", [False, True])
def test_echo_reply_larger_than_the_mtu_is_fragmented_and_reassembles(icmp_core, v6):
    data = bytes(range(256)) * 16  # 4096 bytes
    if v6:
        req = IPv6(src=PEER6, dst=US6) / ICMPv6EchoRequest(id=1, seq=2, data=data)
    else:
        req = IP(src=PEER4, dst=US4, flags=0) / ICMP(id=1, seq=2) / data
    pieces = replies(icmp_core.handle_packet(bytes(req), T0))
    assert len(pieces) == 3 and all(len(p) <= 1500 for p in pieces)
    reasm = Reassembler()
    whole = None
    for piece in reversed(pieces):
        if v6:
            whole = reasm.add_ipv6(piece, ipv6.parse(piece), T0) or whole
        else:
            whole = reasm.add_ipv4(piece, T0) or whole
    if v6:
        assert IPv6(whole)[ICMPv6EchoReply].data == data
    else:
        assert bytes(IP(whole)[ICMP].payload) == data and IP(whole)[ICMP].type == 0


def test_ipv4_echo_with_df_is_not_fragmented(icmp_core):
    req = IP(src=PEER4, dst=US4, flags="DF") / ICMP() / bytes(1600)
    assert icmp_core.handle_packet(bytes(req), T0) == []
    assert icmp_core.sink.counters["drop_reply_too_big_df"] == 1


def test_unknown_next_header_gets_parameter_problem(icmp_core):
    bad = bytes(IPv6(src=PEER6, dst=US6, nh=253) / b"12345678")
    [reply] = replies(icmp_core.handle_packet(bad, T0))
    problem = IPv6(reply)[ICMPv6ParamProblem]
    assert problem.code == icmpv6.UNRECOGNIZED_NEXT_HEADER and problem.ptr == ipv6.NEXT_HEADER_OFFSET
    assert bytes(problem.payload)[:40] == bad[:40]


def test_routing_header_with_segments_left_gets_parameter_problem(icmp_core):
    bad = bytes(IPv6(src=PEER6, dst=US6) / IPv6ExtHdrRouting(type=253, segleft=1, addresses=[PEER6])
                / ICMPv6EchoRequest())
    [reply] = replies(icmp_core.handle_packet(bad, T0))
    problem = IPv6(reply)[ICMPv6ParamProblem]
    assert problem.code == icmpv6.ERRONEOUS_HEADER and problem.ptr == 40 + 2  # the Routing Type


def test_unanswerable_problem_is_not_answered(icmp_core):
    # RFC 4443 §2.4 (e.2): never an error about an ICMPv6 error.
    bad = bytes(IPv6(src=PEER6, dst=US6) / IPv6ExtHdrDestOpt(options=[PadN(otype=0x80, optdata=b"xx")])
                / ICMPv6DestUnreach())
    assert icmp_core.handle_packet(bad, T0) == []


@pytest.mark.parametrize("v6", [False, True])
def test_bare_first_fragment_gets_reassembly_time_exceeded(icmp_core, v6):
    # Ingress forwards a first fragment to icmp only when its datagram timed out.
    if v6:
        first = fragment6(IPv6(src=PEER6, dst=US6) / IPv6ExtHdrFragment(id=9) / ICMPv6EchoRequest(data=bytes(3000)),
                          1280)[0]
        [reply] = replies(icmp_core.handle_packet(bytes(first), T0))
        err = IPv6(reply)[ICMPv6TimeExceeded]
        assert err.code == icmpv6.FRAGMENT_REASSEMBLY_TIME_EXCEEDED
    else:
        first = fragment_ipv4(bytes(IP(src=PEER4, dst=US4, flags=0) / ICMP() / bytes(3000)), 1500)[0]
        [reply] = replies(icmp_core.handle_packet(first, T0))
        err = IP(reply)[ICMP]
        assert (err.type, err.code) == (icmp.TIME_EXCEEDED, icmp.REASSEMBLY_TIME_EXCEEDED)
        assert bytes(err.payload)[:20] == first[:20]


# -- UDP over IPv6 --------------------------------------------------------------------------


@pytest.fixture
def udp_core():
    return UdpCore(sink(), US4_B, address6=US6_B, mtu=1500)


def test_udp_echo_over_ipv6(udp_core):
    [reply] = replies(udp_core.handle_packet(bytes(IPv6(src=PEER6, dst=US6) / UDP(sport=5555, dport=7) / b"hi"), T0))
    got = IPv6(reply)
    assert got.src == US6 and got[UDP].dport == 5555 and bytes(got[UDP].payload) == b"hi"
    recomputed = IPv6(reply)
    del recomputed[UDP].chksum
    assert IPv6(bytes(recomputed))[UDP].chksum == got[UDP].chksum  # scapy agrees with our pseudo-header sum


def test_udp_zero_checksum_over_ipv6_is_dropped(udp_core):
    raw = bytearray(bytes(IPv6(src=PEER6, dst=US6) / UDP(sport=5555, dport=7) / b"hi"))
    raw[40 + 6:40 + 8] = b"\x00\x00"
    assert udp_core.handle_packet(bytes(raw), T0) == []
    assert udp_core.sink.counters["drop_zero_checksum"] == 1


def test_udp_closed_port_over_ipv6_gets_icmpv6_port_unreachable(udp_core):
    offending = bytes(IPv6(src=PEER6, dst=US6) / UDP(sport=5555, dport=4444) / b"anyone")
    [reply] = replies(udp_core.handle_packet(offending, T0))
    err = IPv6(reply)[ICMPv6DestUnreach]
    assert err.code == icmpv6.PORT_UNREACHABLE and bytes(err.payload) == offending


def test_large_udp_echo_over_ipv6_is_fragmented(udp_core):
    data = bytes(range(256)) * 12
    pieces = replies(udp_core.handle_packet(bytes(IPv6(src=PEER6, dst=US6) / UDP(sport=1, dport=7) / data), T0))
    assert len(pieces) == 3 and all(len(p) <= 1500 and IPv6ExtHdrFragment in IPv6(p) for p in pieces)
    assert len({IPv6(p)[IPv6ExtHdrFragment].id for p in pieces}) == 1


def test_icmp_error_about_a_datagram_is_counted(udp_core):
    ours = IPv6(src=US6, dst=PEER6) / UDP(sport=7, dport=5555) / b"x"
    err = IPv6(src=PEER6, dst=US6) / ICMPv6DestUnreach(code=4) / ours
    assert udp_core.handle_packet(bytes(err), T0) == []
    assert udp_core.sink.counters["icmp_errors_in"] == 1


# -- TCP over IPv6, and ICMP errors about TCP ------------------------------------------------


@pytest.fixture
def demux():
    return TcpDemux(sink(), US4_B, TcpConfig(mss=1460), secret=b"s" * 32, address6=US6_B,
                    syn_queue_limit=DEFAULT_SYN_QUEUE, max_time_wait=DEFAULT_MAX_TIME_WAIT)


def _segments(out):
    return [IPv6(p) if p[0] >> 4 == 6 else IP(p) for p in replies(out)]


def _syn(v6=True, sport=40000, dport=7):
    ip = IPv6(src=PEER6, dst=US6) if v6 else IP(src=PEER4, dst=US4)
    return bytes(ip / TCP(sport=sport, dport=dport, flags="S", seq=1000, window=65535, options=[("MSS", 1440)]))


def _open(demux, v6=True, sport=40000, dport=7, now=T0):
    [synack] = _segments(demux.handle_packet(_syn(v6, sport, dport), now))
    ip = IPv6(src=PEER6, dst=US6) if v6 else IP(src=PEER4, dst=US4)
    ack = ip / TCP(sport=sport, dport=dport, flags="A", seq=1001, ack=seq_add(synack[TCP].seq, 1), window=65535)
    assert demux.handle_packet(bytes(ack), now) == []
    return synack


def test_tcp_over_ipv6_offers_mtu_minus_60(demux):
    [synack] = _segments(demux.handle_packet(_syn(), T0))
    assert synack.src == US6 and synack[TCP].flags == "SA"
    assert dict(synack[TCP].options)["MSS"] == 1440  # 1460 (MTU - 40) less IPv6's 20 more header bytes
    recomputed = synack.copy()
    del recomputed[TCP].chksum
    assert IPv6(bytes(recomputed))[TCP].chksum == synack[TCP].chksum


def test_tcp_over_ipv6_closed_port_gets_a_reset(demux):
    [rst] = _segments(demux.handle_packet(_syn(dport=4444), T0))
    assert rst.dst == PEER6 and rst[TCP].flags == "RA" and rst[TCP].ack == 1001


def _send_bulk(demux, v6, n=20000, now=T0):
    """Make the echo service send n bytes: the peer sends them, acknowledging nothing it gets back."""
    synack = _open(demux, v6, now=now)
    ip = IPv6(src=PEER6, dst=US6) if v6 else IP(src=PEER4, dst=US4)
    data = ip / TCP(sport=40000, dport=7, flags="PA", seq=1001, ack=seq_add(synack[TCP].seq, 1), window=65535) / bytes(n)
    return synack, _segments(demux.handle_packet(bytes(data), now + 0.01))


def _error_about(seg, v6: bool, mtu: int, kind: str = "ptb"):
    if v6:
        quote = IPv6(bytes(seg))
        body = ICMPv6PacketTooBig(mtu=mtu) if kind == "ptb" else ICMPv6DestUnreach(code=4)
        return bytes(IPv6(src=PEER6, dst=US6) / body / bytes(quote)[:1232])
    body = ICMP(type=3, code=4, nexthopmtu=mtu) if kind == "ptb" else ICMP(type=3, code=3)
    return bytes(IP(src=PEER4, dst=US4) / body / bytes(seg)[:548])


@pytest.mark.parametrize("v6,mtu,mss", [(True, 1300, 1300 - 60), (True, 600, 1280 - 60), (False, 1000, 1000 - 40),
                                        (False, 100, 552 - 40)])
def test_packet_too_big_lowers_the_mss_and_resends_at_the_new_size(demux, v6, mtu, mss):
    _, sent = _send_bulk(demux, v6)
    data = [s for s in sent if len(s[TCP].payload)]
    assert data and max(len(s[TCP].payload) for s in data) > mss
    out = _segments(demux.handle_packet(_error_about(data[0], v6, mtu), T0 + 0.02))
    # The first unacknowledged segment again at once, cut to the path (no options: the SYN offered none).
    assert [s[TCP].seq for s in out] == [data[0][TCP].seq]
    assert len(out[0][TCP].payload) == mss
    assert demux.sink.counters["pmtu_lowered"] == 1
    conn = next(iter(demux.connections.values()))
    assert conn.sender.max_segment() == mss and conn.state is State.ESTABLISHED


def test_error_quoting_a_sequence_number_outside_the_flight_is_ignored(demux):
    _, sent = _send_bulk(demux, True)
    forged = IPv6(bytes(sent[0]))
    forged[TCP].seq = seq_add(forged[TCP].seq, 10_000_000)  # RFC 5927 §4.1: not one we have in flight
    assert demux.handle_packet(_error_about(forged, True, 1280), T0 + 0.02) == []
    assert demux.sink.counters["drop_icmp_error_out_of_window"] == 1
    assert next(iter(demux.connections.values())).sender.max_segment() == 1440


def test_error_check_across_the_sequence_wrap(demux):
    # RFC 6528 §3: ISN = M + F(4-tuple); start when it is 5,000 below 2**32, so the flight wraps.
    f = isn_offset(b"s" * 32, (US6_B, 7), (PEER6_B, 40000))
    now = ((2**32 - 5000 - f) % 2**32 + 0.5) / TICKS_PER_SECOND
    synack, sent = _send_bulk(demux, True, now=now)
    data = [s for s in sent if len(s[TCP].payload)]
    assert seq_lt(2**32 - 6000, synack[TCP].seq) and seq_lt(synack[TCP].seq, 2**32 - 4000)
    wrapped = [s for s in data if s[TCP].seq < 20_000]  # sent after SND.NXT wrapped: still in flight
    assert wrapped
    forged = IPv6(bytes(wrapped[0]))
    forged[TCP].seq = seq_add(forged[TCP].seq, 10_000_000)  # beyond SND.NXT, just past the wrap too
    assert demux.handle_packet(_error_about(forged, True, 1280), now + 0.02) == []
    assert demux.sink.counters["drop_icmp_error_out_of_window"] == 1
    out = _segments(demux.handle_packet(_error_about(wrapped[0], True, 1280), now + 0.02))
    assert demux.sink.counters["pmtu_lowered"] == 1 and [s[TCP].seq for s in out] == [data[0][TCP].seq]


@pytest.mark.parametrize("v6", [False, True])
def test_hard_error_aborts_a_connection_attempt_without_a_reset(demux, v6):
    [synack] = _segments(demux.handle_packet(_syn(v6), T0))
    assert demux.handle_packet(_error_about(synack, v6, 0, kind="unreachable"), T0 + 0.01) == []
    assert demux.connections == {} and demux.sink.counters["icmp_hard_errors"] == 1


def test_hard_error_on_an_established_connection_is_remembered_not_fatal(demux):
    _, sent = _send_bulk(demux, True)
    demux.handle_packet(_error_about(sent[0], True, 0, kind="unreachable"), T0 + 0.02)
    [conn] = demux.connections.values()
    assert conn.state is State.ESTABLISHED and conn.soft_error == "icmpv6_1_4"


# -- routing both families -----------------------------------------------------------------------


def make_router(address6=US6_B):
    drops, quiet = collections.Counter(), collections.Counter()
    members = Membership(3.0)
    for name, role in (("icmp.1", "icmp"), ("udp.1", "udp"), ("tcp.1", "tcp"), ("tcp.2", "tcp")):
        members.seen(name, role, 0.0)
    router = Router(US4_B, members, lambda reason, **kw: drops.update([reason]), started=-100.0, address6=address6,
                    quiet=lambda reason, **kw: quiet.update([reason]))
    return router, drops, quiet


def test_ipv6_off_keeps_ipv6_a_counted_drop():
    router, drops, _ = make_router(address6=None)
    assert router.route(bytes(IPv6(src=PEER6, dst=US6) / UDP(dport=7)), 0.0)[:2] == (None, "")
    assert drops == {"not_ipv4": 1}


def test_ipv6_goes_to_its_role_and_tcp_by_flow():
    router, drops, _ = make_router()
    assert router.route(bytes(IPv6(src=PEER6, dst=US6) / UDP(dport=7)), 0.0)[:2] == ("udp.1", "udp")
    assert router.route(bytes(IPv6(src=PEER6, dst=US6) / ICMPv6EchoRequest()), 0.0)[:2] == ("icmp.1", "icmp")
    seg = bytes(IPv6(src=PEER6, dst=US6) / IPv6ExtHdrDestOpt() / TCP(sport=40000, dport=7))
    owner, role, _, checked = router.route(seg, 0.0)
    assert role == "tcp" and owner in ("tcp.1", "tcp.2")
    assert checked is not None and checked.key == Flow(PEER6_B, 40000, 7).key  # found behind the extension header
    other = "tcp.2" if owner == "tcp.1" else "tcp.1"
    router.update_flows(other, False, (Flow(PEER6_B, 40000, 7),), ())  # 16-byte flow keys
    assert router.route(seg, 0.0)[0] == other
    assert router.route(bytes(IPv6(src=PEER6, dst="fd00::9") / UDP(dport=7)), 0.0)[:2] == (None, "")
    assert drops == {"not_for_us": 1}


def test_kernel_chatter_is_counted_quietly():
    from scapy.layers.inet6 import ICMPv6ND_NS, ICMPv6ND_RS, ICMPv6MLReport2
    router, drops, quiet = make_router()
    for pkt in (IPv6(src="fe80::1", dst="ff02::2") / ICMPv6ND_RS(),
                IPv6(src="fe80::1", dst="ff02::16") / ICMPv6MLReport2(),
                IPv6(src="::", dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt=PEER6)):
        assert router.route(bytes(pkt), 0.0)[:2] == (None, "")
    assert quiet == {"chatter_router_solicitation": 1, "chatter_mld_report": 1,
                     "chatter_duplicate_address_detection": 1}
    assert drops == {}


def test_param_problem_goes_to_icmp():
    router, _, _ = make_router()
    bad = bytes(IPv6(src=PEER6, dst=US6, nh=253) / b"12345678")
    assert router.route(bad, 0.0) == ("icmp.1", "icmp", bad, None)


@pytest.mark.parametrize("order", ["in_order", "reversed", "duplicated"])
@pytest.mark.parametrize("v6", [False, True])
def test_fragments_are_reassembled_before_routing(v6, order):
    router, drops, _ = make_router()
    if v6:
        pieces = [bytes(p) for p in fragment6(IPv6(src=PEER6, dst=US6) / IPv6ExtHdrFragment(id=5)
                                              / UDP(sport=1, dport=7) / (bytes(range(256)) * 12), 1280)]
    else:
        whole = IP(src=PEER4, dst=US4, flags=0) / UDP(sport=1, dport=7) / (bytes(range(256)) * 12)
        pieces = fragment_ipv4(bytes(whole), 1280)
    pieces = {"in_order": pieces, "reversed": pieces[::-1], "duplicated": pieces + pieces[:1]}[order]
    routes = [router.route(p, 0.0) for p in pieces]
    done = [r for r in routes if r[0] is not None]
    assert len(done) == 1 and done[0][1] == "udp"
    got = (IPv6 if v6 else IP)(done[0][2])
    assert bytes(got[UDP].payload) == bytes(range(256)) * 12 and IPv6ExtHdrFragment not in got
    assert drops == {}


def test_icmp_error_goes_to_the_owner_of_the_quoted_flow():
    router, _, _ = make_router()
    router.update_flows("tcp.2", False, (Flow(PEER6_B, 40000, 7),), ())
    ours = IPv6(src=US6, dst=PEER6) / TCP(sport=7, dport=40000, seq=5)
    assert router.route(bytes(IPv6(src=PEER6, dst=US6) / ICMPv6PacketTooBig(mtu=1280) / ours), 0.0)[:2] == (
        "tcp.2", "tcp")
    udp = IP(src=US4, dst=PEER4) / UDP(sport=7, dport=5)
    assert router.route(bytes(IP(src=PEER4, dst=US4) / ICMP(type=3, code=3) / udp), 0.0)[:2] == ("udp.1", "udp")
    not_ours = IP(src="10.9.9.9", dst=PEER4) / TCP(sport=7, dport=5)
    assert router.route(bytes(IP(src=PEER4, dst=US4) / ICMP(type=3, code=3) / not_ours), 0.0)[:2] == (
        "icmp.1", "icmp")


# -- hypothesis round trips ---------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 9000), mtu=st.integers(1280, 9000), v6=st.booleans(), ident=st.integers(0, 2**32 - 1))
def test_fit_mtu_then_reassembly_gives_the_packet_back(size, mtu, v6, ident):
    payload = bytes(i % 251 for i in range(size))
    if v6:
        packet = bytes(IPv6(src=US6, dst=PEER6) / UDP(sport=7, dport=9) / payload)
    else:
        packet = bytes(IP(src=US4, dst=PEER4, flags=0, id=ident & 0xFFFF) / UDP(sport=7, dport=9) / payload)
    pieces = fit_mtu(packet, mtu, ident)
    assert all(len(p) <= mtu for p in pieces)
    if len(pieces) == 1:
        assert pieces[0] == packet
        return
    reasm, whole = Reassembler(), None
    for piece in pieces:
        got = reasm.add_ipv6(piece, ipv6.parse(piece), 0.0) if v6 else reasm.add_ipv4(piece, 0.0)
        whole = got or whole
    assert whole == packet


@settings(max_examples=60, deadline=None)
@given(v6=st.booleans(), sport=st.integers(0, 65535), dport=st.integers(0, 65535), seq=st.integers(0, 2**32 - 1),
       pads=st.lists(st.integers(0, 5), max_size=3), quoted=st.integers(28, 1232))
def test_quote_round_trip(v6, sport, dport, seq, pads, quoted):
    if v6:
        ours = IPv6(src=US6, dst=PEER6)
        for n in pads:
            ours = ours / IPv6ExtHdrDestOpt(options=[PadN(optdata=bytes(n))] if n else [])
        raw = bytes(ours / TCP(sport=sport, dport=dport, seq=seq) / bytes(2000))
        quote = icmpv6.quoted_ipv6(raw[:quoted])
        header_end = len(raw) - 2000 - 20
    else:
        raw = bytes(IP(src=US4, dst=PEER4) / TCP(sport=sport, dport=dport, seq=seq) / bytes(2000))
        quote = icmp.quoted_ipv4(raw[:quoted])
        header_end = 20
    if quoted < header_end + 8:
        assert quote is None
        return
    assert quote.protocol == 6 and quote.tcp_seq == seq
    assert quote.flow_key == Flow(PEER6_B if v6 else bytes([10, 0, 0, 1]), dport, sport).key


@settings(max_examples=60, deadline=None)
@given(pads=st.lists(st.integers(0, 12), max_size=4), tc=st.integers(0, 255), hlim=st.integers(1, 255),
       data=st.binary(max_size=64))
def test_trusted_view_agrees_with_the_checked_parse(pads, tc, hlim, data):
    pkt = IPv6(src=PEER6, dst=US6, tc=tc, hlim=hlim)
    for n in pads:
        pkt = pkt / IPv6ExtHdrDestOpt(options=[PadN(optdata=bytes(n))] if n else [])
    raw = bytes(pkt / UDP(sport=1, dport=2) / data) + b"pad"  # link padding past Payload Length
    parsed = ipv6.parse(raw)
    view = ip_view(raw)
    assert (view.src, view.dst, view.protocol, view.tos, view.ttl) == (PEER6_B, US6_B, ipv6.UDP, tc, hlim)
    assert bytes(view.payload) == raw[parsed.payload_offset:parsed.payload_end]


def test_syn_cookie_over_ipv6_opens_the_connection():
    demux = TcpDemux(sink(), US4_B, TcpConfig(mss=1460), secret=b"s" * 32, address6=US6_B, syn_queue_limit=1,
                     max_time_wait=DEFAULT_MAX_TIME_WAIT)
    demux.handle_packet(_syn(sport=40000), T0)  # holds the SYN queue
    [synack] = _segments(demux.handle_packet(_syn(sport=40001), T0))
    assert demux.sink.counters["syn_cookies_sent"] == 1 and dict(synack[TCP].options)["MSS"] == 1440
    ack = IPv6(src=PEER6, dst=US6) / TCP(sport=40001, dport=7, flags="A", seq=1001, ack=synack[TCP].seq + 1,
                                         window=65535)
    assert demux.handle_packet(bytes(ack), T0 + 0.1) == []
    assert demux.sink.counters["syn_cookies_accepted"] == 1
    conn = demux.connections[Flow(PEER6_B, 40001, 7)]
    assert conn.state is State.ESTABLISHED and conn.config.mss == 1440


# -- operator tools over IPv6 ----------------------------------------------------------------


@pytest.mark.parametrize("spec,match", [
    ("[fd00::1]:40000", True), ("[fd00:0::2]:8000", True), ("fd00::1", True), (":8000", True),
    ("[fd00::1]:8001", False), ("fd00::9", False), ("10.0.0.1", False),
])
def test_flow_filter_on_ipv6_packets_past_extension_headers(spec, match):
    packet = bytes(IPv6(src=PEER6, dst=US6) / IPv6ExtHdrDestOpt() / TCP(sport=40000, dport=8000))
    assert FlowFilter(spec).matches_packet(packet) is match


def test_flow_filter_rejects_bad_ipv6_specs():
    for bad in ("[fd00::1", "[fd00::1]8000", "[zz::1]:80", "fd00::1::2"):
        with pytest.raises(ValueError):
            FlowFilter(bad)


def test_split_endpoint_both_families():
    assert split_endpoint("[fd00::1]:80") == ("fd00::1", "80")
    assert split_endpoint("fd00::1") == ("fd00::1", "")
    assert split_endpoint("10.0.0.1:80") == ("10.0.0.1", "80")
    assert split_endpoint(":80") == ("", "80")


def test_stackctl_conns_record_of_an_ipv6_connection(demux):
    _open(demux, v6=True)
    [record] = demux.connection_table(T0 + 1)
    assert record["local"] == "[fd00::2]:7" and record["remote"] == "[fd00::1]:40000" and record["mss"] == 1440


@given(st.binary(max_size=300), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 255))
@settings(max_examples=40, deadline=None)
def test_ipv4_echo_reply_checks_out_with_scapy(data, ident, seq, tos):
    core = IcmpCore(sink(), US4_B, US6_B, mtu=1500)
    req = IP(src=PEER4, dst=US4, tos=tos) / ICMP(id=ident, seq=seq) / data
    [(packet, offload)] = core.handle_packet(bytes(req), T0)
    reply = IP(packet)
    assert offload is None and (reply.src, reply.dst, reply.tos, reply.len) == (US4, PEER4, tos, len(packet))
    assert (reply[ICMP].type, reply[ICMP].id, reply[ICMP].seq, bytes(reply[ICMP].payload)) == (0, ident, seq, data)
    fresh = IP(packet)  # both checksums as scapy computes them, against ours
    del fresh.chksum, fresh[ICMP].chksum
    recomputed = IP(bytes(fresh))
    assert (recomputed.chksum, recomputed[ICMP].chksum) == (reply.chksum, reply[ICMP].chksum)
