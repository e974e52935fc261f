"""TCP services through the real pipeline, with the kernel's TCP as the client."""

import concurrent.futures
import hashlib
import socket
import time

import pytest
from scapy.layers.inet import IP, TCP

from tests.integration.conftest import FAMILIES
from tests.integration.netns import HOST_ADDR, STACK_ADDR, Stack


TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4  # <linux/tcp.h>


def _connect(ns, port: int, timeout: float = 5.0, family=None) -> socket.socket:
    sock = ns.socket(family.af if family else socket.AF_INET)
    sock.settimeout(timeout)
    sock.connect((family.stack if family else STACK_ADDR, port))
    return sock


def _read_until_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_nc_chat_with_line_service(ns, stack, family):
    done = ns.run("nc", "-N", "-w", "5", family.stack, "8000", input=b"hello\nworld\n")
    assert done.stdout == b"olleh\ndlrow\n"


def test_lines_split_across_segments(ns, stack):
    with _connect(ns, 8000) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (b"ab", b"c\nde", b"f", b"\n\ngh", b"i\n"):
            sock.sendall(piece)
            time.sleep(0.02)  # let each piece leave as its own segment
        sock.shutdown(socket.SHUT_WR)
        assert _read_until_eof(sock) == b"cba\nfed\n\nihg\n"


def test_echo_one_megabyte(ns, stack, family):
    data = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB
    with _connect(ns, 7, family=family) as sock:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            reader = pool.submit(_read_until_eof, sock)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # client starts the teardown
            assert hashlib.sha256(reader.result(30)).digest() == hashlib.sha256(data).digest()


def test_several_connections_at_once(ns, stack, family):
    def chat(i: int) -> bytes:
        with _connect(ns, 8000, family=family) as sock:
            sock.sendall(f"connection {i}\n".encode())
            sock.shutdown(socket.SHUT_WR)
            return _read_until_eof(sock)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(chat, range(40)))
    assert answers == [f"connection {i}\n".encode()[::-1][1:] + b"\n" for i in range(40)]


def test_server_closes_first(ns, stack, family):
    with _connect(ns, 17, family=family) as sock:
        quote = _read_until_eof(sock)  # our stack sends FIN first: active close on its side
    assert quote.startswith(b"Be conservative") and quote.endswith(b"\r\n")


def test_closed_port_is_refused_at_once(ns, stack, family):
    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        _connect(ns, 4321, family=family)
    assert time.monotonic() - start < 2  # a reset, not a SYN retransmission timeout


def test_segment_for_no_connection_gets_a_reset(ns, stack):
    """RFC 9293 §3.10.7.1: an ACK for no connection is answered with <SEQ=SEG.ACK><CTL=RST>."""
    listener = ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    listener.settimeout(3)
    sender = ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with listener, sender:
        stray = IP(src=HOST_ADDR, dst=STACK_ADDR) / TCP(sport=40001, dport=8000, flags="A", seq=1000, ack=123456)
        sender.sendto(bytes(stray), (STACK_ADDR, 0))
        syn = IP(src=HOST_ADDR, dst=STACK_ADDR) / TCP(sport=40002, dport=4321, flags="S", seq=777)
        sender.sendto(bytes(syn), (STACK_ADDR, 0))
        resets = {}
        while len(resets) < 2:
            reply = IP(listener.recv(2048))
            if reply.src == STACK_ADDR and reply[TCP].flags.R:
                resets[reply[TCP].dport] = reply[TCP]
    assert resets[40001].seq == 123456 and not resets[40001].flags.A
    assert resets[40002].seq == 0 and resets[40002].ack == 778 and resets[40002].flags.A


def test_reconnect_from_the_same_port_reopens_our_time_wait(ns, stack):
    """RFC 6191: the kernel reconnects from the port of a connection we hold in TIME-WAIT."""

    def quote_from(port: int) -> tuple[bytes, int]:
        sock = ns.socket()
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.settimeout(5)
            sock.bind((HOST_ADDR, port))
            sock.connect((STACK_ADDR, 17))
            return _read_until_eof(sock), sock.getsockname()[1]

    first, port = quote_from(0)  # QOTD closes first: our side ends in TIME-WAIT
    stack.wait_for(lambda recs: any(r["event"] == "tcp_state" and r.get("rport") == port and r["new"] == "TIME_WAIT"
                                    for r in recs), timeout=10, what=f"TIME-WAIT for port {port}")
    # The kernel's side (LAST-ACK until our ACK arrives) must be gone before it can reuse the port.
    deadline = time.monotonic() + 5
    while ns.run("ss", "-Htan", "state", "all", f"sport = :{port}").stdout.strip():
        assert time.monotonic() < deadline, "the kernel never closed its side"
        time.sleep(0.02)
    second, again = quote_from(port)
    assert again == port and first == second and second.startswith(b"Be conservative")
    stack.wait_for(lambda recs: any(r["event"] == "tcp_closed" and r.get("rport") == port
                                    and r["reason"] == "time_wait_reused" for r in recs),
                   timeout=10, what=f"TIME-WAIT of port {port} reused by the new SYN")


def test_ipv6_connection_gets_mss_and_options(ns, stack):
    """Over IPv6 our MSS is MTU - 60, and window scaling, SACK and timestamps are agreed."""
    with _connect(ns, 7, family=FAMILIES["ipv6"]) as sock:
        sock.sendall(b"x" * 100_000)
        assert len(sock.recv(1)) == 1
        # The kernel's send MSS: our 1440 less the 12 bytes of the timestamp option.
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) == 1500 - 60 - 12
        # struct tcp_info: state, ca_state, retransmits, probes, backoff, options, wscales.
        options = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[5]
    assert options & TCPI_OPT_TIMESTAMPS and options & TCPI_OPT_SACK and options & TCPI_OPT_WSCALE


def test_time_wait_held_is_bounded(fresh_ns):
    """A client churning connections that we close first: TCP_MAX_TIME_WAIT bounds what the worker holds."""
    stack = Stack(fresh_ns, env={"TCP_MAX_TIME_WAIT": "20"})
    try:
        stack.wait_ready()
        for _ in range(60):
            with _connect(fresh_ns, 17) as sock:  # QOTD closes first: each ends in our TIME-WAIT
                assert _read_until_eof(sock).startswith(b"Be conservative")
        stack.wait_for(lambda recs: sum(r["event"] == "tcp_closed" and r["reason"] == "time_wait_overflow"
                                        for r in recs) == 40, 20, "40 connections out of TIME-WAIT early")

        def tcp_gauges():
            [worker] = [p["stats"] for p in stack.status()["processes"] if p["role"] == "tcp"]
            return worker.get("time_wait"), worker.get("time_wait_overflow")
        deadline = time.monotonic() + 10  # the gauges come with the worker's next heartbeat
        while tcp_gauges() != (20, 40):
            assert time.monotonic() < deadline, f"time_wait, time_wait_overflow: {tcp_gauges()}"
            time.sleep(0.2)
    finally:
        stack.stop()
