"""Attach mode, TCP: a namespace whose network is the stack, relaying to real servers.

Every server is one this test runs in a namespace it made (see
``attach_topology``); the nftables guard proves nothing else was reached.
"""

import hashlib
import socket
import subprocess
import threading
import time

import pytest

from tests.integration.attach_topology import (
    ABSENT, METADATA, SERVER, SERVER6, Server, Topology, attached_stack, echo, pusher, read_until_eof_or_reset,
    reset_after_hello)
from tests.integration.netns import process_pid

SIZE = 20 * 1024 * 1024
STALL = 30.0
KEEPALIVE = 600  # TCP_KEEPALIVE: long enough that no probe disturbs a test


def payload(size: int = SIZE) -> bytes:
    block = hashlib.sha512(b"ustack attach").digest() * 1024
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture(scope="module")
def stack(topo):
    s = attached_stack(topo, env={"USTACK_RELAY_CONNECT_TIMEOUT": "8", "USTACK_HOST_ALIAS": "10.0.2.2",
                                  "TCP_KEEPALIVE": str(KEEPALIVE)})
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def servers(topo, stack):
    made = {
        "echo": Server(topo.server, SERVER, 7, echo),
        "echo6": Server(topo.server, SERVER6, 7, echo, family=socket.AF_INET6),
        "push": Server(topo.server, SERVER, 19, pusher(payload())),
        "sink": Server(topo.server, SERVER, 9, read_until_eof_or_reset),
        "reset": Server(topo.server, SERVER, 13, reset_after_hello),
        "metadata": Server(topo.host, METADATA, 80, echo),
        "host_loopback": Server(topo.host, "127.0.0.1", 8081, echo),
    }
    yield made
    for server in made.values():
        server.close()


def connect(topo, address: str, port: int, timeout: float = STALL) -> socket.socket:
    sock = topo.client.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    sock.settimeout(timeout)
    sock.connect((address, port))
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def test_device_and_default_route_live_in_the_attached_namespace(topo, stack):
    routes = topo.client.run("ip", "route", "show", "default").stdout.decode()
    assert "dev ustack0" in routes
    # The host namespace has no such device: the stack's processes stay where they started.
    assert topo.host.run("ip", "link", "show", "ustack0", check=False).returncode != 0


def test_curl_of_20_mb_arrives_intact(topo, stack, tmp_path):
    (tmp_path / "file").write_bytes(payload())
    http = topo.server.popen("python3", "-m", "http.server", "--bind", SERVER, "8080", "-d", str(tmp_path),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):  # until it listens
            if topo.server.run("ss", "-Hltn", "sport = :8080").stdout.strip():
                break
            time.sleep(0.1)
        got = topo.client.run("curl", "-sS", "--max-time", "120", f"http://{SERVER}:8080/file", timeout=130).stdout
    finally:
        http.terminate()
        http.wait()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload()).hexdigest()


def echo_through(sock: socket.socket, data: bytes, timeout: float = 120) -> bytes:
    """Send ``data`` and finish while a thread reads everything that comes back."""
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(read_all(sock)))
    reader.start()
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    reader.join(timeout)
    sock.close()
    return received[0] if received else b""


@pytest.mark.parametrize("server", [SERVER, SERVER6])
def test_20_mb_echo_both_ways(topo, servers, server):
    data = payload()
    got = echo_through(connect(topo, server, 7), data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_20_mb_echo_with_5_percent_loss_on_the_namespace_side(topo, servers):
    # Loss on what reaches the client's kernel: real loss for our sender and for the ACKs of the client's.
    topo.client.run("nft", "-f", "-", input=b"""table inet ustack_loss {
  chain lossy { type filter hook input priority 0; iifname "ustack0" numgen random mod 100 < 5 drop; }
}""")
    try:
        test_20_mb_echo_both_ways(topo, servers, SERVER)
    finally:
        topo.client.run("nft", "delete", "table", "inet", "ustack_loss")


def test_half_close_is_mirrored_both_ways(topo, servers):
    sock = connect(topo, SERVER, 7)
    sock.sendall(b"before the FIN")
    sock.shutdown(socket.SHUT_WR)  # the server sees EOF only now, then echoes and finishes too
    assert read_all(sock) == b"before the FIN"
    sock.close()


def test_client_reset_reaches_the_server(topo, servers):
    sink = servers["sink"]
    before = len(sink.outcomes)
    sock = connect(topo, SERVER, 9)
    sock.sendall(b"x" * 1000)
    time.sleep(0.2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # a RST
    deadline = time.monotonic() + 10
    while len(sink.outcomes) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sink.outcomes[before:] == ["ConnectionResetError"]


def test_server_reset_reaches_the_client(topo, servers):
    sock = connect(topo, SERVER, 13)
    sock.sendall(b"hello")
    with pytest.raises(ConnectionResetError):
        while sock.recv(100):
            pass
    sock.close()


def test_back_pressure_bounds_memory_while_the_client_does_not_read(topo, stack, servers):
    sock = topo.client.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(STALL)
    sock.connect((SERVER, 19))
    tcp_pid = process_pid(topo.host, "tcp.1", "workers.tcp")

    def rss() -> int:
        with open(f"/proc/{tcp_pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024

    before = rss()
    time.sleep(10)  # the server pushes 20 MB; nobody reads
    grown = rss() - before
    got = read_all(sock)
    sock.close()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload()).digest()
    # While stalled the worker held at most its buffers (1 MiB send buffer, a socket read), not the 20 MB.
    assert grown < 8 * 1024 * 1024, grown
    held = [r for r in stack.records() if r.get("event") == "relay_flow" and r["dport"] == 19]
    assert held and held[-1]["bytes_down"] == SIZE


@pytest.mark.parametrize("server", [SERVER, SERVER6])
def test_refused_upstream_is_a_reset(topo, stack, server):
    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        connect(topo, server, 4)
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("absent", [ABSENT, "2001:db8::99"])
def test_unreachable_upstream_is_icmp_host_unreachable(topo, stack, absent):
    with pytest.raises(OSError) as err:
        connect(topo, absent, 80, timeout=30)
    assert err.value.errno == 113  # EHOSTUNREACH: the ICMP error, not a time-out


def test_silent_upstream_times_out_without_an_answer(topo, stack):
    # The server namespace swallows SYNs to port 81: the connect never completes upstream, and the
    # client must see neither a handshake nor a reset, only its own time-out.
    topo.server.run("nft", "-f", "-", input=b"""table inet ustack_silent {
  chain in { type filter hook input priority 0; tcp dport 81 drop; }
}""")
    try:
        with pytest.raises(TimeoutError):
            connect(topo, SERVER, 81, timeout=10)
    finally:
        topo.server.run("nft", "delete", "table", "inet", "ustack_silent")
    stack.wait_for(lambda rs: any(r.get("event") == "relay_flow" and r.get("reason") == "upstream_timeout"
                                  for r in rs), what="upstream_timeout record")


def test_denied_destination_stays_unreachable(topo, stack, servers):
    # 169.254.169.254 is served in the host namespace, where the relay's sockets live: refused.
    with pytest.raises(ConnectionRefusedError):
        connect(topo, METADATA, 80)
    stack.wait_for(lambda rs: any(r.get("event") == "relay_denied" and r["dst"] == METADATA for r in rs),
                   what="relay_denied record")
    assert servers["metadata"].accepted == 0


def test_host_alias_reaches_the_loopback_where_the_stack_runs(topo, servers):
    # USTACK_HOST_ALIAS=10.0.2.2 (like slirp4netns): the one way to the host's loopback, asked for.
    sock = connect(topo, "10.0.2.2", 8081)
    sock.sendall(b"to the host")
    sock.shutdown(socket.SHUT_WR)
    assert read_all(sock) == b"to the host"
    sock.close()
    assert servers["host_loopback"].accepted == 1


def test_flow_records_and_the_guard(topo, stack, servers):
    sock = connect(topo, SERVER, 7)
    sock.sendall(b"x" * 5000)
    sock.shutdown(socket.SHUT_WR)
    assert len(read_all(sock)) == 5000
    sock.close()
    stack.wait_for(lambda rs: any(r.get("event") == "relay_flow" and r.get("bytes_up") == 5000
                                  and r.get("bytes_down") == 5000 for r in rs), what="the echo's flow record")
    record = next(r for r in stack.records() if r.get("event") == "relay_flow" and r.get("bytes_up") == 5000)
    assert record["proto"] == "tcp" and record["dst"] == SERVER and record["dport"] == 7
    assert record["reason"] == "closed" and "retransmissions" in record and record["duration"] >= 0
    assert topo.escaped() == 0


def test_published_port_relays_inbound_connections_into_the_namespace(topo):
    # A second stack on its own topology, publishing host port 8080 to the namespace's port 80.
    t = Topology()
    try:
        s = attached_stack(t, env={"USTACK_PUBLISH": "tcp:8080:80"})
        try:
            inside = Server(t.client, "10.0.0.1", 80, echo)  # a server in the attached namespace
            outside = t.host.socket()  # a client where the stack runs
            outside.settimeout(STALL)
            for _ in range(50):  # the workers listen once they have started
                try:
                    outside.connect(("127.0.0.1", 8080))
                    break
                except ConnectionRefusedError:
                    time.sleep(0.1)
            data = payload(2 * 1024 * 1024)
            assert echo_through(outside, data, 60) == data
            assert inside.accepted == 1
            # The published port takes IPv6 clients too: to the namespace's IPv6 address.
            inside6 = Server(t.client, "fd00::1", 80, echo, family=socket.AF_INET6)
            outside6 = t.host.socket(socket.AF_INET6)
            outside6.settimeout(STALL)
            outside6.connect(("::1", 8080))
            assert echo_through(outside6, data[:65536], 60) == data[:65536]
            assert inside6.accepted == 1
            inside6.close()
            s.wait_for(lambda rs: any(r.get("event") == "relay_flow" and r.get("src") == "127.0.0.1"
                                      and r.get("published") == 8080 and r.get("dport") == 80 for r in rs),
                       what="the published flow's record, naming its client")
            # Nobody listening inside: the outer client is reset, not left hanging.
            inside.close()
            refused = t.host.socket()
            refused.settimeout(STALL)
            with pytest.raises(ConnectionResetError):
                refused.connect(("127.0.0.1", 8080))  # accepted where the stack runs, then reset
                refused.recv(10)  # (the reset may come before connect() even returns)
            refused.close()
        finally:
            s.stop()
    finally:
        t.delete()


def test_upstream_sockets_keep_alive_like_our_tcp(topo, servers):
    """TCP_KEEPALIVE applies to the real upstream socket too (idle, interval, probes)."""
    with connect(topo, SERVER, 7) as sock:
        sock.sendall(b"hello\n")
        assert sock.recv(100) == b"hello\n"
        shown = topo.host.run("ss", "-tnoH", "state", "established", "dst", SERVER).stdout.decode()
    assert "timer:(keepalive," in shown, shown
