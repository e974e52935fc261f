"""ICMP and UDP through the real pipeline, both families, against the kernel's own ping and sockets."""

import socket

import pytest
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

from tests.integration.conftest import FAMILIES
from tests.integration.netns import Stack


def _ping(ns, family, *args: str):
    return ns.run("ping", "-c", "3", "-i", "0.2", "-W", "2", *args, family.stack, check=False)


def test_ping(ns, stack, family):
    done = ns.run("ping", "-c", "5", "-i", "0.2", "-W", "2", family.stack)
    assert b" 0% packet loss" in done.stdout, done.stdout


def test_ping_large_payload(ns, stack, family):
    done = _ping(ns, family, "-s", "1400", "-p", "a5")
    assert b" 0% packet loss" in done.stdout, done.stdout
    assert b"1408 bytes from" in done.stdout  # the reply carries the whole payload


def test_ping_fragmented_both_ways(ns, stack, family):
    """4,000 bytes: the kernel fragments the request, we reassemble it and fragment the reply."""
    done = _ping(ns, family, "-s", "4000", "-p", "5a")
    assert b" 0% packet loss" in done.stdout, done.stdout
    assert b"4008 bytes from" in done.stdout
    assert not [r for r in stack.records() if r.get("reason", "").startswith("fragment_")]  # no reassembly drop


def _udp(ns, family, port: int, payload: bytes) -> bytes:
    sock = ns.socket(family.af, socket.SOCK_DGRAM)
    sock.settimeout(3)
    with sock:
        sock.connect((family.stack, port))
        sock.send(payload)
        return sock.recv(65535)


def test_udp_line_service_reverses(ns, stack, family):
    assert _udp(ns, family, 8000, b"  hello world \n") == b"dlrow olleh\n"
    assert _udp(ns, family, 8000, "añb".encode()) == "bña\n".encode()


@pytest.mark.parametrize("size", [0, 1, 512, 1452, 3000])
def test_udp_echo(ns, stack, family, size):
    """Up to the largest unfragmented datagram of both families (1452), and 3,000 bytes fragmented both ways."""
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert _udp(ns, family, 7, payload) == payload


def test_udp_closed_port_is_unreachable(ns, stack, family):
    # A connected UDP socket reports the ICMP (or ICMPv6) port unreachable as ECONNREFUSED.
    with pytest.raises(ConnectionRefusedError):
        _udp(ns, family, 4444, b"anyone?")


def test_udp_many_datagrams_in_flight(ns, stack, family):
    sock = ns.socket(family.af, socket.SOCK_DGRAM)
    sock.settimeout(3)
    with sock:
        sock.connect((family.stack, 7))
        sent = {f"datagram {i}".encode() for i in range(64)}
        for d in sent:
            sock.send(d)
        got = {sock.recv(2048) for _ in sent}
    assert got == sent


def test_ipv6_off_is_ipv4_only(fresh_ns):
    """USTACK_IPV6=0: no IPv6 address on the kernel side, IPv6 packets a counted drop, IPv4 served."""
    stack = Stack(fresh_ns, env={"USTACK_IPV6": "0"})
    try:
        stack.wait_ready()
        assert b"fd00::1" not in fresh_ns.run("ip", "-6", "addr", "show", "dev", "ustack0").stdout
        assert b" 0% packet loss" in _ping(fresh_ns, FAMILIES["ipv4"]).stdout
        sock = fresh_ns.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        with sock:  # written onto the device from the kernel's side, as the kernel would send it
            sock.sendto(bytes(IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest()), ("ustack0", 0x86DD))
    finally:
        stack.stop()
    [stopped] = [r for r in stack.records() if r["event"] == "ingress_stopped"]
    assert stopped.get("drop_not_ipv4", 0) >= 1
