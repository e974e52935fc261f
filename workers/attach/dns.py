"""Attach mode's DNS forwarder: queries to the stack's own address, answered by the real resolvers.

Contract (sans-IO, ``workers.attach.relay``): a DNS query sent to the stack's
address (port 53, UDP or TCP) is forwarded, as the client's bytes with its ID
and EDNS, to the resolvers of the namespace where the stack runs (``servers``,
packed; a loopback stub such as 127.0.0.53 too). The forwarder is the stack's
own client, not a relayed flow: it opens its sockets with ``relayed=False``.
Bytes and the time in; packets and relay commands out; what a client or a
resolver sends never makes it raise.

* One checked parse per message (dnspython). A query that does not parse,
  has QR set (an answer is never answered: no loops), an opcode other than
  QUERY or not one question is dropped, counted (RFC 1035 §4.1.1-4.1.2).
  An answer counts only with QR, the query's ID and its question
  (RFC 1035 §7.3); any other is dropped, counted, and the wait goes on.
* UDP: one connected socket per query and server tried (key ``("dns", n)``).
  A refused, unreachable, or for ``timeout / len(servers)`` silent server
  hands the query to the next; none left or ``timeout`` passed: SERVFAIL
  (RFC 1035 §4.1.1, rcode 2), so every query is answered in bounded time.
  At most MAX_PENDING in flight. An answer over what the client takes (512,
  or its EDNS size: RFC 1035 §4.2.1, RFC 6891 §6.2.5) goes as header and
  question with TC set, and OPT if the client sent one: it retries over TCP
  (RFC 7766 §5). Datagrams over the MTU are fragmented (RFC 791 §3.2).
* TCP (RFC 7766; RFC 1035 §4.2.2: a two-byte length before each message):
  a ``DnsTcpService`` per client connection, one upstream connection (key:
  the client's flow) to the first server that takes it, queries pipelined,
  answers matched in any order (RFC 7766 §6.2.1.1, §7). SERVFAIL after
  ``timeout``, or when the upstream ends or resets. Beyond MAX_PENDING_TCP in
  flight, or while an answer waits for room, the client is not read.
* Each answer sent: one ``dns_answer`` record; its A/AAAA addresses (through
  the CNAME chain, RFC 1034 §3.6.2) go to the ``NameBook`` under the
  question's name, lower case, without the final dot.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME

from pipeline.wire.addr import fmt_addr
from pipeline.wire.ipv4 import PROTO_UDP
from pipeline.wire.udp import UdpDatagram
from workers.attach import relay
from workers.core import Outgoing, Sink, fit_mtu, ip_reply
from workers.services.hosting import HostedStream
from workers.services.tcp import Service

PORT = 53
MAX_PENDING = 1024       # UDP queries in flight per forwarder; beyond, dropped (counted)
MAX_PENDING_TCP = 64     # queries in flight per TCP connection; beyond, the connection is not read
CLASSIC_UDP_SIZE = 512   # RFC 1035 §4.2.1: what a client without EDNS takes
OUR_PAYLOAD = 1232       # the EDNS payload size our own answers advertise (RFC 6891 §6.2.3)
HEADER_LEN = 12          # RFC 1035 §4.1.1: a framed message shorter than this is not DNS
_LENGTH = struct.Struct("!H")  # RFC 1035 §4.2.2: the length before each message over TCP
_PARSE_ERRORS = (dns.exception.DNSException, ValueError, LookupError, TypeError, struct.error)


class NameBook(Protocol):
    def learn(self, name: str, addresses: list[bytes], ttl: int, now: float) -> None:
        """``name`` (lower case, no final dot) has ``addresses`` (packed) for ``ttl`` seconds from ``now``."""


# -- what UDP and TCP share: the checks, the answers we make, the record -----------


def parse_query(sink: Sink, wire: bytes) -> dns.message.Message | None:
    """The query in ``wire`` if it is one to forward; else None, counted (RFC 1035 §4.1.1-4.1.2)."""
    try:
        msg = dns.message.from_wire(wire, keyring=False)  # TSIG is checked by the resolver, not here
    except _PARSE_ERRORS:
        sink.drop("dns_malformed_query")
        return None
    if msg.flags & dns.flags.QR:
        sink.drop("dns_query_is_response")  # never answer an answer: no loops
    elif msg.opcode() != dns.opcode.QUERY:
        sink.drop("dns_not_query")
    elif len(msg.question) != 1:
        sink.drop("dns_question_count")
    else:
        return msg
    return None


def parse_answer(wire: bytes) -> dns.message.Message | None:
    """The response in ``wire``, or None if it does not parse or is not a response."""
    try:
        msg = dns.message.from_wire(wire, keyring=False)
    except _PARSE_ERRORS:
        return None
    return msg if msg.flags & dns.flags.QR else None


def matches(query: dns.message.Message, answer: dns.message.Message) -> bool:
    """The answer is to this query: same ID, same question (RFC 1035 §7.3; names compare case-blind)."""
    return answer.id == query.id and answer.question == query.question


def servfail(query: dns.message.Message) -> dns.message.Message:
    """SERVFAIL (RFC 1035 §4.1.1, rcode 2): the client's ID and question, RA set; OPT if it sent one."""
    answer = dns.message.make_response(query, recursion_available=True, our_payload=OUR_PAYLOAD)
    answer.set_rcode(dns.rcode.SERVFAIL)
    return answer


def truncated(query: dns.message.Message, answer: dns.message.Message) -> bytes:
    """``answer`` cut to its header and question with TC set (RFC 1035 §4.2.1, RFC 7766 §5);
    an OPT record only if the client sent one (RFC 6891 §7)."""
    short = dns.message.make_response(query, our_payload=OUR_PAYLOAD)
    short.flags = answer.flags | dns.flags.TC
    short.set_rcode(answer.rcode())
    return short.to_wire()


def addresses_of(answer: dns.message.Message, qname: dns.name.Name) -> tuple[list[bytes], int | None]:
    """The A/AAAA addresses answering ``qname`` through its CNAME chain (RFC 1034 §3.6.2), and their least TTL."""
    aliases: dict[dns.name.Name, list[dns.name.Name]] = {}
    for rrset in answer.answer:
        if rrset.rdtype == dns.rdatatype.CNAME:
            aliases.setdefault(rrset.name, []).extend(cast(dns.rdtypes.ANY.CNAME.CNAME, rd).target for rd in rrset)
    names, todo = {qname}, [qname]
    while todo:  # each name once: linear in the section, whatever order the chain comes in
        for target in aliases.get(todo.pop(), ()):
            if target not in names:
                names.add(target)
                todo.append(target)
    found = [rrset for rrset in answer.answer if rrset.rdclass == dns.rdataclass.IN and rrset.name in names
             and rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)]
    addresses = [ipaddress.ip_address(rd.to_text()).packed for rrset in found for rd in rrset]
    return addresses, min((rrset.ttl for rrset in found), default=None)


def answered(sink: Sink, names: NameBook | None, proto: str, src: bytes, sport: int,
             query: dns.message.Message, answer: dns.message.Message, server: bytes | None,
             started: float, now: float, cut: bool = False) -> None:
    """One answer sent to a client: counted, its one ``dns_answer`` record, its addresses learnt."""
    question = query.question[0]
    name = question.name.to_text(omit_final_dot=True).lower()
    rcode = answer.rcode()
    addresses, ttl = addresses_of(answer, question.name)
    sink.counters["dns_answers"] += 1
    if rcode == dns.rcode.SERVFAIL:
        sink.counters["dns_servfail"] += 1
    if cut:
        sink.counters["dns_truncated"] += 1
    sink.log.info("dns_answer", proto=proto, src=fmt_addr(src), sport=sport, name=name,
                  type=dns.rdatatype.to_text(question.rdtype), rcode=dns.rcode.to_text(rcode),
                  addresses=[fmt_addr(a) for a in addresses], ttl=ttl, latency_ms=round((now - started) * 1000, 3),
                  server=None if server is None else fmt_addr(server),
                  truncated=cut or bool(answer.flags & dns.flags.TC))  # what the client got: ours or the server's cut
    if names is not None and addresses and ttl is not None and rcode == dns.rcode.NOERROR:
        names.learn(name, addresses, ttl, now)


# -- UDP ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Query:
    """One client's UDP query in flight."""

    src: bytes
    sport: int
    local: bytes             # the stack's address the client asked: the answer's source
    wire: bytes              # the client's bytes, forwarded as they are
    msg: dns.message.Message
    started: float
    server: int = 0          # index of the server being asked
    deadline: float = 0.0    # when that server is given up on


class DnsForwarder:
    """UDP queries to the stack's port 53; the same front door as the datagram relays (``relay.DatagramRelay``)."""

    def __init__(self, sink: Sink, servers: list[bytes], timeout: float, names: NameBook | None,
                 mtu: int) -> None:
        self.sink = sink
        self.servers = list(servers)
        self.timeout = timeout
        self.per_try = timeout / max(1, len(self.servers))
        self.names = names
        self.mtu = mtu
        self.pending: dict[Hashable, _Query] = {}
        self.commands: list[relay.Command] = []
        self._opened = 0  # upstream sockets opened so far: each one's key
        self._ident = 0   # IPv4 Identification / IPv6 fragment id of the answers we fragment

    @staticmethod
    def owns(key: Hashable) -> bool:
        """The upstream key is one of ours (``("dns", n)``), not a relayed flow's."""
        return type(key) is tuple and len(key) == 2 and key[0] == "dns"

    def query(self, src: bytes, sport: int, local: bytes, payload: bytes, now: float) -> list[Outgoing]:
        """A datagram from ``src``:``sport`` to ``local`` port 53: forward it, or answer SERVFAIL."""
        wire = bytes(payload)
        msg = parse_query(self.sink, wire)
        if msg is None:
            return []
        if len(self.pending) >= MAX_PENDING:
            self.sink.drop("dns_pending_full", src=fmt_addr(src), sport=sport)
            return []
        self.sink.counters["dns_queries"] += 1
        return self._ask(_Query(src, sport, local, wire, msg, now), 0, now)

    def _ask(self, q: _Query, server: int, now: float) -> list[Outgoing]:
        """Ask ``servers[server]`` on a socket of its own; SERVFAIL once none is left or time is up."""
        if server >= len(self.servers) or now >= q.started + self.timeout:
            return self._reply(q, servfail(q.msg), None, now)
        self._opened += 1
        key = ("dns", self._opened)
        q.server, q.deadline = server, min(now + self.per_try, q.started + self.timeout)
        self.pending[key] = q
        self.commands += [relay.Open(key, relay.UDP, self.servers[server], PORT, relayed=False),
                          relay.Send(key, q.wire)]
        return []

    def upstream(self, ev: relay.Upstream, now: float) -> list[Outgoing]:
        q = self.pending.get(ev.key)
        if q is None:
            return []  # a socket already given up on
        if ev.kind == relay.DATA:
            answer = parse_answer(ev.data)
            if answer is None or not matches(q.msg, answer):
                self.sink.drop("dns_bad_answer", server=fmt_addr(self.servers[q.server]))
                return []  # keep waiting: the real answer may still come
            self._release(ev.key)
            return self._reply(q, answer, self.servers[q.server], now, ev.data)
        if ev.kind in (relay.REFUSED, relay.UNREACHABLE, relay.TIMED_OUT):
            self.sink.counters["dns_upstream_" + ev.kind] += 1
            self._release(ev.key)
            return self._ask(q, q.server + 1, now)
        return []

    def expire(self, now: float) -> list[Outgoing]:
        """Servers silent past their try: the next one, or SERVFAIL."""
        out: list[Outgoing] = []
        for key, q in [(k, q) for k, q in self.pending.items() if q.deadline <= now]:
            self.sink.counters["dns_upstream_timeout"] += 1
            self._release(key)
            out += self._ask(q, q.server + 1, now)
        return out

    def next_deadline(self) -> float | None:
        return min((q.deadline for q in self.pending.values()), default=None)

    def close(self, now: float) -> list[Outgoing]:
        """Shutting down: every socket released, every pending client answered SERVFAIL."""
        out: list[Outgoing] = []
        for key, q in list(self.pending.items()):
            self._release(key)
            out += self._reply(q, servfail(q.msg), None, now)
        return out

    def take_commands(self) -> list[relay.Command]:
        commands, self.commands = self.commands, []
        return commands

    def _release(self, key: Hashable) -> None:
        del self.pending[key]
        self.commands.append(relay.Close(key))

    def _reply(self, q: _Query, answer: dns.message.Message, server: bytes | None, now: float,
               wire: bytes | None = None) -> list[Outgoing]:
        """The answer to the client from ``q.local``:53, truncated to what the client takes."""
        if wire is None:
            wire = answer.to_wire()
        limit = max(CLASSIC_UDP_SIZE, q.msg.payload) if q.msg.edns >= 0 else CLASSIC_UDP_SIZE  # RFC 6891 §6.2.5
        cut = len(wire) > limit
        if cut:
            wire = truncated(q.msg, answer)
        answered(self.sink, self.names, "udp", q.src, q.sport, q.msg, answer, server, q.started, now, cut)
        udp = UdpDatagram(PORT, q.sport, wire).emit(q.local, q.src)
        self._ident = (self._ident + 1) & 0xFFFFFFFF
        packet = ip_reply(q.local, q.src, PROTO_UDP, udp, dont_fragment=False, ident=self._ident & 0xFFFF)
        return [(piece, None) for piece in fit_mtu(packet, self.mtu, self._ident) or []]


# -- TCP ---------------------------------------------------------------------------

IDLE, CONNECTING, OPEN = "idle", "connecting", "open"  # the upstream connection


@dataclass(slots=True)
class _Asked:
    """One query of a TCP connection in flight."""

    msg: dns.message.Message
    frame: bytes  # length and message, as the client sent them
    started: float


class DnsTcpService(Service):
    """One client's DNS-over-TCP connection to port 53, forwarded on one upstream TCP connection.

    ``issue`` queues a relay command for the shell; the upstream's events come
    back through ``on_upstream``, keyed by the client's flow (``stream.flow``).
    """

    stream: HostedStream

    def __init__(self, stream: HostedStream, issue: Callable[[relay.Command], None], sink: Sink,
                 servers: list[bytes], timeout: float, names: NameBook | None) -> None:
        super().__init__(stream)
        self.key = stream.flow
        self.issue = issue
        self.sink = sink
        self.servers = list(servers)
        self.timeout = timeout
        self.per_try = timeout / max(1, len(self.servers))  # for a connect that hangs
        self.names = names
        self.asked: list[_Asked] = []
        self.inbox = b""        # the client's next message, short of its end
        self.upbox = b""        # the upstream's bytes, short of a whole answer
        self.upstream = IDLE
        self.server = 0         # the server asked (or to ask next)
        self.connect_deadline: float | None = None

    # -- the client's side --------------------------------------------------------

    def on_readable(self) -> None:
        """Read one framed query at a time, while answers go out and the limit allows."""
        while not self.pending and len(self.asked) < MAX_PENDING_TCP and not self.closed:
            want = 2 if len(self.inbox) < 2 else 2 + _LENGTH.unpack_from(self.inbox)[0]
            data = self.stream.recv(want - len(self.inbox))
            if not data:
                break
            self.inbox += data
            if len(self.inbox) == 2 and _LENGTH.unpack_from(self.inbox)[0] < HEADER_LEN:
                self._broken()
                return
            if len(self.inbox) == want > 2:
                frame, self.inbox = self.inbox, b""
                self._query(frame, self.stream.now)
        self._maybe_finish()

    def _query(self, frame: bytes, now: float) -> None:
        msg = parse_query(self.sink, frame[2:])
        if msg is None:
            return
        self.sink.counters["dns_queries"] += 1
        asked = _Asked(msg, frame, now)
        if not self.servers:
            self._answer(asked, servfail(msg), None, now)
            return
        self.asked.append(asked)
        if self.upstream == IDLE:
            self._connect(now)
        elif self.upstream == OPEN:
            self.issue(relay.Send(self.key, frame))
        self._arm()

    def _broken(self) -> None:
        """A length no DNS message has: the framing is lost, so is the connection."""
        self.sink.drop("dns_tcp_bad_length", src=self.stream.remote, sport=self.stream.remote_port)
        self.closed = True
        self._release(reset=True)
        self.stream.abort()

    def _maybe_finish(self) -> None:
        """Close once the client has finished, nothing is awaited and every answer is out (RFC 7766 §6.2.4)."""
        if self.eof and not self.closed and not self.asked and not self.pending and not self.stream.readable:
            if self.inbox:
                self.sink.drop("dns_tcp_partial_query", src=self.stream.remote, sport=self.stream.remote_port)
            self.closed = True
            self._release(reset=False)
            self.stream.close()

    def on_timer(self) -> None:
        now = self.stream.now
        if self.upstream == CONNECTING and self.connect_deadline is not None and self.connect_deadline <= now:
            self.sink.counters["dns_upstream_timeout"] += 1
            self._release(reset=True)
            self._next_server(now)
        for asked in [a for a in self.asked if a.started + self.timeout <= now]:
            self.sink.counters["dns_upstream_timeout"] += 1
            self.asked.remove(asked)
            self._answer(asked, servfail(asked.msg), None, now)
        self._arm()
        self._maybe_finish()

    def on_closed(self) -> None:
        """The client's connection is gone: so is the upstream one (reset if still there)."""
        self.asked.clear()
        self._release(reset=True)

    # -- the upstream's side ------------------------------------------------------

    def on_upstream(self, ev: relay.Upstream, now: float) -> None:
        kind = ev.kind
        if self.upstream == IDLE:
            return  # a socket already released
        if kind == relay.CONNECTED:
            self.upstream, self.connect_deadline = OPEN, None
            self.issue(relay.Pause(self.key, False))  # upstream TCP sockets start paused
            for asked in self.asked:
                self.issue(relay.Send(self.key, asked.frame))
        elif kind in (relay.REFUSED, relay.UNREACHABLE, relay.TIMED_OUT):  # the shell released the socket
            self.sink.counters["dns_upstream_" + kind] += 1
            self.upstream = IDLE
            self._next_server(now)
        elif kind == relay.DATA:
            self._answers(ev.data, now)
        elif kind in (relay.EOF, relay.RESET):
            self.sink.counters["dns_upstream_" + kind] += 1
            if kind == relay.EOF:
                self.issue(relay.Close(self.key))
            self.upstream, self.upbox = IDLE, b""
            self._fail_all(now)
        self._arm()
        self._maybe_finish()

    def _answers(self, data: bytes, now: float) -> None:
        """Split the upstream's bytes into messages; each one matching a query goes to the client."""
        buf, at = self.upbox + data, 0
        while len(buf) - at >= 2:
            end = at + 2 + _LENGTH.unpack_from(buf, at)[0]
            if end > len(buf):
                break
            answer = parse_answer(buf[at + 2:end])
            asked = None if answer is None else next((a for a in self.asked if matches(a.msg, answer)), None)
            if answer is None or asked is None:
                self.sink.drop("dns_bad_answer", server=fmt_addr(self.servers[self.server]))
            else:
                self.asked.remove(asked)
                self._answer(asked, answer, self.servers[self.server], now, buf[at:end])
            at = end
        self.upbox = buf[at:]

    def _answer(self, asked: _Asked, answer: dns.message.Message, server: bytes | None, now: float,
                frame: bytes | None = None) -> None:
        answered(self.sink, self.names, "tcp", self.key.remote, self.key.rport, asked.msg, answer, server,
                 asked.started, now)
        if frame is None:
            wire = answer.to_wire()
            frame = _LENGTH.pack(len(wire)) + wire
        self.write(frame)

    def _connect(self, now: float) -> None:
        self.upstream, self.connect_deadline = CONNECTING, now + self.per_try
        self.issue(relay.Open(self.key, relay.TCP, self.servers[self.server], PORT, relayed=False))

    def _next_server(self, now: float) -> None:
        """The server did not take the connection: the next one, or SERVFAIL for what is pending."""
        self.server += 1
        if self.server < len(self.servers) and self.asked:
            self._connect(now)
            return
        self.server = 0  # later queries start over
        self._fail_all(now)

    def _fail_all(self, now: float) -> None:
        asked, self.asked = self.asked, []
        for a in asked:
            self._answer(a, servfail(a.msg), None, now)

    def _release(self, reset: bool) -> None:
        if self.upstream != IDLE:
            self.issue(relay.Close(self.key, reset=reset))
            self.upstream, self.upbox, self.connect_deadline = IDLE, b"", None

    def _arm(self) -> None:
        deadlines = [a.started + self.timeout for a in self.asked]
        if self.upstream == CONNECTING and self.connect_deadline is not None:
            deadlines.append(self.connect_deadline)
        self.stream.set_timer(min(deadlines, default=None))
