"""Attach mode's DNS forwarder, through its front door: datagrams, upstream events and time by hand.

Queries and answers are made with dnspython; the UDP side is checked on the
packets it sends, the TCP side on what a fake hosted stream receives.
"""

import collections
import struct

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import fragments
from pipeline.flow import Flow
from pipeline.wire.udp import parse_udp
from tests.unit.services.test_tcp_services import FakeStream as ServicesFakeStream
from workers.attach import dns as fwd
from workers.attach import relay
from workers.core import Sink, ip_view

US, CLIENT = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1])
US6, CLIENT6 = bytes.fromhex("fd00" + "00" * 13 + "02"), bytes.fromhex("fd00" + "00" * 13 + "01")
S1, S2 = bytes([127, 0, 0, 53]), bytes([192, 0, 2, 53])
T0 = 100.0
K1, K2 = ("dns", 1), ("dns", 2)


class Log:
    def __init__(self):
        self.records = []

    def info(self, event, **fields):
        self.records.append((event, fields))

    def debug(self, event, **fields):
        pass

    def bind(self, **fields):
        return self


class Book:
    def __init__(self):
        self.learnt = []

    def learn(self, name, addresses, ttl, now):
        self.learnt.append((name, addresses, ttl, now))


def make_sink():
    return Sink(collections.Counter(), Log(), debug=True)


def forwarder(servers=(S1, S2), timeout=2.0, mtu=1500):
    sink, book = make_sink(), Book()
    return fwd.DnsForwarder(sink, list(servers), timeout, book, mtu), sink, book


def query(name="www.example.com.", rdtype="A", qid=0x1234, **edns):
    q = dns.message.make_query(name, rdtype, **edns)
    q.id = qid
    return q


def answer_to(q, *records, rcode=dns.rcode.NOERROR):
    a = dns.message.make_response(q, recursion_available=True)
    for name, ttl, rdtype, *data in records:
        a.answer.append(dns.rrset.from_text(name, ttl, "IN", rdtype, *data))
    a.set_rcode(rcode)
    a.request_payload = 65535  # make_response limits to_wire to the query's size: we test bigger ones
    return a


CHAIN = [("www.example.com.", 300, "CNAME", "edge.example.net."),
         ("edge.example.net.", 60, "A", "192.0.2.1", "192.0.2.2"),
         ("other.example.org.", 5, "A", "198.51.100.9")]  # not on the chain: not learnt


def reply_of(out, src=US, dst=CLIENT):
    """The one datagram sent: (source port, destination port, DNS message)."""
    [(packet, _)] = out
    ip = ip_view(packet)
    assert (bytes(ip.src), bytes(ip.dst)) == (src, dst)
    udp = parse_udp(ip.payload, src, dst)
    return udp.src_port, udp.dst_port, udp.payload


def records(sink):
    return [fields for event, fields in sink.log.records if event == "dns_answer"]


# -- UDP --------------------------------------------------------------------------


def test_query_is_forwarded_as_is_and_the_answer_goes_back_recorded_and_learnt():
    f, sink, book = forwarder()
    q = query(use_edns=0, payload=1232)
    assert f.query(CLIENT, 40000, US, q.to_wire(), T0) == []
    assert f.take_commands() == [relay.Open(K1, relay.UDP, S1, 53, relayed=False), relay.Send(K1, q.to_wire())]
    assert f.owns(K1) and not f.owns(Flow(CLIENT, 40000, 53, S1)) and not f.owns(("listen", 53))
    wire = answer_to(q, *CHAIN).to_wire()
    sport, dport, payload = reply_of(f.upstream(relay.Upstream(K1, relay.DATA, wire), T0 + 0.0125))
    assert (sport, dport, payload) == (53, 40000, wire)  # the resolver's bytes, as they are
    assert f.take_commands() == [relay.Close(K1)] and not f.pending
    [record] = records(sink)
    assert sorted(record.pop("addresses")) == ["192.0.2.1", "192.0.2.2"]  # in the wire's order (shuffled)
    assert record == dict(proto="udp", src="10.0.0.1", sport=40000, name="www.example.com", type="A",
                          rcode="NOERROR", ttl=60, latency_ms=12.5, server="127.0.0.53", truncated=False)
    [(name, addresses, ttl, when)] = book.learnt
    assert (name, sorted(addresses), ttl, when) == ("www.example.com", [bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])],
                                                    60, T0 + 0.0125)
    assert (sink.counters["dns_queries"], sink.counters["dns_answers"]) == (1, 1)


def test_answers_to_another_id_or_question_or_not_answers_are_ignored():
    f, sink, _ = forwarder()
    q = query()
    f.query(CLIENT, 40000, US, q.to_wire(), T0)
    f.take_commands()
    wrong_id = answer_to(query(qid=0x4321), *CHAIN)
    wrong_question = answer_to(query(name="evil.example."), ("evil.example.", 60, "A", "203.0.113.1"))
    wrong_question.id = q.id
    for bad in (wrong_id.to_wire(), wrong_question.to_wire(), q.to_wire(), b"\x12\x34garbage"):
        assert f.upstream(relay.Upstream(K1, relay.DATA, bad), T0 + 0.1) == []
    assert sink.counters["drop_dns_bad_answer"] == 4 and f.take_commands() == [] and K1 in f.pending
    mixed_case = answer_to(query(name="WWW.Example.COM."), *CHAIN)  # names compare case-blind
    assert f.upstream(relay.Upstream(K1, relay.DATA, mixed_case.to_wire()), T0 + 0.2)


def test_a_response_sent_as_a_query_is_dropped_never_answered():
    f, sink, _ = forwarder()
    response = answer_to(query(), *CHAIN)
    assert f.query(CLIENT, 53, US, response.to_wire(), T0) == []
    assert f.take_commands() == [] and sink.counters["drop_dns_query_is_response"] == 1


def _two_questions():
    q = query()
    q.question.append(dns.rrset.RRset(dns.name.from_text("b.example."), 1, 1))
    return q.to_wire()


def _notify():
    q = query()
    q.set_opcode(dns.opcode.NOTIFY)
    return q.to_wire()


MALFORMED = {
    "empty": (b"", "dns_malformed_query"),
    "short_header": (b"\x12\x34\x01\x00\x00", "dns_malformed_query"),
    "zero_questions": (struct.pack("!6H", 0x1234, 0x0100, 0, 0, 0, 0), "dns_question_count"),
    "huge_counts": (struct.pack("!6H", 0x1234, 0x0100, 65535, 65535, 65535, 65535) + b"\x00\x00\x01\x00\x01",
                    "dns_malformed_query"),
    "trailing_junk": (query().to_wire() + b"junk", "dns_malformed_query"),
    "cut_question": (query().to_wire()[:-3], "dns_malformed_query"),
    "pointer_loop": (struct.pack("!6H", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01", "dns_malformed_query"),
    "two_questions": (_two_questions(), "dns_question_count"),
    "notify": (_notify(), "dns_not_query"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_queries_are_counted_and_unanswered(case):
    wire, reason = MALFORMED[case]
    f, sink, _ = forwarder()
    assert f.query(CLIENT, 40000, US, wire, T0) == []
    assert f.take_commands() == [] and sink.counters["drop_" + reason] == 1 and sink.counters["dns_queries"] == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise_from_a_client_or_a_resolver(data):
    f, sink, _ = forwarder()
    f.query(CLIENT, 40000, US, data, T0)
    f.query(CLIENT, 40001, US, query().to_wire(), T0)
    for key in list(f.pending):
        f.upstream(relay.Upstream(key, relay.DATA, data), T0 + 0.1)
    assert sum(n for name, n in sink.counters.items() if name.startswith("drop_dns")) >= 1


def big_answer(q, count=100):
    return answer_to(q, ("www.example.com.", 60, "A", *(f"192.0.2.{i}" for i in range(1, count + 1))))


@pytest.mark.parametrize("edns", [{}, {"use_edns": 0, "payload": 1232}])
def test_an_answer_too_big_for_the_client_goes_out_truncated(edns):
    f, sink, book = forwarder()
    q = query(**edns)
    f.query(CLIENT, 40000, US, q.to_wire(), T0)
    f.take_commands()
    full = big_answer(q, count=40 if not edns else 100)  # 40 A records: 700 bytes; 100: 1650 bytes
    _, _, payload = reply_of(f.upstream(relay.Upstream(K1, relay.DATA, full.to_wire()), T0 + 0.1))
    short = dns.message.from_wire(payload)
    assert short.flags & dns.flags.TC and short.flags & dns.flags.QR and short.id == q.id
    assert short.question == q.question and not short.answer
    assert short.edns == (0 if edns else -1)  # OPT only if the client used EDNS (RFC 6891 §7)
    assert len(payload) <= 512 and sink.counters["dns_truncated"] == 1
    assert records(sink)[0]["truncated"] is True and book.learnt  # the resolver's answer was real


def test_an_answer_within_the_edns_size_but_over_the_mtu_goes_out_fragmented():
    f, _, _ = forwarder(mtu=576)
    q = query(use_edns=0, payload=4096)
    f.query(CLIENT, 40000, US, q.to_wire(), T0)
    f.take_commands()
    wire = big_answer(q).to_wire()
    out = f.upstream(relay.Upstream(K1, relay.DATA, wire), T0 + 0.1)
    assert len(out) == 3 and all(len(p) <= 576 for p, _ in out)
    reassembler = fragments.Reassembler()
    whole = [w for w in (reassembler.add_ipv4(p, T0) for p, _ in out) if w is not None]
    assert reply_of([(whole[0], None)])[2] == wire


def test_refused_moves_on_to_the_next_server():
    f, sink, _ = forwarder()
    q = query()
    f.query(CLIENT, 40000, US, q.to_wire(), T0)
    f.take_commands()
    assert f.upstream(relay.Upstream(K1, relay.REFUSED), T0 + 0.01) == []
    assert f.take_commands() == [relay.Close(K1), relay.Open(K2, relay.UDP, S2, 53, relayed=False),
                                 relay.Send(K2, q.to_wire())]
    assert f.upstream(relay.Upstream(K1, relay.DATA, answer_to(q).to_wire()), T0 + 0.02) == []  # released
    reply_of(f.upstream(relay.Upstream(K2, relay.DATA, answer_to(q, *CHAIN).to_wire()), T0 + 0.03))
    assert records(sink)[0]["server"] == "192.0.2.53" and sink.counters["dns_upstream_refused"] == 1


def test_silent_servers_get_their_share_of_the_timeout_then_servfail_within_it():
    f, sink, book = forwarder(timeout=2.0)
    q = query(use_edns=0, payload=1232)
    f.query(CLIENT, 40000, US, q.to_wire(), T0)
    f.take_commands()
    assert f.next_deadline() == T0 + 1.0
    assert f.expire(T0 + 0.999) == [] and f.take_commands() == []
    assert f.expire(T0 + 1.0) == []
    assert f.take_commands() == [relay.Close(K1), relay.Open(K2, relay.UDP, S2, 53, relayed=False),
                                 relay.Send(K2, q.to_wire())]
    assert f.next_deadline() == T0 + 2.0
    _, _, payload = reply_of(f.expire(T0 + 2.0))
    fail = dns.message.from_wire(payload)
    assert fail.rcode() == dns.rcode.SERVFAIL and fail.id == q.id and fail.question == q.question
    assert fail.flags & dns.flags.RA and fail.flags & dns.flags.QR and fail.edns == 0
    assert f.take_commands() == [relay.Close(K2)] and f.next_deadline() is None
    assert records(sink)[0] | {"latency_ms": None} == dict(
        proto="udp", src="10.0.0.1", sport=40000, name="www.example.com", type="A", rcode="SERVFAIL", addresses=[],
        ttl=None, latency_ms=None, server=None, truncated=False)
    assert sink.counters["dns_servfail"] == 1 and sink.counters["dns_upstream_timeout"] == 2 and not book.learnt


def test_no_servers_is_servfail_at_once():
    f, sink, _ = forwarder(servers=())
    _, _, payload = reply_of(f.query(CLIENT, 40000, US, query().to_wire(), T0))
    assert dns.message.from_wire(payload).rcode() == dns.rcode.SERVFAIL and f.take_commands() == []


def test_every_server_refusing_is_servfail():
    f, _, _ = forwarder()
    f.query(CLIENT, 40000, US, query().to_wire(), T0)
    f.upstream(relay.Upstream(K1, relay.REFUSED), T0)
    _, _, payload = reply_of(f.upstream(relay.Upstream(K2, relay.UNREACHABLE, detail="host"), T0))
    assert dns.message.from_wire(payload).rcode() == dns.rcode.SERVFAIL
    assert f.take_commands()[-1] == relay.Close(K2) and not f.pending


def test_queries_in_flight_are_bounded():
    f, sink, _ = forwarder()
    wire = query().to_wire()
    for port in range(fwd.MAX_PENDING):
        f.query(CLIENT, 1024 + port, US, wire, T0)
    assert f.query(CLIENT, 9, US, wire, T0) == [] and len(f.pending) == fwd.MAX_PENDING
    assert sink.counters["drop_dns_pending_full"] == 1


def test_ipv6_client_is_answered_from_our_ipv6_address():
    f, sink, book = forwarder()
    q = query(rdtype="AAAA")
    f.query(CLIENT6, 40000, US6, q.to_wire(), T0)
    f.take_commands()
    a = answer_to(q, ("www.example.com.", 30, "AAAA", "2001:db8::1"))
    assert reply_of(f.upstream(relay.Upstream(K1, relay.DATA, a.to_wire()), T0 + 0.1), US6, CLIENT6)[:2] == (53, 40000)
    assert records(sink)[0]["src"] == "fd00::1" and records(sink)[0]["type"] == "AAAA"
    assert book.learnt == [("www.example.com", [bytes.fromhex("20010db8" + "00" * 11 + "01")], 30, T0 + 0.1)]


def test_a_cname_chain_in_any_order_is_followed_in_linear_time():
    f, sink, book = forwarder()
    q = query(name="n0.example.", use_edns=0, payload=65535)
    links = [(f"n{i}.example.", 100 + i, "CNAME", f"n{i + 1}.example.") for i in range(2000)]
    a = answer_to(q, *reversed(links), ("n2000.example.", 7, "A", "192.0.2.7"), ("n0.example.", 9, "TXT", "x"))
    f.query(CLIENT, 40000, US, q.to_wire(), T0)
    assert f.upstream(relay.Upstream(K1, relay.DATA, a.to_wire()), T0)  # fragments
    assert book.learnt == [("n0.example", [bytes([192, 0, 2, 7])], 7, T0)]


def test_a_tsig_signed_query_is_forwarded_for_the_resolver_to_check():
    import dns.tsigkeyring
    f, _, _ = forwarder()
    q = query()
    q.use_tsig(dns.tsigkeyring.from_text({"k.": "AAAAAAAAAAAAAAAAAAAAAA=="}), keyname="k.")
    f.query(CLIENT, 40000, US, q.to_wire(), T0)
    assert f.take_commands()[1] == relay.Send(K1, q.to_wire())


def test_nxdomain_is_forwarded_and_learns_nothing():
    f, sink, book = forwarder()
    q = query()
    f.query(CLIENT, 40000, US, q.to_wire(), T0)
    reply_of(f.upstream(relay.Upstream(K1, relay.DATA, answer_to(q, rcode=dns.rcode.NXDOMAIN).to_wire()), T0))
    assert records(sink)[0]["rcode"] == "NXDOMAIN" and not book.learnt


def test_closing_answers_what_is_pending_and_releases_the_sockets():
    f, _, _ = forwarder()
    f.query(CLIENT, 40000, US, query().to_wire(), T0)
    f.take_commands()
    _, _, payload = reply_of(f.close(T0 + 0.5))
    assert dns.message.from_wire(payload).rcode() == dns.rcode.SERVFAIL
    assert f.take_commands() == [relay.Close(K1)] and not f.pending


# -- TCP --------------------------------------------------------------------------

FLOW = Flow(CLIENT, 40000, 53, b"")


class FakeStream(ServicesFakeStream):
    """The services tests' fake stream, plus what a hosted stream adds."""

    def __init__(self, room=1 << 30):
        super().__init__(room)
        self.flow = FLOW
        self.now = T0
        self.deadline = None
        self.aborted = False
        self.remote, self.remote_port = "10.0.0.1", 40000

    def set_timer(self, deadline):
        self.deadline = deadline

    def abort(self):
        self.aborted = True

    def take(self):
        out, self.sent = self.sent, b""
        return out


def framed(wire):
    return struct.pack("!H", len(wire)) + wire


def unframe(data):
    out = []
    while data:
        (n,) = struct.unpack_from("!H", data)
        out.append(data[2:2 + n])
        data = data[2 + n:]
    return out


def service(servers=(S1, S2), timeout=2.0, room=1 << 30):
    stream, sink, book, commands = FakeStream(room), make_sink(), Book(), []
    svc = fwd.DnsTcpService(stream, commands.append, sink, list(servers), timeout, book)
    return svc, stream, sink, book, commands


def feed(svc, stream, data):
    stream.inbox += data
    svc.on_readable()


def connected(svc, commands):
    svc.on_upstream(relay.Upstream(FLOW, relay.CONNECTED), T0)
    commands.clear()


def test_tcp_framed_query_opens_upstream_and_is_sent_once_connected():
    svc, stream, _, _, commands = service()
    q = framed(query().to_wire())
    for i in range(len(q)):  # one byte at a time
        feed(svc, stream, q[i:i + 1])
    assert commands == [relay.Open(FLOW, relay.TCP, S1, 53, relayed=False)]
    assert stream.deadline == T0 + 1.0  # the connect gets its share of the timeout
    svc.on_upstream(relay.Upstream(FLOW, relay.CONNECTED), T0 + 0.01)
    assert commands[1:] == [relay.Pause(FLOW, False), relay.Send(FLOW, q)]
    assert stream.deadline == T0 + 2.0


def test_tcp_answer_split_across_reads_reaches_the_client_framed():
    svc, stream, sink, book, commands = service()
    q = query()
    feed(svc, stream, framed(q.to_wire()))
    connected(svc, commands)
    answer = framed(answer_to(q, *CHAIN).to_wire())
    for piece in (answer[:1], answer[1:7], answer[7:-1], answer[-1:]):
        svc.on_upstream(relay.Upstream(FLOW, relay.DATA, piece), T0 + 0.02)
    assert stream.take() == answer and not svc.asked and stream.deadline is None
    [record] = records(sink)
    assert record["proto"] == "tcp" and record["sport"] == 40000 and record["server"] == "127.0.0.53"
    name, addresses, ttl, _ = book.learnt[0]
    assert (name, sorted(addresses), ttl) == ("www.example.com", [bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])], 60)
    svc.on_eof()
    assert stream.closed and commands == [relay.Close(FLOW)]


def test_tcp_pipelined_queries_answered_out_of_order_and_strays_dropped():
    svc, stream, sink, _, commands = service()
    q1, q2 = query(qid=1), query(name="b.example.", qid=2)
    feed(svc, stream, framed(q1.to_wire()) + framed(q2.to_wire()))
    svc.on_upstream(relay.Upstream(FLOW, relay.CONNECTED), T0)
    assert commands[-2:] == [relay.Send(FLOW, framed(q1.to_wire())), relay.Send(FLOW, framed(q2.to_wire()))]
    stray = framed(answer_to(query(qid=3)).to_wire())
    a2, a1 = framed(answer_to(q2).to_wire()), framed(answer_to(q1, *CHAIN).to_wire())
    svc.on_upstream(relay.Upstream(FLOW, relay.DATA, a2 + stray + a1[:5]), T0 + 0.1)
    svc.on_eof()  # the client has finished asking, but an answer is still awaited
    assert not stream.closed
    svc.on_upstream(relay.Upstream(FLOW, relay.DATA, a1[5:]), T0 + 0.2)
    assert stream.take() == a2 + a1 and sink.counters["drop_dns_bad_answer"] == 1 and stream.closed


def test_tcp_unanswered_query_is_servfail_after_the_timeout():
    svc, stream, sink, _, commands = service()
    q = query()
    feed(svc, stream, framed(q.to_wire()))
    connected(svc, commands)
    stream.now = T0 + 2.0
    svc.on_timer()
    [fail] = unframe(stream.take())
    msg = dns.message.from_wire(fail)
    assert msg.rcode() == dns.rcode.SERVFAIL and msg.id == q.id and msg.question == q.question
    assert records(sink)[0]["server"] is None and stream.deadline is None
    svc.on_upstream(relay.Upstream(FLOW, relay.DATA, framed(answer_to(q).to_wire())), T0 + 3)  # too late
    assert stream.take() == b"" and sink.counters["drop_dns_bad_answer"] == 1


def test_tcp_connect_refused_or_hanging_moves_on_then_servfail():
    svc, stream, sink, _, commands = service()
    feed(svc, stream, framed(query().to_wire()))
    svc.on_upstream(relay.Upstream(FLOW, relay.REFUSED), T0 + 0.01)
    assert commands[-1] == relay.Open(FLOW, relay.TCP, S2, 53, relayed=False)
    assert stream.deadline == T0 + 0.01 + 1.0
    stream.now = T0 + 1.01
    svc.on_timer()  # the second server's connect hangs: given up, and no server is left
    assert commands[-1] == relay.Close(FLOW, reset=True)
    assert dns.message.from_wire(unframe(stream.take())[0]).rcode() == dns.rcode.SERVFAIL
    assert svc.server == 0 and svc.upstream == fwd.IDLE


@pytest.mark.parametrize("kind", [relay.EOF, relay.RESET])
def test_tcp_upstream_ending_fails_what_is_pending_and_a_new_query_reopens(kind):
    svc, stream, sink, _, commands = service()
    feed(svc, stream, framed(query().to_wire()))
    connected(svc, commands)
    svc.on_upstream(relay.Upstream(FLOW, kind), T0 + 0.1)
    assert dns.message.from_wire(unframe(stream.take())[0]).rcode() == dns.rcode.SERVFAIL
    assert commands == ([relay.Close(FLOW)] if kind == relay.EOF else [])  # after a reset the shell closed it
    feed(svc, stream, framed(query(qid=7).to_wire()))
    assert commands[-1] == relay.Open(FLOW, relay.TCP, S1, 53, relayed=False)


def test_tcp_client_gone_resets_the_upstream():
    svc, stream, _, _, commands = service()
    feed(svc, stream, framed(query().to_wire()))
    connected(svc, commands)
    svc.on_closed()
    assert commands == [relay.Close(FLOW, reset=True)] and not svc.asked
    svc.on_upstream(relay.Upstream(FLOW, relay.DATA, b"\x00"), T0)  # late: ignored
    assert commands == [relay.Close(FLOW, reset=True)]


def test_tcp_broken_framing_aborts_the_connection():
    svc, stream, sink, _, commands = service()
    feed(svc, stream, framed(query().to_wire()))
    connected(svc, commands)
    feed(svc, stream, b"\x00\x03abc")
    assert stream.aborted and sink.counters["drop_dns_tcp_bad_length"] == 1
    assert commands == [relay.Close(FLOW, reset=True)]


def test_tcp_malformed_message_is_dropped_and_the_next_one_served():
    svc, stream, sink, _, commands = service()
    feed(svc, stream, framed(b"\xff" * 20) + framed(answer_to(query()).to_wire()) + framed(query().to_wire()))
    assert sink.counters["drop_dns_malformed_query"] == 1 and sink.counters["drop_dns_query_is_response"] == 1
    assert len(svc.asked) == 1 and commands[0].proto == relay.TCP


def test_tcp_answers_wait_for_room_and_reading_waits_for_them():
    svc, stream, _, _, commands = service(room=10)
    q = query()
    feed(svc, stream, framed(q.to_wire()))
    connected(svc, commands)
    answer = framed(answer_to(q, *CHAIN).to_wire())
    svc.on_upstream(relay.Upstream(FLOW, relay.DATA, answer), T0)
    assert stream.sent == answer[:10] and svc.pending == answer[10:]
    nxt = framed(query(qid=9).to_wire())
    feed(svc, stream, nxt)
    assert stream.inbox == nxt  # not read while an answer is held: the window closes
    stream.room = 1 << 20
    svc.on_writable()
    assert stream.sent == answer and stream.inbox == b"" and commands[-1] == relay.Send(FLOW, nxt)


def test_tcp_queries_in_flight_are_bounded_per_connection():
    svc, stream, _, _, _ = service()
    wire = b"".join(framed(query(qid=i).to_wire()) for i in range(fwd.MAX_PENDING_TCP + 3))
    feed(svc, stream, wire)
    assert len(svc.asked) == fwd.MAX_PENDING_TCP and stream.readable == 3 * len(framed(query().to_wire()))


def test_tcp_no_servers_is_servfail_at_once():
    svc, stream, _, _, commands = service(servers=())
    feed(svc, stream, framed(query().to_wire()))
    assert dns.message.from_wire(unframe(stream.take())[0]).rcode() == dns.rcode.SERVFAIL and commands == []


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_tcp_random_bytes_never_raise(client, upstream):
    svc, stream, _, _, commands = service()
    feed(svc, stream, framed(query().to_wire()) + client)
    svc.on_upstream(relay.Upstream(FLOW, relay.CONNECTED), T0)
    svc.on_upstream(relay.Upstream(FLOW, relay.DATA, upstream), T0)
    svc.on_eof()
