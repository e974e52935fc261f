"""Vectors, not packets: bursts that mix flows, families, protocols and workers keep each flow's order.

Ingress drains the device and sends each worker its share of a burst as one
message; a worker handles the whole vector and sends what it caused to
egress as one message. Here the kernel sends, at the same time, numbered
UDP datagrams on several flows of both families, pings of both families,
and TCP streams to two TCP workers: every datagram's answer comes back in
the order its flow sent it, every stream comes back intact, and the stack's
TCP receiver saw no segment out of order (a lossless path: any would be ours).
(A worker that dies holding half a burst costs only its own flows:
test_scaling.py's killed-worker test.)
"""

import concurrent.futures
import hashlib
import json
import socket
import threading

import pytest

from tests.integration.netns import HOST_ADDR, HOST_ADDR6, STACK_ADDR, STACK_ADDR6, Stack

UDP_FLOWS = 6     # half of them IPv6
DATAGRAMS = 150   # per flow, sent back to back
TCP_FLOWS = 16    # over two workers, both families (all on one: 2 in 65,536)
STREAM = 512 * 1024


@pytest.fixture(scope="module")
def stack(ns):
    s = Stack(ns, "-c", "tcp=2", env={"LOG_LEVEL": "debug"})
    try:
        s.wait_ready({"icmp": 1, "udp": 1, "tcp": 2})
        yield s
    finally:
        s.stop()


def kernel_drops(ns) -> int:
    """Packets the kernel dropped on their way to ingress (the device's queue) or to a client socket."""
    [link] = json.loads(ns.run("ip", "-s", "-j", "link", "show", "ustack0").stdout)
    counts = {}
    for table in ("/proc/net/snmp", "/proc/net/snmp6"):
        lines = ns.run("cat", table).stdout.decode().splitlines()
        if table.endswith("6"):
            counts.update(line.split() for line in lines if line.strip())
        else:
            names, values = [line.split() for line in lines if line.startswith("Udp:")]
            counts.update(zip(names[1:], values[1:]))
    return link["stats64"]["tx"]["dropped"] + int(counts["RcvbufErrors"]) + int(counts["Udp6RcvbufErrors"])


def udp_flow(ns, i: int) -> list[int]:
    """Send DATAGRAMS numbered datagrams to the echo service at once; the numbers in answer order."""
    af, addr = (socket.AF_INET6, STACK_ADDR6) if i % 2 else (socket.AF_INET, STACK_ADDR)
    with ns.socket(af, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.settimeout(5)
        sock.connect((addr, 7))
        for n in range(DATAGRAMS):
            sock.send(f"{i}:{n}".encode().ljust(100, b"."))
        got = []
        try:
            while len(got) < DATAGRAMS:
                flow, n = sock.recv(200).rstrip(b".").decode().split(":")
                assert int(flow) == i
                got.append(int(n))
        except TimeoutError:
            pass
        return got


def tcp_flow(ns, i: int) -> tuple[str, str]:
    """STREAM bytes to the echo service, read back while sending (both ways at once), then FIN."""
    af, addr = (socket.AF_INET6, STACK_ADDR6) if i % 2 else (socket.AF_INET, STACK_ADDR)
    data = hashlib.sha512(str(i).encode()).digest() * (STREAM // 64)
    with ns.socket(af) as sock:
        sock.settimeout(60)
        sock.connect((addr, 7))

        def send() -> None:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send)
        sender.start()
        back = bytearray()
        while chunk := sock.recv(65536):
            back += chunk
        sender.join()
    return hashlib.sha256(data).hexdigest(), hashlib.sha256(back).hexdigest()


def test_a_mixed_burst_keeps_every_flows_order(ns, stack):
    dropped_before = kernel_drops(ns)
    with concurrent.futures.ThreadPoolExecutor(UDP_FLOWS + TCP_FLOWS + 2) as pool:
        pings = [pool.submit(ns.run, "ping", "-c", "100", "-i", "0.002", "-q", addr)
                 for addr in (STACK_ADDR, STACK_ADDR6)]
        udp = [pool.submit(udp_flow, ns, i) for i in range(UDP_FLOWS)]
        tcp = [pool.submit(tcp_flow, ns, i) for i in range(TCP_FLOWS)]
        for p in pings:
            assert p.result().returncode == 0
        missing = 0
        for i, f in enumerate(udp):
            got = f.result()
            assert got and got == sorted(got), f"flow {i} came back out of order: {got}"
            missing += DATAGRAMS - len(got)
        for f in tcp:
            sent, back = f.result()
            assert back == sent
    assert missing <= kernel_drops(ns) - dropped_before, f"{missing} datagrams lost that the kernel did not drop"
    stack.wait_for(lambda recs: sum(r["event"] == "tcp_closed" and r.get("lport") == 7
                                    and r.get("remote") in (HOST_ADDR, HOST_ADDR6) for r in recs) >= TCP_FLOWS,
                   15, "every stream closed")
    closed = [r for r in stack.records() if r["event"] == "tcp_closed" and r.get("lport") == 7]
    assert {r["proc"] for r in closed} == {"tcp.1", "tcp.2"}, closed  # the burst crossed both workers
    assert all(r["ooo_segments"] == 0 for r in closed), closed
