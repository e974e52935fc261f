"""A DNS server the tests run inside a namespace they made (dnslib for the messages).

:class:`DnsServer` answers on one address, port 53, over UDP and TCP, from a
table of names: A and AAAA records with a TTL, NOERROR with no records for a
known name's other types, NXDOMAIN for any other name. Like a real server
(BIND's ``max-udp-size`` 1232) a UDP answer longer than the client's limit
(512 bytes, or its EDNS size, at most 1232) comes back with TC set, its
question kept and no records, so the client asks again over TCP; names in
``unlimited`` are answered whole over UDP whatever the client's limit (a
server that ignores it, so that only the forwarder can cut the answer).
Names in ``silent`` (or every name, with ``silent = True``) are never
answered. Every
query is noted with its transport, so a test can tell that a TCP retry
happened. Its sockets are made in the namespace (``Namespace.socket``) and
served by threads of the test process: nothing runs in the main namespace.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord, DNSError

from tests.integration.netns import Namespace

UDP_PLAIN = 512    # RFC 1035 §4.2.1: without EDNS a UDP answer is at most 512 bytes
UDP_MAX = 1232     # what we accept over UDP at most, EDNS or not (DNS flag day 2020, BIND's default)


@dataclass(frozen=True)
class Query:
    """One query the server received: its transport ("udp" or "tcp"), name (no final dot) and type."""
    transport: str
    name: str
    qtype: str


def many(count: int, prefix: str = "198.51.100.") -> list[str]:
    """``count`` IPv4 addresses (TEST-NET-2 by default, at most 254): an answer that needs TCP."""
    return [f"{prefix}{i}" for i in range(1, count + 1)]


class DnsServer:
    """UDP and TCP DNS on ``address``:``port`` in ``ns``, answering from ``records``."""

    def __init__(self, ns: Namespace, address: str, records: dict[str, list[str]], *, ttl: int = 60,
                 ttls: dict[str, int] | None = None, silent: set[str] | None = None,
                 unlimited: set[str] | None = None, port: int = 53) -> None:
        self.address = address
        self.records = {name.lower().rstrip("."): list(addresses) for name, addresses in records.items()}
        self.ttl = ttl
        self.ttls = {name.lower().rstrip("."): t for name, t in (ttls or {}).items()}
        self.silent_names = {name.lower().rstrip(".") for name in (silent or ())}
        self.unlimited = {name.lower().rstrip(".") for name in (unlimited or ())}
        self.silent = False  # True: no query is answered
        self.queries: list[Query] = []
        self.malformed = 0
        self._lock = threading.Lock()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.udp = ns.socket(family, socket.SOCK_DGRAM)
        self.udp.bind((address, port))
        self.tcp = ns.socket(family, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((address, port))
        self.tcp.listen(64)
        self._closed = False
        self._conns: set[socket.socket] = set()
        threading.Thread(target=self._serve_udp, daemon=True, name=f"dns-udp-{address}").start()
        threading.Thread(target=self._serve_tcp, daemon=True, name=f"dns-tcp-{address}").start()

    # -- what a test reads --

    def count(self, transport: str | None = None, name: str | None = None) -> int:
        """Queries received, of one transport and for one name when given."""
        with self._lock:
            return sum(1 for q in self.queries if (transport is None or q.transport == transport)
                       and (name is None or q.name == name.lower().rstrip(".")))

    # -- the answers --

    def answer(self, data: bytes, transport: str) -> bytes | None:
        """The answer to one query's bytes ("udp": truncated to the client's limit); None: no answer."""
        try:
            query = DNSRecord.parse(data)
        except (DNSError, struct.error, IndexError, ValueError, UnicodeDecodeError):
            with self._lock:
                self.malformed += 1
            return None
        if query.header.qr or len(query.questions) != 1:
            with self._lock:
                self.malformed += 1
            return None
        question = query.questions[0]
        name = str(question.qname).lower().rstrip(".")
        qtype = QTYPE.get(question.qtype, str(question.qtype))
        with self._lock:
            self.queries.append(Query(transport, name, qtype))
        if self.silent or name in self.silent_names:
            return None
        reply = query.reply()  # qr, aa, rd copied, ra set, the question kept
        if name not in self.records:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            ttl = self.ttls.get(name, self.ttl)
            for address in self.records[name]:
                if ":" in address and qtype == "AAAA":
                    reply.add_answer(RR(question.qname, QTYPE.AAAA, rdata=AAAA(address), ttl=ttl))
                elif ":" not in address and qtype == "A":
                    reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=ttl))
        packed = reply.pack()
        if transport == "udp" and name not in self.unlimited:
            edns = next((rr for rr in query.ar if rr.rtype == QTYPE.OPT), None)
            allowed = min(UDP_MAX, max(UDP_PLAIN, edns.edns_len if edns is not None else UDP_PLAIN))
            if len(packed) > allowed:
                # RFC 2181 §9: set TC; we keep the question (as BIND does) and send no records.
                truncated = query.reply()
                truncated.header.tc = 1
                packed = truncated.pack()
        return packed

    # -- the transports --

    def _serve_udp(self) -> None:
        while not self._closed:
            try:
                data, peer = self.udp.recvfrom(65535)
            except OSError:
                return
            if peer is None:  # woken by close()
                return
            out = self.answer(data, "udp")
            if out is not None:
                with contextlib.suppress(OSError):
                    self.udp.sendto(out, peer)

    def _serve_tcp(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        """RFC 7766 §8: each message after its two-byte length; many queries per connection."""
        with self._lock:
            self._conns.add(conn)
        try:
            with conn:
                conn.settimeout(30)
                while not self._closed:
                    head = _read_exactly(conn, 2)
                    if head is None:
                        return
                    data = _read_exactly(conn, struct.unpack("!H", head)[0])
                    if data is None:
                        return
                    out = self.answer(data, "tcp")
                    if out is not None:
                        conn.sendall(struct.pack("!H", len(out)) + out)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)

    def close(self) -> None:
        self._closed = True
        for sock in (self.udp, self.tcp):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recvfrom / accept
            sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def _read_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
