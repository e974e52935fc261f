"""ICMP and UDP through the real pipeline, both families, against the kernel's own ping and sockets."""

import socket

import pytest


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
