"""Attach mode's DNS (issue 20): the stack answers DNS on its own addresses by asking the resolvers
of the namespace where it runs, and USTACK_FORWARD_ALLOW_NAMES lets the attached namespace's flows
reach only what that resolver returned for the names it lists.

Every DNS server is one this test runs (``dns_servers.DnsServer``, in a namespace the test made): a
stub on 127.0.0.53 in the host namespace, named by the host namespace's resolv.conf
(``/etc/netns/<host>/resolv.conf``, which ``ip netns exec`` shows the stack as /etc/resolv.conf),
or one on 192.0.2.10 in the server namespace, named by USTACK_DNS_SERVERS. Every stack started here
is given one or the other, so it never reads the machine's own resolv.conf. Clients are what a user
runs in the attached namespace: glibc (``getent``), sockets made there, pip. The guard of
``attach_topology`` stops anything else leaving the host namespace.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import errno
import hashlib
import json
import os
import pathlib
import random
import socket
import struct
import subprocess
import time
import zipfile

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.integration import test_readme as readme
from tests.integration.attach_topology import SERVER, Server, Topology, UdpServer, attached_stack, echo
from tests.integration.dns_servers import DnsServer, many
from tests.integration.netns import ROOT, STACK_ADDR, STACK_ADDR6, Namespace, Stack

STUB = "127.0.0.53"   # where a stub resolver listens (systemd-resolved's address)
DNS_TIMEOUT = 2.0     # USTACK_DNS_TIMEOUT of the forwarder's stack
DEFAULT_DNS_TIMEOUT = 5.0
MANY = 100            # A records: ~1.6 KB, more than a UDP answer carries (512 bytes, 1232 with EDNS)
VENV_PYTHON = str(ROOT / ".venv" / "bin" / "python")

WEB, WEB6, V4ONLY = "192.0.2.11", "2001:db8::11", "192.0.2.12"
STUB_RECORDS = {"web.test": [WEB, WEB6], "v4only.test": [V4ONLY], "many.test": many(MANY),
                "big.test": many(MANY)}


# -- helpers ----------------------------------------------------------------------------------


def resolv_conf(ns: Namespace) -> pathlib.Path:
    """What ``ip netns exec NS`` shows as /etc/resolv.conf."""
    return pathlib.Path("/etc/netns") / ns.name / "resolv.conf"


@contextlib.contextmanager
def netns_resolv_conf(ns: Namespace, text: str):
    """``ns`` has its own resolv.conf with ``text`` while the body runs; removed after."""
    path = resolv_conf(ns)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        tidy(ns)


def tidy(ns: Namespace) -> None:
    """Remove /etc/netns/<ns> if nothing is left in it (the namespace goes with the test)."""
    with contextlib.suppress(OSError):
        resolv_conf(ns).parent.rmdir()


def nameservers(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines() if line.startswith("nameserver ")]


def ask(ns: Namespace, name: str, rdtype: str = "A", *, proto: str = "udp", server: str = STACK_ADDR,
        timeout: float = 10.0, payload: int | None = None) -> tuple[dns.message.Message, float, int]:
    """One query (EDNS with ``payload`` when given) from a socket made in ``ns``: (answer, seconds, our port)."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    query = (dns.message.make_query(name, rdtype, use_edns=0, payload=payload) if payload
             else dns.message.make_query(name, rdtype))
    start = time.monotonic()
    if proto == "udp":
        sock = ns.socket(family, socket.SOCK_DGRAM)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        sock.setblocking(False)
        with sock:
            port = sock.getsockname()[1]
            answer = dns.query.udp(query, server, timeout=timeout, sock=sock)
    else:
        sock = ns.socket(family, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(timeout)
            sock.connect((server, 53))
            port = sock.getsockname()[1]
            sock.setblocking(False)
            answer = dns.query.tcp(query, server, timeout=timeout, sock=sock)
    return answer, time.monotonic() - start, port


def addresses(answer: dns.message.Message) -> set[str]:
    return {rd.to_text() for rrset in answer.answer if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
            for rd in rrset}


def getent(ns: Namespace, database: str, name: str) -> tuple[int, set[str], float]:
    """``getent DATABASE NAME`` in ``ns``, as a user runs it: (exit status, addresses, seconds)."""
    start = time.monotonic()
    done = ns.run("getent", database, name, check=False, timeout=60)
    lines = done.stdout.decode().splitlines()
    return done.returncode, {line.split()[0] for line in lines if line.strip()}, time.monotonic() - start


def find(stack: Stack, event: str, **fields) -> list[dict]:
    """The records of ``event`` whose fields have these values."""
    return [r for r in stack.records() if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())]


def wait_record(stack: Stack, event: str, timeout: float = 20.0, **fields) -> dict:
    """The first record of ``event`` with these fields, once the log has one."""
    stack.wait_for(lambda rs: any(r.get("event") == event and all(r.get(k) == v for k, v in fields.items())
                                  for r in rs), timeout, f"a {event} record with {fields}")
    return find(stack, event, **fields)[0]


def counters(stack: Stack) -> collections.Counter:
    """Every process's counters (``stackctl status``), summed."""
    total: collections.Counter = collections.Counter()
    for p in stack.status()["processes"]:
        total.update({k: v for k, v in p.get("stats", {}).items() if isinstance(v, int)})
    return total


def dns_drops(stack: Stack) -> collections.Counter:
    return collections.Counter({k: v for k, v in counters(stack).items() if k.startswith("drop_dns_")})


def wait_counts(stack: Stack, check, what: str, timeout: float = 15.0) -> collections.Counter:
    """Poll the DNS drop counters (workers report them with their heartbeats) until check(counters)."""
    deadline = time.monotonic() + timeout
    while True:
        now = dns_drops(stack)
        if check(now):
            return now
        assert time.monotonic() < deadline, f"never: {what}; drop counters {dict(now)}"
        time.sleep(0.2)


def connect(ns: Namespace, address: str, port: int, timeout: float = 10.0) -> socket.socket:
    sock = ns.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    sock.settimeout(timeout)
    sock.connect((address, port))
    return sock


def echoed(ns: Namespace, address: str, port: int, data: bytes = b"hello") -> tuple[int, bytes]:
    """A TCP echo through the stack: (our port, what came back)."""
    with connect(ns, address, port) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        return sock.getsockname()[1], got


def malformed_queries() -> dict[str, bytes]:
    """What no client should send to port 53, and the stack must count and drop."""
    noise = bytes(random.Random(20).getrandbits(8) for _ in range(40))
    query = dns.message.make_query("web.test", "A")
    return {
        "random bytes": noise,
        "a truncated header": query.to_wire()[:5],
        "a response instead of a query": dns.message.make_response(query).to_wire(),
        "a query with no question": struct.pack("!6H", 0x2001, 0x0100, 0, 0, 0, 0),
        # Its name is a pointer to itself (RFC 1035 §4.1.4 allows only earlier offsets).
        "a compression loop": struct.pack("!6H", 0x2002, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + struct.pack("!2H", 1, 1),
    }


UNPARSEABLE = ("random bytes", "a truncated header", "a compression loop")


def test_the_malformed_corpus_is_malformed():
    """The corpus proves something only if no DNS parser takes its unparseable items."""
    corpus = malformed_queries()
    for label in UNPARSEABLE:
        with pytest.raises(dns.exception.DNSException):
            dns.message.from_wire(corpus[label])
    assert dns.message.from_wire(corpus["a response instead of a query"]).flags & dns.flags.QR
    assert len(dns.message.from_wire(corpus["a query with no question"]).question) == 0


def no_worker_lost(stack: Stack) -> None:
    assert not find(stack, "worker_lost"), find(stack, "worker_lost")
    assert not any("Traceback" in line for line in stack.lines()), "\n".join(stack.lines()[-40:])


@pytest.fixture
def fresh_topo():
    """Attach mode's three namespaces for one test that starts a stack of its own."""
    t = Topology()
    try:
        yield t
    finally:
        t.delete()
        tidy(t.client)
        tidy(t.host)


# -- the forwarder, asking the stub named by the resolv.conf of the namespace where it runs ----


@pytest.fixture(scope="class")
def stub(topo):
    server = DnsServer(topo.host, STUB, STUB_RECORDS, silent={"silent.test"}, unlimited={"big.test"})
    yield server
    server.close()


@pytest.fixture(scope="class")
def forwarder(topo, stub):
    """The stack in the host namespace, attached to the client one, its resolver the stub."""
    with netns_resolv_conf(topo.host, f"# the test's stub resolver\nnameserver {STUB}\n"):
        stack = attached_stack(topo, env={"USTACK_DNS_TIMEOUT": str(DNS_TIMEOUT)})
        try:
            yield stack
        finally:
            stack.stop()
    tidy(topo.client)


class TestForwarder:
    def test_the_attached_namespace_gets_a_resolv_conf_naming_the_stack(self, topo, forwarder):
        assert nameservers(resolv_conf(topo.client).read_text()) == [STACK_ADDR, STACK_ADDR6]
        seen = topo.client.run("cat", "/etc/resolv.conf").stdout.decode()  # what its programs read
        assert nameservers(seen) == [STACK_ADDR, STACK_ADDR6]

    def test_getent_resolves_a_and_aaaa_through_the_stack(self, topo, forwarder, stub):
        assert getent(topo.client, "hosts", "web.test")[:2] == (0, {WEB6})   # AAAA first, as glibc asks
        assert getent(topo.client, "hosts", "v4only.test")[:2] == (0, {V4ONLY})  # no AAAA: then A
        assert getent(topo.client, "ahostsv4", "web.test")[:2] == (0, {WEB})
        assert getent(topo.client, "ahostsv6", "web.test")[:2] == (0, {WEB6})
        assert getent(topo.client, "ahosts", "web.test")[:2] == (0, {WEB, WEB6})
        assert stub.count("udp", "web.test") >= 4  # the stack asked the stub, not anyone else
        assert {r["type"] for r in find(forwarder, "dns_answer", name="web.test")} == {"A", "AAAA"}

    def test_nxdomain_is_an_error_for_getent(self, topo, forwarder, stub):
        status, found, took = getent(topo.client, "hosts", "nosuch.test")
        assert (status, found) == (2, set())  # getent: "key not found"
        assert took < DNS_TIMEOUT, "an answer, not a time-out"
        record = wait_record(forwarder, "dns_answer", name="nosuch.test")
        assert record["rcode"] == "NXDOMAIN" and record["addresses"] == []
        assert stub.count(name="nosuch.test") >= 1

    @pytest.mark.parametrize("proto", ["udp", "tcp"])
    @pytest.mark.parametrize("server", [STACK_ADDR, STACK_ADDR6])
    def test_both_addresses_answer_over_udp_and_tcp(self, topo, forwarder, server, proto):
        for rdtype, want in (("A", {WEB}), ("AAAA", {WEB6})):
            answer, _, _ = ask(topo.client, "web.test", rdtype, proto=proto, server=server)
            assert answer.rcode() == dns.rcode.NOERROR and addresses(answer) == want
            assert not answer.flags & dns.flags.TC

    def test_getent_gets_a_long_answer_over_tcp_after_a_truncated_one(self, topo, forwarder, stub):
        tcp_before = stub.count("tcp", "many.test")
        status, found, _ = getent(topo.client, "ahostsv4", "many.test")
        assert (status, found) == (0, set(many(MANY)))
        assert stub.count("tcp", "many.test") > tcp_before  # 1.6 KB: no UDP answer could carry it
        answers = find(forwarder, "dns_answer", name="many.test", type="A")
        assert any(r["proto"] == "tcp" and len(r["addresses"]) == MANY and not r["truncated"] for r in answers)
        assert any(r["proto"] == "udp" and r["addresses"] == [] for r in answers)  # glibc asked over UDP first

    def test_a_truncated_answer_passed_on_is_recorded_as_truncated(self, topo, forwarder, stub):
        # many.test's server truncates for the client's limit itself, as real servers do: the client
        # still gets an answer with TC set, and the record of that answer must say so.
        answer, _, port = ask(topo.client, "many.test")
        assert answer.flags & dns.flags.TC and not answer.answer
        record = wait_record(forwarder, "dns_answer", sport=port)
        assert record["truncated"] is True, record

    def test_the_stack_cuts_an_answer_longer_than_the_client_takes(self, topo, forwarder, stub):
        # big.test's server answers whole over UDP whatever the limit: only the stack can cut it.
        plain, _, port = ask(topo.client, "big.test")  # no EDNS: 512 bytes
        assert plain.flags & dns.flags.TC and not plain.answer and plain.question == ask_question("big.test")
        assert wait_record(forwarder, "dns_answer", sport=port)["truncated"] is True
        roomy, _, port = ask(topo.client, "big.test", payload=4096)  # EDNS: 4096 bytes
        assert not roomy.flags & dns.flags.TC and addresses(roomy) == set(many(MANY))
        assert wait_record(forwarder, "dns_answer", sport=port)["truncated"] is False
        whole, _, _ = ask(topo.client, "big.test", proto="tcp")
        assert addresses(whole) == set(many(MANY))

    @pytest.mark.parametrize("proto", ["udp", "tcp"])
    def test_a_silent_resolver_gets_servfail_within_the_timeout(self, topo, forwarder, stub, proto):
        asked = stub.count(name="silent.test")
        answer, took, port = ask(topo.client, "silent.test", proto=proto, timeout=DNS_TIMEOUT + 10)
        assert answer.rcode() == dns.rcode.SERVFAIL
        assert took < DNS_TIMEOUT + 1.0, took
        assert stub.count(name="silent.test") > asked  # the stub was asked and said nothing
        record = wait_record(forwarder, "dns_answer", sport=port, name="silent.test")
        assert record["rcode"] == "SERVFAIL" and record["proto"] == proto

    def test_each_answer_is_one_dns_answer_record(self, topo, forwarder):
        for proto in ("udp", "tcp"):
            answer, took, port = ask(topo.client, "web.test", "A", proto=proto)
            wait_record(forwarder, "dns_answer", sport=port)
            [record] = find(forwarder, "dns_answer", sport=port)
            assert {k: record[k] for k in ("proto", "src", "sport", "name", "type", "rcode", "addresses", "ttl",
                                           "server", "truncated")} == {
                "proto": proto, "src": "10.0.0.1", "sport": port, "name": "web.test", "type": "A",
                "rcode": "NOERROR", "addresses": [WEB], "ttl": 60, "server": STUB, "truncated": False}
            assert 0 <= record["latency_ms"] <= took * 1000

    def test_malformed_queries_over_udp_are_counted_and_dropped(self, topo, forwarder):
        corpus = malformed_queries()
        joined = len(find(forwarder, "worker_joined"))
        before = dns_drops(forwarder)
        with topo.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            sock.connect((STACK_ADDR, 53))
            for data in corpus.values():
                sock.send(data)
            query = dns.message.make_query("web.test", "A")
            sock.send(query.to_wire())
            # Nothing answers the malformed ones: the first datagram back is the good query's answer.
            first = dns.message.from_wire(sock.recv(65535))
        assert first.id == query.id and addresses(first) == {WEB}
        after = wait_counts(forwarder, lambda c: sum((c - before).values()) >= len(corpus),
                            f"{len(corpus)} DNS drops counted")
        assert sum((after - before).values()) == len(corpus), dict(after - before)
        assert after["drop_dns_malformed_query"] - before["drop_dns_malformed_query"] == len(UNPARSEABLE)
        assert len(find(forwarder, "worker_joined")) == joined  # no process restarted
        no_worker_lost(forwarder)

    def test_malformed_queries_over_tcp_are_counted_and_dropped(self, topo, forwarder):
        corpus = malformed_queries()
        joined = len(find(forwarder, "worker_joined"))
        before = dns_drops(forwarder)
        for label, data in corpus.items():
            with connect(topo.client, STACK_ADDR, 53) as sock:
                got = b""
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    sock.sendall(struct.pack("!H", len(data)) + data)
                    with contextlib.suppress(OSError):  # ENOTCONN once reset
                        sock.shutdown(socket.SHUT_WR)
                    while chunk := sock.recv(65536):  # the stack ends the connection, answering nothing
                        got += chunk
            assert got == b"", label
        after = wait_counts(forwarder, lambda c: sum((c - before).values()) >= len(corpus),
                            f"{len(corpus)} DNS drops counted")
        assert sum((after - before).values()) == len(corpus), dict(after - before)
        # Those that never parse as DNS; a 5-byte message may be refused for its length alone.
        assert after["drop_dns_malformed_query"] - before["drop_dns_malformed_query"] >= 2
        answer, _, _ = ask(topo.client, "web.test", "A", proto="tcp")
        assert addresses(answer) == {WEB}
        assert len(find(forwarder, "worker_joined")) == joined
        no_worker_lost(forwarder)

    def test_the_forwarder_asked_only_the_stub_and_nothing_escaped(self, topo, forwarder):
        answers = find(forwarder, "dns_answer")
        assert answers and {r["server"] for r in answers} <= {STUB, None}  # None: SERVFAIL, nobody answered
        assert topo.escaped() == 0


def ask_question(name: str):
    return dns.message.make_query(name, "A").question


# -- the resolv.conf of the attached namespace, USTACK_DNS=0, the default time-out ----------------


def test_the_resolv_conf_lives_as_long_as_the_stack(fresh_topo):
    topo = fresh_topo
    path = resolv_conf(topo.client)
    assert not path.exists()
    stack = attached_stack(topo, env={"USTACK_DNS_SERVERS": SERVER})
    try:
        assert nameservers(path.read_text()) == [STACK_ADDR, STACK_ADDR6]
        assert nameservers(topo.client.run("cat", "/etc/resolv.conf").stdout.decode()) == [STACK_ADDR, STACK_ADDR6]
    finally:
        stack.stop()
    assert not path.exists()


def test_a_resolv_conf_the_namespace_had_is_left_alone(fresh_topo):
    topo = fresh_topo
    own = "# the namespace's own\nnameserver 192.0.2.53\noptions timeout:1\n"
    with netns_resolv_conf(topo.client, own) as path:
        stack = attached_stack(topo, env={"USTACK_DNS_SERVERS": SERVER})
        try:
            assert path.read_text() == own
            answer, _, _ = ask(topo.client, "web.test", "A", timeout=10)  # the stack still answers
            assert answer.rcode() == dns.rcode.SERVFAIL  # nobody at SERVER: in bounded time
        finally:
            stack.stop()
        assert path.read_text() == own


def test_with_dns_off_nothing_answers_on_port_53(fresh_topo):
    topo = fresh_topo
    resolver = DnsServer(topo.server, SERVER, STUB_RECORDS)
    try:
        stack = attached_stack(topo, env={"USTACK_DNS": "0", "USTACK_DNS_SERVERS": SERVER})
        try:
            assert not resolv_conf(topo.client).exists()
            with pytest.raises(ConnectionRefusedError):  # a TCP reset
                connect(topo.client, STACK_ADDR, 53)
            query = dns.message.make_query("web.test", "A").to_wire()
            with topo.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(1)
                sock.connect((STACK_ADDR, 53))
                error = None
                deadline = time.monotonic() + 10
                while error is None and time.monotonic() < deadline:
                    sock.send(query)  # ICMP port unreachable comes back (rate limited: retry)
                    try:
                        sock.recv(65535)
                        error = "answered"
                    except TimeoutError:
                        continue
                    except ConnectionRefusedError:
                        error = "refused"
            assert error == "refused"
        finally:
            stack.stop()
        assert resolver.count() == 0
    finally:
        resolver.close()


def test_dns_servers_overrides_resolv_conf_and_servfail_comes_within_the_default_timeout(fresh_topo):
    topo = fresh_topo
    silent = DnsServer(topo.server, SERVER, {})
    silent.silent = True
    # The host namespace's resolv.conf names a stub that answers: USTACK_DNS_SERVERS wins over it.
    stub = DnsServer(topo.host, STUB, STUB_RECORDS)
    try:
        with netns_resolv_conf(topo.host, f"nameserver {STUB}\n"):
            stack = attached_stack(topo, env={"USTACK_DNS_SERVERS": SERVER})
            try:
                for proto in ("udp", "tcp"):
                    answer, took, _ = ask(topo.client, "web.test", proto=proto, timeout=DEFAULT_DNS_TIMEOUT + 10)
                    assert answer.rcode() == dns.rcode.SERVFAIL
                    assert took < DEFAULT_DNS_TIMEOUT + 1.0, took
            finally:
                stack.stop()
        assert silent.count("udp") >= 1 and silent.count("tcp") >= 1
        assert stub.count() == 0
    finally:
        silent.close()
        stub.close()


# -- USTACK_FORWARD_ALLOW_NAMES -----------------------------------------------------------------

IDX, IDX6, OTHER, NEVER, WILD, SHORT = "192.0.2.11", "2001:db8::11", "192.0.2.12", "192.0.2.13", "192.0.2.14", \
    "192.0.2.15"
NAMES = {"idx.test": [IDX, IDX6], "other.test": [OTHER], "a.example.test": [WILD], "short.test": [SHORT]}
ALLOW = "idx.test,*.example.test,short.test"
SHORT_TTL = 1
GRACE = 30.0  # an address stays allowed this long after its answer's TTL
INDEX_PORT, OTHER_PORT = 8080, 8081


@pytest.fixture(scope="class")
def names_topo():
    t = Topology()
    try:
        for address in (IDX, OTHER, NEVER, WILD, SHORT):
            t.server.run("ip", "addr", "add", f"{address}/24", "dev", "ve-server")
        t.server.run("ip", "addr", "add", f"{IDX6}/64", "dev", "ve-server", "nodad")
        yield t
    finally:
        t.delete()
        tidy(t.client)


@pytest.fixture(scope="class")
def resolver(names_topo):
    server = DnsServer(names_topo.server, SERVER, NAMES, ttls={"short.test": SHORT_TTL})
    yield server
    server.close()


@pytest.fixture(scope="class")
def guarded(names_topo, resolver):
    """A stack whose namespace may reach only what its resolver returned for ALLOW's names."""
    stack = attached_stack(names_topo, env={"USTACK_DNS_SERVERS": SERVER, "USTACK_FORWARD_ALLOW_NAMES": ALLOW,
                                            "USTACK_UDP_IDLE": "2"})
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="class")
def servers(names_topo, guarded):
    made = {address: Server(names_topo.server, address, 7, echo) for address in (IDX, OTHER, NEVER, WILD, SHORT)}
    made[IDX6] = Server(names_topo.server, IDX6, 7, echo, family=socket.AF_INET6)
    made["other_http"] = Server(names_topo.server, OTHER, OTHER_PORT, echo)
    udp = {address: UdpServer(names_topo.server, address, 7, lambda data: data) for address in (IDX, NEVER)}
    yield made, udp
    for server in list(made.values()) + list(udp.values()):
        server.close()


def udp_error(ns: Namespace, address: str, port: int) -> tuple[bytes | None, int | None]:
    """Send to a UDP echo until an answer or an ICMP error comes: (answer, errno)."""
    with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.connect((address, port))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sock.send(b"anyone?")
            try:
                return sock.recv(100), None
            except TimeoutError:
                continue
            except OSError as exc:
                return None, exc.errno
    return None, None


class TestAllowNames:
    @pytest.mark.parametrize("database,address", [("ahostsv4", IDX), ("ahostsv6", IDX6)])
    def test_an_allowed_name_once_resolved_is_reached(self, names_topo, guarded, servers, database, address):
        assert getent(names_topo.client, database, "idx.test")[:2] == (0, {address})
        port, got = echoed(names_topo.client, address, 7)
        assert got == b"hello"
        assert wait_record(guarded, "relay_flow", proto="tcp", sport=port)["name"] == "idx.test"

    def test_a_name_below_an_allowed_wildcard_is_reached(self, names_topo, guarded, servers):
        assert getent(names_topo.client, "ahostsv4", "a.example.test")[:2] == (0, {WILD})
        port, got = echoed(names_topo.client, WILD, 7)
        assert got == b"hello"
        assert wait_record(guarded, "relay_flow", proto="tcp", sport=port)["name"] == "a.example.test"

    def test_a_name_resolved_but_not_allowed_is_reset(self, names_topo, guarded, servers):
        assert getent(names_topo.client, "ahostsv4", "other.test")[:2] == (0, {OTHER})
        with pytest.raises(ConnectionRefusedError):
            connect(names_topo.client, OTHER, 7)
        record = wait_record(guarded, "relay_denied", proto="tcp", dst=OTHER, dport=7)
        assert record["reason"] == "name_not_allowed" and record.get("name") == "other.test"
        assert servers[0][OTHER].accepted == 0

    def test_an_address_never_resolved_is_denied_to_tcp_udp_and_ping(self, names_topo, guarded, servers):
        tcp, udp = servers
        with pytest.raises(ConnectionRefusedError):
            connect(names_topo.client, NEVER, 7)
        answer, error = udp_error(names_topo.client, NEVER, 7)  # ICMP administratively prohibited
        assert answer is None and error in (errno.EACCES, errno.EHOSTUNREACH), error
        ping = names_topo.client.run("ping", "-c", "1", "-W", "3", NEVER, check=False)
        assert ping.returncode != 0, ping.stdout
        for proto in ("tcp", "udp", "icmp"):
            assert wait_record(guarded, "relay_denied", proto=proto, dst=NEVER)["reason"] == "name_unknown"
        assert tcp[NEVER].accepted == 0 and udp[NEVER].received == 0
        # The resolver's own address was never an answer either.
        with pytest.raises(ConnectionRefusedError):
            connect(names_topo.client, SERVER, 53)

    def test_udp_and_ping_reach_an_allowed_name(self, names_topo, guarded, servers):
        answer, _, _ = ask(names_topo.client, "idx.test", "A")
        assert addresses(answer) == {IDX}
        with names_topo.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.connect((IDX, 7))
            sock.send(b"datagram")
            assert sock.recv(100) == b"datagram"
            port = sock.getsockname()[1]
        ping = names_topo.client.run("ping", "-c", "2", "-i", "0.2", "-W", "3", IDX, check=False)
        assert ping.returncode == 0, ping.stdout
        assert wait_record(guarded, "relay_flow", proto="udp", sport=port)["name"] == "idx.test"
        assert wait_record(guarded, "relay_flow", proto="icmp", dst=IDX)["name"] == "idx.test"

    def test_an_address_stays_allowed_for_its_ttl_plus_30_s(self, names_topo, guarded, servers):
        resolved = time.monotonic()
        answer, _, _ = ask(names_topo.client, "short.test", "A")
        assert addresses(answer) == {SHORT} and answer.answer[0].ttl == SHORT_TTL
        last_reached = None
        while True:  # one connection a second until the permission ends
            try:
                assert echoed(names_topo.client, SHORT, 7)[1] == b"hello"
                last_reached = time.monotonic() - resolved
            except ConnectionRefusedError:
                refused = time.monotonic() - resolved
                break
            assert time.monotonic() - resolved < SHORT_TTL + GRACE + 15, "still allowed long after TTL + 30 s"
            time.sleep(1)
        assert last_reached is not None and last_reached > SHORT_TTL + GRACE - 2, last_reached
        assert refused >= SHORT_TTL + GRACE, refused
        assert wait_record(guarded, "relay_denied", dst=SHORT)["reason"] == "name_unknown"

    def test_pip_installs_from_the_only_index_it_may_reach(self, names_topo, guarded, servers, tmp_path):
        index = package_index(tmp_path / "index", tiny_wheel(tmp_path))
        http = [names_topo.server.popen(VENV_PYTHON, "-m", "http.server", str(INDEX_PORT), "--bind", address,
                                        "--directory", str(index), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL) for address in (IDX, IDX6)]
        try:
            for address in (IDX, IDX6):
                wait_listening(names_topo.server, address, INDEX_PORT)
            target = tmp_path / "target"
            done = pip_install(names_topo.client, f"http://idx.test:{INDEX_PORT}/simple/", "idx.test", target)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "Successfully installed tinypkg-1.0" in done.stdout
            imported = names_topo.client.run(VENV_PYTHON, "-c", "import tinypkg; print(tinypkg.GREETING)",
                                             env=dict(os.environ, PYTHONPATH=str(target)))
            assert imported.stdout.decode().strip() == "hello from idx.test"

            # other.test resolves, and a server listens there; the stack lets nothing reach it.
            refused = pip_install(names_topo.client, f"http://other.test:{OTHER_PORT}/simple/", "other.test",
                                  tmp_path / "other")
            # pip says only that it found nothing there; the stack's relay_denied record below says why.
            assert refused.returncode != 0 and "No matching distribution found" in refused.stderr, refused.stderr
            assert servers[0]["other_http"].accepted == 0
        finally:
            for proc in http:
                proc.terminate()
                proc.wait(10)
        answer = wait_record(guarded, "dns_answer", name="idx.test", type="A")
        assert answer["addresses"] == [IDX] and answer["server"] == SERVER
        flow = wait_record(guarded, "relay_flow", proto="tcp", dport=INDEX_PORT)
        assert flow["name"] == "idx.test" and flow["dst"] in (IDX, IDX6) and flow["bytes_down"] > 0
        denied = wait_record(guarded, "relay_denied", dst=OTHER, dport=OTHER_PORT)
        assert denied["reason"] == "name_not_allowed"
        assert find(guarded, "dns_answer", name="other.test")
        assert names_topo.escaped() == 0


def tiny_wheel(directory: pathlib.Path) -> pathlib.Path:
    """A wheel pip installs (PEP 427): one module and its dist-info, RECORD with each file's hash."""
    files = {
        "tinypkg.py": b'GREETING = "hello from idx.test"\n',
        "tinypkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
        "tinypkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: ustack-tests\nRoot-Is-Purelib: true\n"
                                       b"Tag: py3-none-any\n",
    }
    record = "".join(f"{name},sha256={_b64(hashlib.sha256(data).digest())},{len(data)}\n"
                     for name, data in files.items()) + "tinypkg-1.0.dist-info/RECORD,,\n"
    path = directory / "tinypkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("tinypkg-1.0.dist-info/RECORD", record)
    return path


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def package_index(root: pathlib.Path, wheel: pathlib.Path) -> pathlib.Path:
    """A PEP 503 simple index of one project: simple/, simple/tinypkg/ linking the wheel with its sha256."""
    project = root / "simple" / "tinypkg"
    project.mkdir(parents=True)
    (root / "simple" / "index.html").write_text('<!DOCTYPE html>\n<html><body><a href="tinypkg/">tinypkg</a>'
                                                "</body></html>\n")
    (project / wheel.name).write_bytes(wheel.read_bytes())
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (project / "index.html").write_text(f'<!DOCTYPE html>\n<html><body><a href="{wheel.name}#sha256={digest}">'
                                        f"{wheel.name}</a></body></html>\n")
    return root


def wait_listening(ns: Namespace, address: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with ns.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
            if probe.connect_ex((address, port)) == 0:
                return
        assert time.monotonic() < deadline, f"nothing listens on {address}:{port}"
        time.sleep(0.1)


def pip_install(ns: Namespace, index_url: str, host: str, target: pathlib.Path) -> subprocess.CompletedProcess:
    """pip in ``ns`` as a user runs it, told only of ``index_url`` (no configuration, no proxy)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("PIP_")}
    return ns.run(VENV_PYTHON, "-m", "pip", "install", "--isolated", "--no-cache-dir", "--disable-pip-version-check",
                  "--no-input", "--retries", "0", "--timeout", "10", "--index-url", index_url, "--trusted-host", host,
                  "--target", str(target), "tinypkg", check=False, timeout=120, env=env, text=True)


# -- the README's walkthrough, run as written ----------------------------------------------------

README_BLOCKS = ("pip-setup", "pip-start", "pip-try", "pip-cleanup")


def test_the_readme_package_index_walkthrough_works_as_written():
    readme.require_root_and_tun()
    taken = {"box", "outside"} & readme.netns_names()
    assert not taken, f"namespaces {taken} exist already: the walkthrough makes its own"
    recipe = readme.blocks()
    assert all(name in recipe for name in README_BLOCKS), sorted(recipe)
    assert len(recipe["pip-start"]) == 1
    run = None
    try:
        readme.run_lines(recipe["pip-setup"])
        # Everything the walkthrough serves is on outside's loopback: the guard proves nothing else is reached.
        subprocess.run(["ip", "netns", "exec", "outside", "nft", "-f", "-"], input=readme.GUARD, text=True,
                       check=True)
        run = readme.start(recipe["pip-start"][0])
        readme.wait_until_serving("box", run)
        readme.run_lines(recipe["pip-try"])
        counter = subprocess.run(["ip", "netns", "exec", "outside", "nft", "list", "counter", "inet",
                                  "readme_guard", "escaped"], capture_output=True, text=True, check=True).stdout
        assert "packets 0 " in counter, counter
        readme.run_lines(recipe["pip-cleanup"])  # stops the stack, removes the namespaces
        assert run.wait(timeout=30) == 0
    finally:
        out = readme.stop(run) if run is not None else ""
        for ns in ("box", "outside"):
            if ns in readme.netns_names():
                for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                          text=True).stdout.split():
                    os.kill(int(pid), 9)
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["rm", "-rf", "/tmp/ustack-pip"])
    assert "Traceback" not in out, out
    assert not {"box", "outside"} & readme.netns_names()
    assert not pathlib.Path("/etc/netns/box/resolv.conf").exists()
    # The records the README shows are the ones the stack wrote.
    records = [json.loads(line.partition(" | ")[2]) for line in out.splitlines() if " | {" in line]
    assert any(r["event"] == "dns_answer" and r.get("name") == "idx.test" and r.get("addresses") == ["192.0.2.10"]
               for r in records), out[-3000:]
    assert any(r["event"] == "relay_flow" and r.get("name") == "idx.test" and r.get("dport") == 8080
               for r in records), out[-3000:]
    assert any(r["event"] == "relay_denied" and r.get("dst") == "192.0.2.20" and r.get("reason") == "name_not_allowed"
               for r in records), out[-3000:]
