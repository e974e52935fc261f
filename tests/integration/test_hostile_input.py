"""Malformed packets injected onto the device are dropped and counted; the stack keeps serving.

Packets are built with scapy (a test-only, independent implementation) and
written, unrepaired, from the kernel's side of the TUN device through an
AF_PACKET socket: a raw IP socket would fix lengths and checksums for us.
"""

import socket
import struct

from scapy.layers.inet import ICMP, IP, TCP, UDP

from tests.integration.netns import HOST_ADDR, STACK_ADDR

ETH_P_IP = 0x0800
TUN = "ustack0"


def _ip(**kw):
    return IP(src=HOST_ADDR, dst=STACK_ADDR, **kw)


def _with_bad_l4_checksum(pkt) -> bytes:
    raw = bytearray(bytes(pkt))
    ihl = (raw[0] & 0x0F) * 4
    offset = {1: 2, 6: 16, 17: 6}[raw[9]]
    raw[ihl + offset] ^= 0x5A  # corrupt the transport checksum, keep the IP header valid
    return bytes(raw)


MALFORMED = {
    "ip_bad_header_checksum": (bytes(_ip(chksum=0x1234) / ICMP()), "bad_checksum"),
    "ip_bad_ihl": (bytes(_ip(ihl=3) / ICMP()), "bad_ihl"),
    "ip_total_length_too_big": (bytes(_ip(len=200) / ICMP()), "bad_total_length"),
    "ip_truncated_header": (bytes(_ip() / ICMP())[:12], "truncated"),
    "icmp_bad_checksum": (_with_bad_l4_checksum(_ip() / ICMP() / b"payload"), "bad_checksum"),
    "udp_bad_checksum": (_with_bad_l4_checksum(_ip() / UDP(sport=5000, dport=7) / b"echo?"), "bad_checksum"),
    "udp_bad_length": (bytes(_ip() / UDP(sport=5000, dport=7, len=99, chksum=0) / b"x"), "bad_length"),
    "tcp_bad_checksum": (_with_bad_l4_checksum(_ip() / TCP(sport=5000, dport=8000, flags="S")), "bad_checksum"),
    "tcp_bad_data_offset": (bytes(_ip() / TCP(sport=5000, dport=8000, flags="S", dataofs=15)), "bad_data_offset"),
    # RFC 791 §3.2: a fragment with more to come holds a multiple of 8 octets (this one 12).
    "ip_fragment_odd_length": (bytes(_ip(flags="MF") / UDP(sport=5000, dport=7) / b"frag"), "fragment_odd_length"),
}


def _inject(ns, raw: bytes) -> None:
    sock = ns.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    with sock:
        sock.sendto(raw, (TUN, ETH_P_IP))


def test_malformed_packets_are_dropped_counted_and_logged(ns, stack):
    for raw, _ in MALFORMED.values():
        _inject(ns, raw)
    expected = {reason for _, reason in MALFORMED.values()}
    stack.wait_for(lambda recs: expected <= {r.get("reason") for r in recs if r["event"] == "drop"},
                   timeout=10, what=f"drop lines for {sorted(expected)}")
    # Not a single traceback or crash anywhere.
    assert not [line for line in stack.lines() if "Traceback" in line or "stopped (rc=" in line]


def test_still_serving_after_garbage(ns, stack):
    for i in range(200):
        _inject(ns, struct.pack("!B", 0x45) + bytes((i * 7 + k) % 256 for k in range(i % 60)))
    done = ns.run("ping", "-c", "3", "-i", "0.2", "-W", "2", STACK_ADDR)
    assert b" 0% packet loss" in done.stdout
    sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(3)
    with sock:
        sock.sendto(b"still here", (STACK_ADDR, 7))
        assert sock.recv(100) == b"still here"


def test_unknown_protocol_gets_protocol_unreachable(ns, stack):
    sock = ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(3)
    with sock:
        _inject(ns, bytes(_ip(proto=253) / b"unknown transport"))
        while True:
            data = sock.recv(2048)
            ihl = (data[0] & 0x0F) * 4
            if data[ihl] == 3:  # destination unreachable
                break
    assert data[ihl + 1] == 2  # code 2: protocol unreachable
    assert data[ihl + 8 + 9] == 253  # quoting our packet's header


def test_drops_are_counted_at_shutdown(ns, stack):
    stack.stop()
    stopped = {r["proc"]: r for r in stack.records() if r["event"] in ("ingress_stopped", "worker_stopped")}
    assert stopped["ingress.1"].get("drop_bad_checksum", 0) >= 1
    assert stopped["ingress.1"].get("drop_fragment_odd_length", 0) >= 1
    assert sum(v for k, v in stopped["udp.1"].items() if k.startswith("drop_")) >= 2
    assert stopped["tcp.1"].get("drop_bad_checksum", 0) >= 1
