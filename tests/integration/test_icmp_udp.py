"""ICMP and UDP through the real pipeline, against the kernel's own ping and sockets."""

import socket

import pytest

from tests.integration.netns import STACK_ADDR


def test_ping(ns, stack):
    done = ns.run("ping", "-c", "5", "-i", "0.2", "-W", "2", STACK_ADDR)
    assert b" 0% packet loss" in done.stdout, done.stdout


def test_ping_large_payload(ns, stack):
    done = ns.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "-s", "1400", "-p", "a5", STACK_ADDR)
    assert b" 0% packet loss" in done.stdout, done.stdout
    assert b"1408 bytes from" in done.stdout  # the reply carries the whole payload


def _udp(ns, port: int, payload: bytes) -> bytes:
    sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(3)
    with sock:
        sock.connect((STACK_ADDR, port))
        sock.send(payload)
        return sock.recv(65535)


def test_udp_line_service_reverses(ns, stack):
    assert _udp(ns, 8000, b"  hello world \n") == b"dlrow olleh\n"
    assert _udp(ns, 8000, "añb".encode()) == "bña\n".encode()


@pytest.mark.parametrize("size", [0, 1, 512, 1472])
def test_udp_echo(ns, stack, size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert _udp(ns, 7, payload) == payload


def test_udp_closed_port_is_unreachable(ns, stack):
    # A connected UDP socket reports the ICMP port unreachable as ECONNREFUSED.
    with pytest.raises(ConnectionRefusedError):
        _udp(ns, 4444, b"anyone?")


def test_udp_many_datagrams_in_flight(ns, stack):
    sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(3)
    with sock:
        sock.connect((STACK_ADDR, 7))
        sent = {f"datagram {i}".encode() for i in range(64)}
        for d in sent:
            sock.send(d)
        got = {sock.recv(2048) for _ in sent}
    assert got == sent
