"""Published ports in the relays: the table's changes, where a client enters the namespace, and back."""

import collections
import ipaddress

import pytest

from pipeline.config import DEFAULT_MAX_TIME_WAIT, DEFAULT_SYN_QUEUE
from pipeline.flow import Flow
from pipeline.wire.seqnum import seq_add
from pipeline.wire.tcp import Flags, TcpOptions, TcpSegment, parse_tcp
from pipeline.wire.udp import UdpDatagram, parse_udp
from workers.attach import relay
from workers.attach.inbound import Entry, Inside, changes, client_text, ports_of
from workers.attach.policy import ForwardPolicy
from workers.attach.tcp import TcpRelay
from workers.attach.udp import UdpRelay
from workers.core import Sink, ip_reply, ip_view
from workers.tcp.config import TcpConfig
from workers.tcp.demux import TcpDemux


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


US, US6 = ip("10.0.0.2"), ip("fd00::2")
NS, NS6 = ip("10.0.0.1"), ip("fd00::1")
ALIAS = ip("10.0.2.2")
CLIENT, CLIENT6 = ip("192.0.2.10"), ip("2001:db8::10")
T0 = 100.0
INSIDE = Inside(namespace=NS, stack=US, namespace6=NS6, stack6=US6, alias=ALIAS, client_source=True)


class Log:
    """A logger that keeps what it was told."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict]] = []

    def info(self, event: str, **fields: object) -> None:
        self.records.append((event, fields))

    debug = warning = error = info

    def bind(self, **fields: object) -> "Log":
        return self

    def of(self, event: str) -> list[dict]:
        return [fields for name, fields in self.records if name == event]


def sink() -> Sink:
    return Sink(collections.Counter(), Log())


# -- the table and the entry address ------------------------------------------------------


def test_changes_say_what_to_listen_on_close_and_remap():
    table = [("tcp", 18000, 8000), ("udp", 5353, 53), ("tcp", 18001, 8001)]
    assert ports_of(table, "tcp") == {18000: 8000, 18001: 8001} and ports_of(table, "udp") == {5353: 53}
    assert changes({1: 2, 3: 4, 5: 6}, {3: 4, 5: 7, 8: 9}) == ([8], [1], [5])
    assert changes({1: 2}, {1: 2}) == ([], [], [])


@pytest.mark.parametrize("peer,inside,entry", [
    ("::ffff:192.0.2.10", INSIDE, Entry(CLIENT, 40000, NS)),          # IPv4, mapped on the dual-stack socket
    ("2001:db8::10", INSIDE, Entry(CLIENT6, 40000, NS6)),             # IPv6: to the namespace's IPv6 address
    ("::ffff:127.0.0.1", INSIDE, Entry(ALIAS, 40000, NS)),            # loopback: the host alias
    ("::ffff:127.0.0.1", Inside(NS, US, NS6, US6, client_source=True), Entry(US, 0, NS)),  # no alias: the stack
    ("::1", INSIDE, Entry(US6, 0, NS6)),                              # the alias is IPv4 only
    ("::1", Inside(NS, US, NS6, US6, alias6=ip("fd00::99"), client_source=True), Entry(ip("fd00::99"), 40000, NS6)),
    ("fe80::1%ve-host", INSIDE, Entry(US6, 0, NS6)),                  # link-local: no way back inside
    ("::ffff:10.0.0.1", INSIDE, Entry(US, 0, NS)),                    # the namespace's own address
    ("2001:db8::10", Inside(NS, US, alias=ALIAS, client_source=True), Entry(US, 0, NS)),  # IPv6 off inside
    ("::ffff:192.0.2.10", Inside(NS, US, NS6, US6, ALIAS), Entry(US, 0, NS)),  # USTACK_PUBLISH_SOURCE=stack
    ("2001:db8::10", Inside(NS, US, NS6, US6, ALIAS), Entry(US, 0, NS)),
])
def test_where_a_client_enters_the_namespace(peer, inside, entry):
    assert inside.entry(peer, 40000) == entry


def test_records_name_an_ipv4_client_as_ipv4():
    assert client_text("::ffff:192.0.2.10") == "192.0.2.10" and client_text("2001:db8::10") == "2001:db8::10"


# -- TCP ------------------------------------------------------------------------------------


def make_demux(inside: Inside = INSIDE) -> TcpDemux:
    s = sink()
    return TcpDemux(s, US, TcpConfig(), secret=b"s" * 32, address6=US6, syn_queue_limit=DEFAULT_SYN_QUEUE,
                    max_time_wait=DEFAULT_MAX_TIME_WAIT,
                    relay_=TcpRelay(s, ForwardPolicy(), connect_timeout=5.0, inside=inside))


def accepted(n: int, peer: str, port: int) -> relay.Upstream:
    return relay.Upstream(("accepted", n), relay.ACCEPTED, peer.encode(), detail=str(port))


def segments(out: list) -> list[tuple[bytes, bytes, TcpSegment]]:
    parsed = []
    for packet, _ in out:
        view = ip_view(packet)
        parsed.append((bytes(view.src), bytes(view.dst), parse_tcp(bytes(view.payload), view.src, view.dst)))
    return parsed


def from_namespace(seg: TcpSegment, dst: bytes, src: bytes = NS) -> bytes:
    return ip_reply(src, dst, 6, seg.emit(src, dst))


def test_the_relay_listens_on_what_the_table_adds_and_closes_what_it_removes():
    demux = make_demux()
    demux.set_published([("tcp", 18000, 8000), ("udp", 5353, 53)], T0)
    assert demux.relay_commands() == [relay.Listen(("listen", 18000), relay.TCP, 18000)]
    demux.set_published([("tcp", 18000, 8000), ("udp", 5353, 53)], T0)
    assert demux.relay_commands() == []  # the same table again: nothing to do
    demux.set_published([("tcp", 18000, 8001), ("tcp", 18002, 80)], T0)
    assert demux.relay_commands() == [relay.Listen(("listen", 18002), relay.TCP, 18002)]  # 18000 remapped only
    demux.set_published([("tcp", 18002, 80)], T0)
    assert demux.relay_commands() == [relay.Close(("listen", 18000))]


def test_a_port_that_cannot_be_bound_is_counted_said_and_tried_with_the_next_table():
    demux = make_demux()
    demux.set_published([("tcp", 18000, 8000)], T0)
    demux.relay_commands()
    demux.handle_upstream([relay.Upstream(("listen", 18000), relay.LISTEN_FAILED, detail="Address in use")], T0)
    assert demux.sink.counters["publish_listen_failed"] == 1
    assert demux.sink.log.of("publish_failed") == [{"proto": "tcp", "port": 18000, "error": "Address in use"}]
    demux.set_published([("tcp", 18000, 8000), ("tcp", 18001, 8001)], T0 + 1)
    assert demux.relay_commands() == [relay.Listen(("listen", 18000), relay.TCP, 18000),
                                      relay.Listen(("listen", 18001), relay.TCP, 18001)]


def open_published(demux: TcpDemux, n: int, peer: str, port: int = 18000) -> tuple[Flow, TcpSegment]:
    out = demux.handle_upstream([accepted(n, peer, port)], T0)
    [(src, dst, syn)] = segments(out)
    [adopt] = demux.relay_commands()
    assert isinstance(adopt, relay.Adopt) and adopt.key == ("accepted", n)
    key = adopt.new
    stack = US6 if len(key.remote) == 16 else US
    assert (src, dst) == (key.local or stack, key.remote)  # from the client's address, or the stack's own
    assert syn.flags & Flags.SYN and not syn.flags & Flags.ACK
    return key, syn


def test_a_published_connection_enters_from_the_clients_address_and_its_record_names_the_client():
    demux = make_demux()
    demux.set_published([("tcp", 18000, 8000)], T0)
    demux.relay_commands()
    key, syn = open_published(demux, 1, "::ffff:192.0.2.10|40000")
    # The shape of a relayed flow's key: the namespace's end, then the client's port and address.
    assert key == Flow(NS, 8000, 40000, CLIENT) and (syn.src_port, syn.dst_port) == (40000, 8000)
    opened, _ = demux.flow_changes()
    assert opened == [key]  # announced before the SYN leaves: ingress routes the answer here
    # The namespace answers the client's address; the stack takes it as any relayed flow's segment.
    synack = TcpSegment(8000, 40000, 5000, seq_add(syn.seq, 1), Flags.SYN | Flags.ACK, 65535,
                        options=TcpOptions(mss=1460))
    [(src, dst, ack)] = segments(demux.handle_packet(from_namespace(synack, CLIENT), T0 + 0.01))
    assert (src, dst) == (CLIENT, NS) and ack.flags == Flags.ACK
    assert demux.relay_commands() == [relay.Pause(key, False)]  # established: the bridge reads the client
    # The client finishes, then the namespace: the flow's one record.
    demux.handle_upstream([relay.Upstream(key, relay.EOF)], T0 + 0.02)
    fin = TcpSegment(8000, 40000, 5001, seq_add(syn.seq, 2), Flags.FIN | Flags.ACK, 65535)
    demux.handle_packet(from_namespace(fin, CLIENT), T0 + 0.03)
    [record] = demux.sink.log.of("relay_flow")
    assert record["src"] == "192.0.2.10" and record["sport"] == 40000 and record["published"] == 18000
    assert record["dst"] == "10.0.0.1" and record["dport"] == 8000 and record["reason"] == "closed"
    # Our side waits in TIME-WAIT; the client comes again from the same port: that flow is reused.
    old = demux.connections[key]
    assert old.state.name == "TIME_WAIT"
    assert relay.Close(key) in demux.relay_commands()  # the client's socket is released meanwhile
    demux.flow_changes()
    again, syn2 = open_published(demux, 2, "::ffff:192.0.2.10|40000")
    assert again == key and demux.connections[key] is not old and demux.sink.counters["time_wait_reused"] == 1
    assert demux.flow_changes() == ([], [])  # the flow stayed ours: nothing to tell ingress
    assert syn2.seq == seq_add(old.sender.snd_nxt, 65537)  # above every sequence number the old one used


def test_ipv6_clients_enter_to_the_namespaces_ipv6_address_and_loopback_ones_as_the_alias():
    demux = make_demux()
    demux.set_published([("tcp", 18000, 8000)], T0)
    demux.relay_commands()
    key, _ = open_published(demux, 1, "2001:db8::10|40000")
    assert key == Flow(NS6, 8000, 40000, CLIENT6)
    key, _ = open_published(demux, 2, "::ffff:127.0.0.1|40001")
    assert key == Flow(NS, 8000, 40001, ALIAS)
    key, _ = open_published(demux, 3, "::1|40002")  # no IPv6 alias: the stack's own address, a port of ours
    assert key.remote == NS6 and key.local == b"" and key.lport != 40002


def test_with_publish_source_stack_every_client_enters_from_the_stack():
    demux = make_demux(Inside(NS, US, NS6, US6, ALIAS))
    demux.set_published([("tcp", 18000, 8000)], T0)
    demux.relay_commands()
    key, _ = open_published(demux, 1, "::ffff:192.0.2.10|40000")
    assert key.remote == NS and key.rport == 8000 and key.local == b""


def test_a_clients_flow_already_in_use_enters_from_the_stack_instead():
    # One client port to two published ports that lead to the same port inside: one flow key.
    demux = make_demux()
    demux.set_published([("tcp", 18000, 8000), ("tcp", 18001, 8000)], T0)
    demux.relay_commands()
    first, _ = open_published(demux, 1, "::ffff:192.0.2.10|40000", 18000)
    second, _ = open_published(demux, 2, "::ffff:192.0.2.10|40000", 18001)
    assert first == Flow(NS, 8000, 40000, CLIENT) and second.local == b"" and second.remote == NS
    assert demux.sink.counters["publish_source_taken"] == 1


def test_a_removed_port_keeps_its_connections_and_a_changed_one_applies_to_new_ones():
    demux = make_demux()
    demux.set_published([("tcp", 18000, 8000)], T0)
    demux.relay_commands()
    key, _ = open_published(demux, 1, "::ffff:192.0.2.10|40000")
    demux.set_published([("tcp", 18000, 9000)], T0 + 1)
    assert demux.relay_commands() == []  # still listening: only the port inside changed
    later, _ = open_published(demux, 2, "::ffff:192.0.2.10|40001")
    assert later.rport == 9000 and key in demux.connections
    demux.set_published([], T0 + 2)
    assert demux.relay_commands() == [relay.Close(("listen", 18000))]
    assert key in demux.connections and later in demux.connections  # they carry on
    # One the kernel had accepted before the listener closed: reset, nothing opened inside.
    assert demux.handle_upstream([accepted(3, "::ffff:192.0.2.10|40002", 18000)], T0 + 2) == []
    assert demux.relay_commands() == [relay.Close(("accepted", 3), reset=True)]
    assert demux.sink.counters["drop_publish_unpublished"] == 1


# -- UDP ------------------------------------------------------------------------------------


def udp_relay(inside: Inside = INSIDE) -> UdpRelay:
    r = UdpRelay(sink(), US, ForwardPolicy(), mtu=1500, idle=60.0, idle_dns=10.0, inside=inside)
    r.set_published([("udp", 5353, 53), ("tcp", 18000, 8000)], T0)
    assert r.take_commands() == [relay.Listen(("listen", 5353), relay.UDP, 5353)]
    return r


def received(r: UdpRelay, peer: str, data: bytes = b"q", now: float = T0) -> tuple[bytes, bytes, UdpDatagram]:
    [(packet, _)] = r.upstream(relay.Upstream(("listen", 5353), relay.RECEIVED, data, peer), now)
    view = ip_view(packet)
    return bytes(view.src), bytes(view.dst), parse_udp(bytes(view.payload), view.src, view.dst)


def test_a_udp_sender_enters_from_its_own_address_and_the_answer_to_it_goes_back():
    r = udp_relay()
    src, dst, dgram = received(r, "::ffff:192.0.2.7|1000")
    assert (src, dst, dgram.src_port, dgram.dst_port, dgram.payload) == (ip("192.0.2.7"), NS, 1000, 53, b"q")
    # The namespace's answer is for another address: a published answer, not a new outbound flow.
    answer = ip_reply(NS, ip("192.0.2.7"), 17, UdpDatagram(53, 1000, b"a").emit(NS, ip("192.0.2.7")))
    assert r.datagram(Flow(NS, 53, 1000, ip("192.0.2.7")), b"a", answer, T0 + 1) == []
    assert r.take_commands() == [relay.SendTo(("listen", 5353), b"a", "::ffff:192.0.2.7|1000")]
    assert r.flows == {}
    # IPv6 senders to the IPv6 address; loopback ones, without an IPv6 alias, from the stack.
    src, dst, dgram = received(r, "2001:db8::7|1001")
    assert (src, dst, dgram.src_port) == (ip("2001:db8::7"), NS6, 1001)
    src, dst, dgram = received(r, "::1|1002")
    assert (src, dst) == (US6, NS6) and dgram.src_port != 1002
    assert r.answer(NS6, 53, dgram.src_port, b"b", T0 + 1)
    assert r.take_commands() == [relay.SendTo(("listen", 5353), b"b", "::1|1002")]


def test_unpublishing_a_udp_port_ends_its_senders_with_their_records():
    r = udp_relay()
    received(r, "::ffff:192.0.2.7|1000", b"q1")
    r.datagram(Flow(NS, 53, 1000, ip("192.0.2.7")), b"answer", b"", T0 + 1)
    r.set_published([("tcp", 18000, 8000)], T0 + 2)
    assert r.take_commands() == [relay.SendTo(("listen", 5353), b"answer", "::ffff:192.0.2.7|1000"),
                                 relay.Close(("listen", 5353))]
    [record] = r.sink.log.of("relay_flow")
    assert (record["src"], record["sport"], record["dst"], record["dport"], record["published"]) == \
        ("192.0.2.7", 1000, "10.0.0.1", 53, 5353)
    assert (record["bytes_down"], record["bytes_up"], record["reason"]) == (2, 6, "unpublished")
    # Nothing is left to answer: a later answer is an ordinary datagram for another address.
    r.datagram(Flow(NS, 53, 1000, ip("192.0.2.7")), b"late", b"", T0 + 3)
    assert isinstance(r.take_commands()[0], relay.Open)


def test_a_udp_mapping_idles_out_with_its_record():
    r = udp_relay()
    received(r, "::ffff:192.0.2.7|1000")
    assert r.next_deadline() == T0 + 60.0
    r.expire(T0 + 60.0)
    assert [f["reason"] for f in r.sink.log.of("relay_flow")] == ["idle"] and not r.inbound_by_peer
