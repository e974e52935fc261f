"""Attach mode's sans-IO relays: the forwarding policy, TCP's held SYN and stream bridge, UDP and echo.

Each relay is driven only through its front door: packets and upstream
events in, packets and commands for the shell out; time by hand.
"""

import collections

import pytest
import structlog

from pipeline.config import DEFAULT_MAX_TIME_WAIT, DEFAULT_SYN_QUEUE
from pipeline.relay_config import DEFAULT_UDP_IDLE, DEFAULT_UDP_IDLE_DNS
from pipeline.flow import Flow
from workers.attach.policy import NAME_GRACE, ForwardPolicy, NameTable
from pipeline.wire import icmpv6, ipv6
from pipeline.wire.icmp import ECHO_REPLY, ECHO_REQUEST, IcmpMessage, parse_icmp
from pipeline.wire.icmpv6 import Icmpv6Message
from pipeline.wire.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, Ipv4Header, build_ipv4, parse_ipv4
from pipeline.wire.seqnum import seq_add
from pipeline.wire.tcp import Flags, TcpOptions, TcpSegment, parse_tcp
from pipeline.wire.udp import UdpDatagram, parse_udp
from workers.attach import relay
from workers.core import Sink
from workers.attach.icmp import EchoRelay
from workers.tcp.config import TcpConfig
from workers.tcp.demux import TcpDemux
from workers.attach.tcp import TcpRelay
from workers.attach.udp import UdpRelay

US = bytes([10, 0, 0, 2])
CLIENT = bytes([10, 0, 0, 1])
SERVER = bytes([192, 0, 2, 10])
METADATA = bytes([169, 254, 169, 254])
T0 = 100.0
KEY = Flow(CLIENT, 40000, 80, SERVER)


def ip(addr: str) -> bytes:
    return bytes(int(x) for x in addr.split("."))


def test_policy_denies_loopback_link_local_and_metadata_by_default():
    policy = ForwardPolicy()
    assert policy.decide(SERVER, 0.0).target == SERVER
    for denied in ("127.0.0.1", "127.9.9.9", "169.254.169.254"):
        assert policy.decide(ip(denied), 0.0).target is None
    assert policy.decide(bytes(15) + b"\x01", 0.0).target is None  # ::1
    assert policy.decide(b"\xfe\x80" + bytes(14), 0.0).target is None  # fe80::
    assert policy.decide(b"\x20\x01\x0d\xb8" + bytes(12), 0.0).target is not None


def test_policy_lists_and_host_alias():
    assert ForwardPolicy(deny="192.0.2.0/25").decide(SERVER, 0.0) == (None, "denied_network", "")
    allow = ForwardPolicy(allow="192.0.2.0/24, 127.0.0.1")
    assert allow.decide(SERVER, 0.0).target == SERVER and allow.decide(ip("198.51.100.1"), 0.0).target is None
    assert allow.decide(ip("127.0.0.1"), 0.0).target == ip("127.0.0.1")  # named in the allow list: wins over the default deny
    alias = ForwardPolicy(host_alias="10.0.2.2")
    assert alias.decide(ip("10.0.2.2"), 0.0).target == ip("127.0.0.1")
    with pytest.raises(ValueError):
        ForwardPolicy(deny="not-a-network")


def test_policy_allows_by_name_only_what_our_resolver_answered_until_ttl_and_grace():
    names = NameTable()
    policy = ForwardPolicy(allow_names=("pkgs.example", "*.example.org"), names=names)
    other = ip("192.0.2.20")
    assert policy.decide(SERVER, T0) == (None, "name_unknown", "")
    names.learn("pkgs.example", [SERVER], ttl=60, now=T0)
    names.learn("cdn.example.org", [ip("192.0.2.30")], ttl=0, now=T0)
    names.learn("example.org", [other], ttl=60, now=T0)  # "*.example.org" names what is below it, not itself
    assert policy.decide(SERVER, T0 + 1) == (SERVER, "", "pkgs.example")
    assert policy.decide(ip("192.0.2.30"), T0 + NAME_GRACE - 1).target == ip("192.0.2.30")
    assert policy.decide(ip("192.0.2.30"), T0 + NAME_GRACE) == (None, "name_unknown", "")
    assert policy.decide(other, T0) == (None, "name_not_allowed", "example.org")
    assert policy.decide(SERVER, T0 + 60 + NAME_GRACE) == (None, "name_unknown", "")
    # One address, two names: allowed through the allowed one; the address lists still apply.
    names.learn("tracker.test", [ip("127.0.0.1")], ttl=60, now=T0)
    names.learn("pkgs.example", [ip("127.0.0.1")], ttl=60, now=T0)
    assert policy.decide(ip("127.0.0.1"), T0) == (None, "denied_network", "pkgs.example")
    # Without allow_names the name only labels the flow.
    assert ForwardPolicy(names=names).decide(SERVER, T0) == (SERVER, "", "pkgs.example")


def test_name_table_is_bounded():
    names = NameTable(limit=3)
    for i in range(5):
        names.learn(f"n{i}.test", [bytes([192, 0, 2, i])], ttl=10 + i, now=T0)
    assert len(names.entries) == 3 and names.names_of(bytes([192, 0, 2, 4]), T0) == ["n4.test"]
    assert names.names_of(bytes([192, 0, 2, 0]), T0) == []  # the one expiring first made room


# -- TCP ----------------------------------------------------------------------------


def sink():
    return Sink(collections.Counter(), structlog.get_logger())


@pytest.fixture
def demux():
    s = sink()
    return TcpDemux(s, US, TcpConfig(send_buffer=4096), secret=b"s" * 32,
                    syn_queue_limit=DEFAULT_SYN_QUEUE, max_time_wait=DEFAULT_MAX_TIME_WAIT,
                    relay_=TcpRelay(s, ForwardPolicy(), connect_timeout=5.0))


def tcp_packet(seg: TcpSegment, dst=SERVER) -> bytes:
    return build_ipv4(Ipv4Header(src=CLIENT, dst=dst, protocol=PROTO_TCP), seg.emit(CLIENT, dst))


def parse(out, src=SERVER):
    pkt, _ = out
    header, payload = parse_ipv4(pkt)
    assert header.src == src and header.dst == CLIENT
    if header.protocol == PROTO_TCP:
        return parse_tcp(payload, header.src, header.dst)
    return parse_icmp(payload)


def syn(dport=80, seq=1000):
    return TcpSegment(40000, dport, seq, 0, Flags.SYN, 65535, options=TcpOptions(mss=1460))


def test_syn_is_held_until_the_upstream_connect_succeeds(demux):
    assert demux.handle_packet(tcp_packet(syn()), T0) == []
    assert demux.relay_commands() == [relay.Open(KEY, relay.TCP, SERVER, 80)]
    assert demux.handle_packet(tcp_packet(syn()), T0 + 1) == []  # the client's retransmission
    assert demux.relay_commands() == []
    [synack] = [parse(p) for p in demux.handle_upstream([relay.Upstream(KEY, relay.CONNECTED)], T0 + 1.1)]
    assert synack.flags == Flags.SYN | Flags.ACK and synack.ack == 1001
    assert KEY in demux.connections


@pytest.mark.parametrize("kind,detail", [(relay.REFUSED, ""), (relay.UNREACHABLE, "host"),
                                         (relay.UNREACHABLE, "net"), (relay.TIMED_OUT, "")])
def test_failed_connects_answer_as_the_network_did(demux, kind, detail):
    demux.handle_packet(tcp_packet(syn()), T0)
    demux.relay_commands()
    out = [parse(p) for p in demux.handle_upstream([relay.Upstream(KEY, kind, detail=detail)], T0 + 0.5)]
    if kind == relay.REFUSED:
        assert [s.flags for s in out] == [Flags.RST | Flags.ACK] and out[0].ack == 1001
    elif kind == relay.UNREACHABLE:
        [icmp] = out
        assert (icmp.type, icmp.code) == (3, 1 if detail == "host" else 0)
    else:
        assert out == []  # silence: the client times out on its own
    assert KEY not in demux.connections and not demux.relay.pending


def test_connect_that_never_settles_is_given_up_silently(demux):
    demux.handle_packet(tcp_packet(syn()), T0)
    demux.relay_commands()
    assert demux.next_deadline() == T0 + 5.0
    assert demux.handle_timer(T0 + 5.0) == []
    assert demux.relay_commands() == [relay.Close(KEY)]
    assert demux.handle_packet(tcp_packet(syn()), T0 + 6) == []  # a later SYN starts over
    assert demux.relay_commands() == [relay.Open(KEY, relay.TCP, SERVER, 80)]


def test_a_client_that_never_completes_the_handshake_releases_the_upstream_socket(demux):
    demux.handle_packet(tcp_packet(syn()), T0)
    demux.relay_commands()
    demux.handle_upstream([relay.Upstream(KEY, relay.CONNECTED)], T0 + 0.1)  # SYN-ACK sent; no ACK ever comes
    now = T0 + 0.1
    while KEY in demux.connections:  # the SYN-ACK's retransmissions run out (RFC 9293 §3.8.3 R2 for SYNs)
        now = demux.next_deadline()
        demux.handle_timer(now)
    assert demux.relay_commands() == [relay.Close(KEY, reset=True)]


def test_denied_destination_is_reset_at_once(demux):
    [rst] = [parse(p, METADATA) for p in demux.handle_packet(tcp_packet(syn(), METADATA), T0)]
    assert rst.flags & Flags.RST
    assert demux.relay_commands() == [] and demux.sink.counters["relay_denied"] == 1


def established(demux):
    demux.handle_packet(tcp_packet(syn()), T0)
    demux.relay_commands()
    [synack] = [parse(p) for p in demux.handle_upstream([relay.Upstream(KEY, relay.CONNECTED)], T0)]
    ack = TcpSegment(40000, 80, 1001, seq_add(synack.seq, 1), Flags.ACK, 65535)
    demux.handle_packet(tcp_packet(ack), T0)
    assert demux.relay_commands() == [relay.Pause(KEY, False)]  # established: start reading upstream
    return seq_add(synack.seq, 1)


def test_bytes_both_ways_with_back_pressure(demux):
    our = established(demux)
    data = TcpSegment(40000, 80, 1001, our, Flags.ACK | Flags.PSH, 65535, b"GET /")
    demux.handle_packet(tcp_packet(data), T0 + 0.01)
    assert demux.relay_commands() == [relay.Send(KEY, b"GET /")]
    # The upstream socket blocks: further bytes from the client stay in our receive buffer.
    demux.handle_upstream([relay.Upstream(KEY, relay.BLOCKED)], T0 + 0.02)
    more = TcpSegment(40000, 80, 1006, our, Flags.ACK | Flags.PSH, 65535, b"more")
    demux.handle_packet(tcp_packet(more), T0 + 0.03)
    assert demux.relay_commands() == []
    demux.handle_upstream([relay.Upstream(KEY, relay.DRAINED)], T0 + 0.04)
    assert demux.relay_commands() == [relay.Send(KEY, b"more")]
    # Upstream sends more than our 4 KiB send buffer holds: reading the socket pauses.
    out = demux.handle_upstream([relay.Upstream(KEY, relay.DATA, b"x" * 10000)], T0 + 0.05)
    assert sum(len(parse(p).payload) for p in out) > 0
    assert demux.relay_commands() == [relay.Pause(KEY, True)]


def test_half_close_both_ways_then_the_socket_is_released(demux):
    our = established(demux)
    fin = TcpSegment(40000, 80, 1001, our, Flags.ACK | Flags.FIN, 65535, b"bye")
    demux.handle_packet(tcp_packet(fin), T0 + 0.01)
    assert demux.relay_commands() == [relay.Send(KEY, b"bye"), relay.ShutWrite(KEY)]
    out = [parse(p) for p in demux.handle_upstream([relay.Upstream(KEY, relay.DATA, b"ok"),
                                                     relay.Upstream(KEY, relay.EOF)], T0 + 0.02)]
    assert b"".join(s.payload for s in out) == b"ok" and out[-1].flags & Flags.FIN
    assert relay.Close(KEY) in demux.relay_commands()


def test_upstream_reset_resets_the_client_and_client_reset_resets_upstream(demux):
    established(demux)
    out = [parse(p) for p in demux.handle_upstream([relay.Upstream(KEY, relay.RESET)], T0 + 0.01)]
    assert out[-1].flags & Flags.RST and KEY not in demux.connections
    assert demux.relay_commands() == []  # the shell closed that socket itself
    our = established(demux)
    rst = TcpSegment(40000, 80, 1001, our, Flags.RST, 0)
    demux.handle_packet(tcp_packet(rst), T0 + 0.02)
    assert demux.relay_commands() == [relay.Close(KEY, reset=True)]


# -- UDP and echo ---------------------------------------------------------------------


def test_udp_flow_relays_answers_errors_and_idles_out():
    r = UdpRelay(sink(), US, ForwardPolicy(), mtu=1500, idle=60.0, idle_dns=10.0)
    key = Flow(CLIENT, 5000, 7, SERVER)
    packet = build_ipv4(Ipv4Header(src=CLIENT, dst=SERVER, protocol=PROTO_UDP),
                        UdpDatagram(5000, 7, b"hi").emit(CLIENT, SERVER))
    assert r.datagram(key, b"hi", packet, T0) == []
    assert r.take_commands() == [relay.Open(key, relay.UDP, SERVER, 7), relay.Send(key, b"hi")]
    big = bytes(range(256)) * 12
    fragments = r.upstream(relay.Upstream(key, relay.DATA, big), T0 + 0.1)
    assert len(fragments) == 3 and all(len(p) <= 1500 for p, _ in fragments)
    [(first, _)] = r.upstream(relay.Upstream(key, relay.DATA, b"yo"), T0 + 0.2)
    header, payload = parse_ipv4(first)
    assert (header.src, header.dst) == (SERVER, CLIENT)
    assert parse_udp(payload, SERVER, CLIENT).payload == b"yo"
    [(err, _)] = r.upstream(relay.Upstream(key, relay.REFUSED), T0 + 0.3)
    icmp = parse_icmp(parse_ipv4(err)[1])
    assert (icmp.type, icmp.code) == (3, 3) and packet[:28] in icmp.payload
    assert r.next_deadline() == T0 + 0.2 + 60.0
    r.expire(T0 + 61)
    assert r.take_commands() == [relay.Close(key)] and not r.flows


def test_udp_denied_is_administratively_prohibited():
    r = UdpRelay(sink(), US, ForwardPolicy(), mtu=1500, idle=DEFAULT_UDP_IDLE, idle_dns=DEFAULT_UDP_IDLE_DNS)
    key = Flow(CLIENT, 5000, 53, METADATA)
    packet = build_ipv4(Ipv4Header(src=CLIENT, dst=METADATA, protocol=PROTO_UDP),
                        UdpDatagram(5000, 53, b"q").emit(CLIENT, METADATA))
    [(err, _)] = r.datagram(key, b"q", packet, T0)
    header, payload = parse_ipv4(err)
    assert header.src == METADATA and (parse_icmp(payload).type, parse_icmp(payload).code) == (3, 13)
    assert r.take_commands() == []


def test_echo_relay_restores_the_clients_identifier_and_fakes_nothing():
    r = EchoRelay(sink(), US, ForwardPolicy())
    request = IcmpMessage(ECHO_REQUEST, 0, (0x1234 << 16) | 7, b"ping data")
    packet = build_ipv4(Ipv4Header(src=CLIENT, dst=SERVER, protocol=PROTO_ICMP), request.emit())
    assert r.request(CLIENT, SERVER, request, packet, T0) == []
    key = Flow(CLIENT, 0x1234, 0, SERVER)
    assert r.take_commands() == [relay.Open(key, relay.ICMP, SERVER, 0), relay.Send(key, request.emit())]
    # The kernel's socket used its own identifier (0x9999); the client gets its own back.
    real = IcmpMessage(ECHO_REPLY, 0, (0x9999 << 16) | 7, b"ping data").emit()
    [(reply, _)] = r.upstream(relay.Upstream(key, relay.DATA, real), T0 + 0.01)
    header, payload = parse_ipv4(reply)
    msg = parse_icmp(payload)
    assert (header.src, header.dst) == (SERVER, CLIENT)
    assert (msg.type, msg.identifier, msg.sequence, msg.payload) == (ECHO_REPLY, 0x1234, 7, b"ping data")
    # Anything but an echo reply produces nothing.
    assert r.upstream(relay.Upstream(key, relay.DATA, request.emit()), T0 + 0.02) == []
    assert r.upstream(relay.Upstream(key, relay.DATA, b"\x00"), T0 + 0.02) == []


def test_echo_relay_answers_admin_prohibited_while_the_host_refuses_echo_sockets():
    s = sink()
    r = EchoRelay(s, US, ForwardPolicy())
    request = IcmpMessage(ECHO_REQUEST, 0, (0x1234 << 16) | 1, b"ping data")
    packet = build_ipv4(Ipv4Header(src=CLIENT, dst=SERVER, protocol=PROTO_ICMP), request.emit())
    key = Flow(CLIENT, 0x1234, 0, SERVER)
    r.request(CLIENT, SERVER, request, packet, T0)
    r.take_commands()
    # The shell could not open the socket (EACCES: our group is outside net.ipv4.ping_group_range).
    [(error, _)] = r.upstream(relay.Upstream(key, relay.REFUSED, detail="ping_group_range"), T0)
    header, payload = parse_ipv4(error)
    msg = parse_icmp(payload)
    assert (header.src, header.dst, msg.type, msg.code) == (SERVER, CLIENT, 3, 13)  # administratively prohibited
    # Later requests are answered at once, without a socket, until the flow has been idle.
    [(again, _)] = r.request(CLIENT, SERVER, request, packet, T0 + 1)
    assert parse_icmp(parse_ipv4(again)[1]).code == 13 and r.take_commands() == []
    assert s.counters["relay_ping_refused"] == 2
    r.expire(T0 + 1 + r.idle)
    r.request(CLIENT, SERVER, request, packet, T0 + 1 + r.idle)
    assert [type(c) for c in r.take_commands()] == [relay.Close, relay.Open, relay.Send]  # tried again: fixed?


def test_echo_relay_over_ipv6_restores_the_clients_identifier():
    client6, server6 = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("20010db8" + "00" * 11 + "10")
    r = EchoRelay(sink(), US, ForwardPolicy())
    request = Icmpv6Message(icmpv6.ECHO_REQUEST, 0, (0x1234 << 16) | 7, b"ping data")
    assert r.request(client6, server6, request, b"", T0) == []
    key = Flow(client6, 0x1234, 0, server6)
    assert r.take_commands() == [relay.Open(key, relay.ICMP, server6, 0),
                                 relay.Send(key, request.to_bytes(client6, server6))]
    real = Icmpv6Message(icmpv6.ECHO_REPLY, 0, (0x9999 << 16) | 7, b"ping data").to_bytes(server6, client6)
    [(reply, _)] = r.upstream(relay.Upstream(key, relay.DATA, real), T0 + 0.01)
    parsed = ipv6.parse(reply)
    assert (parsed.header.src, parsed.header.dst, parsed.protocol) == (server6, client6, ipv6.ICMPV6)
    msg = icmpv6.parse(reply[parsed.payload_offset:], server6, client6)  # checksum verified
    assert (msg.type, msg.identifier, msg.sequence, msg.payload) == (icmpv6.ECHO_REPLY, 0x1234, 7, b"ping data")
    assert r.upstream(relay.Upstream(key, relay.DATA, request.to_bytes(server6, client6)), T0 + 0.02) == []


def test_published_udp_port_maps_each_sender_to_a_port_inside_and_back():
    ns_addr = CLIENT  # the namespace's kernel-side address
    r = UdpRelay(sink(), US, ForwardPolicy(), mtu=1500, idle=DEFAULT_UDP_IDLE, idle_dns=DEFAULT_UDP_IDLE_DNS,
                 publish={5353: 53}, namespace_address=ns_addr)
    assert r.take_commands() == [relay.Listen(("listen", 5353), relay.UDP, 5353)]
    outs = [r.upstream(relay.Upstream(("listen", 5353), relay.RECEIVED, b"q", peer), T0)
            for peer in ("192.0.2.7|1000", "192.0.2.8|1000", "192.0.2.7|1000")]
    ports = []
    for [(pkt, _)] in outs:
        header, payload = parse_ipv4(pkt)
        assert (header.src, header.dst) == (US, ns_addr)
        dgram = parse_udp(payload, US, ns_addr)
        assert dgram.dst_port == 53 and dgram.payload == b"q"
        ports.append(dgram.src_port)
    assert ports[0] == ports[2] != ports[1]  # one port per sender, kept
    assert r.answer(ns_addr, 53, ports[1], b"a", T0 + 1)
    assert r.take_commands() == [relay.SendTo(("listen", 5353), b"a", "192.0.2.8|1000")]
    assert not r.answer(ns_addr, 54, ports[1], b"a", T0 + 1)  # not from the published port
    assert not r.answer(SERVER, 53, ports[1], b"a", T0 + 1)   # not from the namespace
    r.expire(T0 + 1 + DEFAULT_UDP_IDLE)
    assert not r.answer(ns_addr, 53, ports[1], b"a", T0 + 100)  # the mapping idled out


def test_a_new_syn_on_a_relayed_flow_in_time_wait_waits_for_a_new_upstream(demux):
    established(demux)
    # The upstream finishes first: our FIN, then the client's; we hold TIME-WAIT.
    [our_fin] = [parse(p) for p in demux.handle_upstream([relay.Upstream(KEY, relay.EOF)], T0 + 0.01)]
    assert our_fin.flags & Flags.FIN
    fin = TcpSegment(40000, 80, 1001, seq_add(our_fin.seq, 1), Flags.ACK | Flags.FIN, 65535)
    demux.handle_packet(tcp_packet(fin), T0 + 0.02)
    assert demux.connections[KEY].state.name == "TIME_WAIT"
    assert relay.Close(KEY) in demux.relay_commands()  # both directions done: the socket is released
    # RFC 6191 reuse, but the old upstream socket is gone: the SYN is held for a new connect.
    assert demux.handle_packet(tcp_packet(syn(seq=500_000)), T0 + 1) == []
    assert demux.relay_commands() == [relay.Open(KEY, relay.TCP, SERVER, 80)]
    assert KEY not in demux.connections
