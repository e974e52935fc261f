"""Attach mode: the address relayed flows leave from, and ping where the host refuses echo sockets.

The servers are this test's own, in the server namespace it made, and report
the address each client came from; the nftables guard of ``attach_topology``
proves nothing else was reached.
"""

import socket
import time

import pytest

from tests.integration.attach_topology import SERVER, SERVER6, Server, Topology, attached_stack
from tests.integration.netns import Stack

OUTBOUND, OUTBOUND6 = "192.0.2.2", "2001:db8::2"  # second addresses of the host namespace's veth


def report_peer(conn: socket.socket) -> str:
    conn.sendall(conn.getpeername()[0].encode())
    return "reported"


@pytest.fixture(scope="module")
def outbound_stack(topo):
    topo.host.run("ip", "addr", "add", f"{OUTBOUND}/24", "dev", "ve-host")
    topo.host.run("ip", "addr", "add", f"{OUTBOUND6}/64", "dev", "ve-host", "nodad")
    stack = attached_stack(topo, env={"USTACK_OUTBOUND_ADDR": OUTBOUND, "USTACK_OUTBOUND_ADDR6": OUTBOUND6})
    try:
        yield stack
    finally:
        stack.stop()


def peer_seen(topo, address: str, port: int) -> str:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with topo.client.socket(family) as sock:
        sock.settimeout(15)
        sock.connect((address, port))
        return sock.recv(100).decode()


@pytest.mark.parametrize("address,expected", [(SERVER, OUTBOUND), (SERVER6, OUTBOUND6)])
def test_relayed_tcp_leaves_from_the_outbound_address(topo, outbound_stack, address, expected):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    server = Server(topo.server, address, 7000, report_peer, family=family)
    try:
        assert peer_seen(topo, address, 7000) == expected  # not 192.0.2.1 / 2001:db8::1, the veth's first
    finally:
        server.close()
    assert topo.escaped() == 0


def test_relayed_udp_leaves_from_the_outbound_address(topo, outbound_stack):
    with topo.server.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
            topo.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        server.bind((SERVER, 7001))
        server.settimeout(15)
        client.sendto(b"who am I", (SERVER, 7001))
        _, (source, _) = server.recvfrom(100)
    assert source == OUTBOUND


def test_an_outbound_address_that_is_not_local_stops_the_stack_with_the_reason(topo):
    stack = Stack(topo.host, env={"USTACK_ATTACH": topo.client.name, "USTACK_OUTBOUND_ADDR": "192.0.2.250"})
    rc = stack.proc.wait(timeout=15)
    stack.stop()
    log = "\n".join(stack.lines())
    assert rc == 78, log
    assert log.count("USTACK_OUTBOUND_ADDR=192.0.2.250: not an address of this network namespace") == 1, log
    assert "process_died" not in log


def refused(stack: Stack) -> int:
    icmp = next(p for p in stack.status()["processes"] if p["role"] == "icmp")
    return icmp["stats"].get("relay_ping_refused", 0)


def test_ping_where_the_host_refuses_echo_sockets_is_answered_and_explained():
    """A new namespace refuses unprivileged echo sockets (net.ipv4.ping_group_range "1 0"): the
    stack says so once with the fix, counts each refused ping and answers it, never silence."""
    topo = Topology()  # its own: the module's is attached to the outbound stack
    topo.host.run("sysctl", "-qw", "net.ipv4.ping_group_range=1 0")
    stack = attached_stack(topo)
    try:
        stack.wait_for(lambda rs: any(r.get("event") == "ping_refused_by_host" and "ping_group_range" in r.get("fix", "")
                                      for r in rs), what="the warning at start")
        done = topo.client.run("ping", "-c", "2", "-W", "2", SERVER, check=False)
        assert done.returncode != 0 and b"Packet filtered" in done.stdout, done.stdout  # ICMP 3/13
        deadline = time.monotonic() + 10  # the counters reach stackctl with the next heartbeat
        while refused(stack) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert refused(stack) == 2
        # Fixed while running: relayed pings work once the refused flow has gone idle (10 s).
        topo.host.run("sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647")
        done = topo.client.run("ping", "-c", "1", "-W", "2", SERVER, check=False)  # a new ping: a new identifier
        assert done.returncode == 0, done.stdout
        assert topo.escaped() == 0
    finally:
        stack.stop()
        topo.delete()
