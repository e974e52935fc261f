"""Attach mode, UDP and ICMP echo: datagrams and pings relayed to real hosts, real answers back.

Every server is one this test runs in a namespace it made (``attach_topology``).
"""

import errno
import socket
import time

import pytest

from tests.integration.attach_topology import ABSENT, METADATA, SERVER, SERVER6, UdpServer, attached_stack

ABSENT6 = "2001:db8::99"  # on the server's link, where nobody has it
BIG = 3000  # a datagram larger than the MTU: fragmented toward the namespace


@pytest.fixture(scope="module")
def stack(topo):
    s = attached_stack(topo, env={"USTACK_UDP_IDLE": "2", "USTACK_PUBLISH": "udp:5353:53"})
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def udp_servers(topo, stack):
    made = [UdpServer(topo.server, SERVER, 7, lambda data: data),
            UdpServer(topo.server, SERVER, 5, lambda data: bytes(range(256)) * (BIG // 256) + b"x" * (BIG % 256)),
            UdpServer(topo.host, METADATA, 53, lambda data: data),
            UdpServer(topo.server, SERVER6, 7, lambda data: data, socket.AF_INET6)]
    yield made
    for server in made:
        server.close()


def udp_client(topo, address: str, port: int) -> socket.socket:
    sock = topo.client.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.connect((address, port))
    return sock


@pytest.mark.parametrize("server", [SERVER, SERVER6])
def test_udp_echo_through_a_real_socket(topo, udp_servers, server):
    # 3,000 bytes: fragmented by the client's kernel, reassembled by ingress, relayed whole, and the
    # answer fragmented by us toward the namespace.
    sock = udp_client(topo, server, 7)
    for size in (1, 512, 1400, 3000):
        data = bytes([size % 251]) * size
        sock.send(data)
        assert sock.recv(65535) == data
    sock.close()


def test_udp_datagram_larger_than_the_mtu_comes_back_fragmented(topo, udp_servers):
    sock = udp_client(topo, SERVER, 5)
    sock.send(b"?")
    assert sock.recv(65535) == bytes(range(256)) * (BIG // 256) + b"x" * (BIG % 256)
    sock.close()


@pytest.mark.parametrize("server", [SERVER, SERVER6])
def test_udp_port_unreachable_upstream_reaches_the_client(topo, stack, server):
    sock = udp_client(topo, server, 4)
    with pytest.raises(ConnectionRefusedError):
        for _ in range(5):  # the ICMP error comes back after the first datagram
            sock.send(b"anyone?")
            time.sleep(0.3)
            sock.recv(100)
    sock.close()


def test_udp_to_a_denied_destination_is_administratively_prohibited(topo, stack, udp_servers):
    sock = udp_client(topo, METADATA, 53)
    with pytest.raises(OSError) as err:
        for _ in range(5):
            sock.send(b"metadata?")
            time.sleep(0.3)
            sock.recv(100)
    assert err.value.errno in (errno.EACCES, errno.EHOSTUNREACH)  # ICMP code 13 on Linux: EACCES
    assert udp_servers[2].received == 0
    sock.close()


def test_udp_flow_record_when_idle(topo, stack, udp_servers):
    sock = udp_client(topo, SERVER, 7)
    sock.send(b"a" * 100)
    assert sock.recv(200) == b"a" * 100
    port = sock.getsockname()[1]
    sock.close()
    stack.wait_for(lambda rs: any(r.get("event") == "relay_flow" and r.get("proto") == "udp"
                                  and r.get("sport") == port and r.get("reason") == "idle"
                                  and r.get("bytes_up") == 100 and r.get("bytes_down") == 100 for r in rs),
                   timeout=10, what="the UDP flow's record")


def test_published_udp_port_relays_into_the_namespace_and_back(topo, stack):
    inside = UdpServer(topo.client, "10.0.0.1", 53, lambda data: b"answer to " + data)
    try:
        senders = [topo.host.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        for i, sock in enumerate(senders):  # two senders, each answered on its own
            sock.settimeout(5)
            sock.sendto(f"question {i}".encode(), ("127.0.0.1", 5353))
            data, source = sock.recvfrom(100)
            assert data == f"answer to question {i}".encode() and source == ("127.0.0.1", 5353)
            sock.close()
        assert inside.received == 2
    finally:
        inside.close()


def test_udp_to_an_absent_host_gets_host_unreachable(topo, stack):
    """The host namespace's kernel finds no neighbour for ABSENT and says so to our upstream socket
    (IP_RECVERR); the relay passes ICMP host unreachable on to the client."""
    sock = udp_client(topo, ABSENT, 7)
    sock.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR: the client sees host unreachable too
    sock.settimeout(0.5)
    error = None
    deadline = time.monotonic() + 15
    while error is None and time.monotonic() < deadline:
        sock.send(b"anyone?")  # a client retrying, as DNS does; also keeps the flow from idling out
        try:
            sock.recv(100)
        except TimeoutError:
            continue
        except OSError as exc:
            error = exc.errno
    sock.close()
    assert error == errno.EHOSTUNREACH
    stack.wait_for(lambda rs: any(r.get("event") == "relay_flow" and r.get("reason") == "upstream_unreachable"
                                  for r in rs), what="relay_flow closed as upstream_unreachable")


def test_ping_of_a_real_host_gets_its_real_answers(topo, stack):
    done = topo.client.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "-s", "1000", SERVER, check=False)
    assert done.returncode == 0, done.stdout
    assert b"3 received" in done.stdout


def test_ping_of_an_absent_host_gets_no_answer(topo, stack):
    done = topo.client.run("ping", "-c", "2", "-W", "3", ABSENT, check=False)
    assert done.returncode != 0 and b" 0 received" in done.stdout


def test_ping_of_a_host_that_ignores_echo_gets_no_fake_answer(topo, stack):
    topo.server.run("nft", "-f", "-", input=b"""table inet ustack_mute {
  chain in { type filter hook input priority 0; icmp type echo-request drop; }
}""")
    try:
        done = topo.client.run("ping", "-c", "2", "-W", "2", SERVER, check=False)
    finally:
        topo.server.run("nft", "delete", "table", "inet", "ustack_mute")
    assert done.returncode != 0 and b" 0 received" in done.stdout


def test_ping6_of_a_real_host_gets_its_real_answers(topo, stack):
    done = topo.client.run("ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "-s", "1000", SERVER6, check=False)
    assert done.returncode == 0, done.stdout
    assert b"3 received" in done.stdout


def test_ping6_of_an_absent_host_gets_no_answer(topo, stack):
    done = topo.client.run("ping", "-6", "-c", "2", "-W", "3", ABSENT6, check=False)
    assert done.returncode != 0 and b" 0 received" in done.stdout


def test_ping6_of_a_host_that_ignores_echo_gets_no_fake_answer(topo, stack):
    topo.server.run("nft", "-f", "-", input=b"""table inet ustack_mute6 {
  chain in { type filter hook input priority 0; icmpv6 type echo-request drop; }
}""")
    try:
        done = topo.client.run("ping", "-6", "-c", "2", "-W", "2", SERVER6, check=False)
    finally:
        topo.server.run("nft", "delete", "table", "inet", "ustack_mute6")
    assert done.returncode != 0 and b" 0 received" in done.stdout


def test_ping_of_a_denied_destination_is_refused(topo, stack):
    done = topo.client.run("ping", "-c", "1", "-W", "2", METADATA, check=False)
    assert done.returncode != 0 and b" 0 received" in done.stdout
    stack.wait_for(lambda rs: any(r.get("event") == "relay_denied" and r.get("proto") == "icmp" for r in rs),
                   what="relay_denied record for the ping")
    assert topo.escaped() == 0
