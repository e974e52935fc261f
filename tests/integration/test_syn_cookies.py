"""SYN cookies against the kernel's TCP: a cookie connection keeps window scaling, SACK and
timestamps (RFC 4987 §3.6 costs avoided as Linux does, options in the TSval).

The SYN queue is one connection long and held by a half-open connection from
an address nobody answers for, so the kernel client's SYN is answered with a
cookie.
"""

import hashlib
import socket

from scapy.layers.inet import IP, TCP

from tests.integration.netns import STACK_ADDR, Stack, exchange

SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; Python's socket module lacks the name
NOBODY = "10.0.0.77"  # on the device's subnet, not the kernel's: our SYN-ACK to it goes nowhere


def _options(tcp) -> dict:
    return {name: value for name, value in tcp.options}


def test_cookie_connection_keeps_window_scale_sack_and_timestamps(fresh_ns):
    ns = fresh_ns
    stack = Stack(ns, env={"TCP_SYN_QUEUE": "1", "LOG_LEVEL": "debug"})
    try:
        stack.wait_ready()
        sender = ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        with sender:
            half_open = IP(src=NOBODY, dst=STACK_ADDR) / TCP(sport=40404, dport=7, flags="S", seq=1)
            sender.sendto(bytes(half_open), (STACK_ADDR, 0))
        stack.wait_for(lambda recs: any(r["event"] == "tcp_state" and r.get("rport") == 40404
                                        and r["new"] == "SYN_RECEIVED" for r in recs),
                       10, "the half-open connection holding the SYN queue")
        sniffer = ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
        sniffer.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        data = hashlib.sha256(b"cookie").digest() * 4096  # 128 KiB
        with sniffer, ns.socket() as sock:
            port, echoed = exchange(sock, (STACK_ADDR, 7), data, timeout=10)
            assert echoed == data
            sniffer.setblocking(False)
            ours = []
            while True:
                try:
                    pkt = IP(sniffer.recv(1 << 17))
                except BlockingIOError:
                    break
                if pkt.src == STACK_ADDR and TCP in pkt and pkt[TCP].dport == port:
                    ours.append(pkt[TCP])
        synack = next(t for t in ours if t.flags.S)
        offered = _options(synack)
        assert "WScale" in offered and "SAckOK" in offered and "Timestamp" in offered
        later = [t for t in ours if not t.flags.S]
        assert later and all("Timestamp" in _options(t) for t in later)  # the connection kept them
    finally:
        stack.stop()
    stopped = [r for r in stack.records() if r["event"] == "worker_stopped" and r["proc"].startswith("tcp")]
    assert stopped and stopped[0].get("syn_cookies_sent", 0) >= 1 and stopped[0].get("syn_cookies_accepted") == 1
