"""Malformed packets and fragments injected onto the device, both families.

Malformed ones are dropped and counted (or, where RFC 8200 says so, answered
with a Parameter Problem) and the stack keeps serving; fragments in any
order, duplicated or tiny are reassembled and answered, overlapping ones
discard their datagram, and a flood of datagrams never completed stays
within the reassembler's bounds.

Packets are built with scapy (a test-only, independent implementation) and
written, unrepaired, from the kernel's side of the TUN device through an
AF_PACKET socket: a raw IP socket would fix lengths and checksums for us.
"""

import random
import socket
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import (ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                                IPv6ExtHdrRouting, PadN, fragment6)

from tests.integration.netns import HOST_ADDR, HOST_ADDR6, STACK_ADDR, STACK_ADDR6, Stack

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
TUN = "ustack0"


def _ip(**kw):
    return IP(src=HOST_ADDR, dst=STACK_ADDR, **kw)


def _ip6(**kw):
    return IPv6(src=HOST_ADDR6, dst=STACK_ADDR6, **kw)


def _with_bad_l4_checksum6(pkt, offset: int) -> bytes:
    raw = bytearray(bytes(pkt))
    raw[40 + offset] ^= 0x5A
    return bytes(raw)


def _zero_udp_checksum6(pkt) -> bytes:
    raw = bytearray(bytes(pkt))
    raw[46:48] = b"\x00\x00"
    return bytes(raw)


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
    # IPv6 and its extension headers (RFC 8200 §3, §4).
    "ipv6_payload_length_too_big": (bytes(_ip6(plen=500) / ICMPv6EchoRequest()), "bad_payload_length"),
    "ipv6_multicast_source": (bytes(IPv6(src="ff02::1", dst=STACK_ADDR6) / ICMPv6EchoRequest()), "multicast_source"),
    "ipv6_truncated_extension": (bytes(_ip6(nh=60) / b"\x3a"), "truncated"),
    "ipv6_option_discard": (bytes(_ip6() / IPv6ExtHdrDestOpt(options=[PadN(otype=0x45, optdata=b"ab")])
                                  / ICMPv6EchoRequest()), "unrecognized_option"),
    "icmpv6_bad_checksum": (_with_bad_l4_checksum6(_ip6() / ICMPv6EchoRequest(data=b"x"), 2), "bad_checksum"),
    "udp6_zero_checksum": (_zero_udp_checksum6(_ip6() / UDP(sport=5000, dport=7) / b"zero"), "zero_checksum"),
    "tcp6_bad_checksum": (_with_bad_l4_checksum6(_ip6() / TCP(sport=5000, dport=8000, flags="S"), 16),
                          "bad_checksum"),
}

# RFC 8200 §4 / RFC 4443 §3.4: answered with a Parameter Problem (code, pointer).
PARAM_PROBLEMS = {
    "unknown_next_header": (bytes(_ip6(nh=253) / b"12345678"), 1, 6),
    "option_discard_and_answer": (bytes(_ip6() / IPv6ExtHdrDestOpt(options=[PadN(otype=0x85, optdata=b"ab")])
                                        / ICMPv6EchoRequest()), 2, 42),
    "routing_segments_left": (bytes(_ip6() / IPv6ExtHdrRouting(type=253, segleft=1, addresses=[HOST_ADDR6])
                                    / ICMPv6EchoRequest()), 0, 42),
    "hop_by_hop_not_first": (bytes(_ip6() / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / ICMPv6EchoRequest()), 1, 40),
    "fragment_not_multiple_of_8": (bytes(_ip6() / IPv6ExtHdrFragment(m=1, id=77) / ICMPv6EchoRequest(data=b"123")),
                                   0, 4),
}


def _inject(ns, *packets: bytes) -> None:
    sock = ns.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    with sock:
        for raw in packets:
            proto = ETH_P_IPV6 if raw and raw[0] >> 4 == 6 else ETH_P_IP
            sock.sendto(raw, (TUN, proto))


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
    # IPv6 with extension headers, truncated at every length and with bytes flipped.
    rng = random.Random(9)
    valid = bytes(_ip6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"xyz")])
                  / IPv6ExtHdrFragment(id=3) / UDP(sport=5000, dport=7) / b"payload")
    for cut in range(1, len(valid)):
        _inject(ns, valid[:cut])
    for _ in range(200):
        flipped = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        _inject(ns, bytes(flipped))
    for address in (STACK_ADDR, STACK_ADDR6):
        done = ns.run("ping", "-c", "3", "-i", "0.2", "-W", "2", address)
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


def _icmp_socket(ns, v6: bool) -> socket.socket:
    sock = ns.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                     socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    sock.settimeout(3)
    return sock


def _wait_icmp(sock, v6: bool, wanted, tries: int = 200) -> bytes:
    """The first ICMP(v6) message (without the IPv4 header) for which wanted(message) holds."""
    for _ in range(tries):
        data = sock.recv(65535)
        message = data if v6 else data[(data[0] & 0x0F) * 4:]
        if wanted(message):
            return message
    raise AssertionError("no such ICMP message")


@pytest.mark.parametrize("name", PARAM_PROBLEMS)
def test_ipv6_parameter_problems_are_answered(ns, stack, name):
    packet, code, pointer = PARAM_PROBLEMS[name]
    with _icmp_socket(ns, True) as sock:
        _inject(ns, packet)
        message = _wait_icmp(sock, True, lambda m: m[0] == 4)
    assert message[1] == code and struct.unpack_from("!I", message, 4)[0] == pointer
    assert message[8:48] == packet[:40]  # quoting our packet


def _echo(v6: bool, ident: int, size: int):
    payload = bytes(random.Random(ident).randrange(256) for _ in range(size))
    if v6:
        return _ip6() / IPv6ExtHdrFragment(id=ident) / ICMPv6EchoRequest(id=ident, seq=1, data=payload), payload
    return _ip(id=ident, flags=0) / ICMP(id=ident, seq=1) / payload, payload


def _fragments(v6: bool, ident: int, size: int, piece: int) -> tuple[list[bytes], bytes]:
    """An echo request of size bytes in fragments carrying piece bytes of data each."""
    request, payload = _echo(v6, ident, size)
    if v6:
        return [bytes(f) for f in fragment6(request, 40 + 8 + piece)], payload
    return [bytes(f) for f in fragment(request, fragsize=piece)], payload


def _reply_to(v6: bool, ident: int):
    echo_reply = 129 if v6 else 0
    return lambda m: m[0] == echo_reply and struct.unpack_from("!H", m, 4)[0] == ident


ORDERS = {
    "in_order": lambda f: f,
    "reversed": lambda f: f[::-1],
    "duplicated": lambda f: f + f[1:3] + f[:1],
    "shuffled": lambda f: random.Random(4).sample(f, len(f)),
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("piece", [1232, 8], ids=["mtu", "tiny"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_fragments_are_reassembled_and_answered(ns, stack, v6, piece, order):
    ident = random.randrange(1, 0xFFFF)
    size = 3000 if piece > 8 else 200
    pieces, payload = _fragments(v6, ident, size, piece)
    with _icmp_socket(ns, v6) as sock:
        _inject(ns, *ORDERS[order](pieces))
        reply = _wait_icmp(sock, v6, _reply_to(v6, ident))
    assert reply[8:] == payload  # the kernel reassembled our fragmented reply, when it had to be


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_overlapping_fragments_discard_the_datagram(ns, stack, v6):
    ident = random.randrange(1, 0xFFFF)
    pieces, _ = _fragments(v6, ident, 200, 16)
    wider, _ = _fragments(v6, ident, 200, 24)
    with _icmp_socket(ns, v6) as sock:
        # RFC 5722: bytes 24..48 overlap 16..32; every later fragment of it is dropped too.
        _inject(ns, pieces[0], wider[1], pieces[1], *pieces[2:])
        with pytest.raises(socket.timeout):
            _wait_icmp(sock, v6, _reply_to(v6, ident))
    stack.wait_for(lambda recs: any(r.get("reason") == "fragment_overlap" for r in recs), 5, "the overlap drop")


FIRST_FRAGMENTS = {v6: _fragments(v6, 1, 3000, 1232)[0][0] for v6 in (False, True)}  # scapy is slow: build once


def _first_fragment(v6: bool, ident: int, source: int) -> bytes:
    """The first fragment of a datagram (ident) from a flooding source, patched in place."""
    raw = bytearray(FIRST_FRAGMENTS[v6])
    if v6:  # source address, then the Fragment header's Identification (no IPv6 header checksum)
        raw[8:24] = socket.inet_pton(socket.AF_INET6, f"fd00::1:{source:x}")
        raw[44:48] = ident.to_bytes(4, "big")
        return bytes(raw)
    raw[4:6] = ident.to_bytes(2, "big")
    raw[12:16] = socket.inet_aton(f"10.0.{1 + source // 250}.{1 + source % 250}")
    raw[10:12] = b"\x00\x00"
    total = sum(struct.unpack("!10H", bytes(raw[:20])))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    raw[10:12] = (~total & 0xFFFF).to_bytes(2, "big")
    return bytes(raw)


def test_fragment_flood_stays_bounded_and_service_goes_on(ns, stack):
    """First fragments only, never completed: one source hits its bound, many sources the global one."""
    one_source = [_first_fragment(v6, ident, 0) for ident in range(1000, 1100) for v6 in (False, True)]
    many_sources = [_first_fragment(v6, 2000, source) for source in range(700) for v6 in (False, True)]
    # Room for the whole flood in the device's queue (default 500): it must reach ingress, not die in the qdisc.
    ns.run("ip", "link", "set", TUN, "txqueuelen", "5000")
    _inject(ns, *one_source)
    _inject(ns, *many_sources)
    reasons = {"fragment_source_limit", "fragment_evicted"}
    stack.wait_for(lambda recs: reasons <= {r.get("reason") for r in recs}, 10, f"drops {reasons}")
    # The kernel's own fragmented pings (from 10.0.0.1 and fd00::1, not the flooders) still get through.
    for address in (STACK_ADDR, STACK_ADDR6):
        done = ns.run("ping", "-c", "2", "-i", "0.2", "-W", "2", "-s", "4000", address)
        assert b" 0% packet loss" in done.stdout


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_datagram_never_completed_gets_time_exceeded(fresh_ns, v6):
    stack = Stack(fresh_ns, env={"USTACK_REASSEMBLY_TIMEOUT": "1"})
    try:
        stack.wait_ready()
        ident = random.randrange(1, 0xFFFF)
        pieces, _ = _fragments(v6, ident, 3000, 1232)
        with _icmp_socket(fresh_ns, v6) as sock:
            _inject(fresh_ns, pieces[0], pieces[-1])  # the middle never comes
            message = _wait_icmp(sock, v6, lambda m: m[0] == (3 if v6 else 11))
        assert message[1] == 1  # fragment reassembly time exceeded (RFC 792, RFC 4443 §3.3)
        assert message[8:48 if v6 else 28] == pieces[0][:40 if v6 else 20]  # quoting the first fragment
    finally:
        stack.stop()


def test_drops_are_counted_at_shutdown(ns, stack):
    stack.stop()
    stopped = {r["proc"]: r for r in stack.records() if r["event"] in ("ingress_stopped", "worker_stopped")}
    assert stopped["ingress.1"].get("drop_bad_checksum", 0) >= 1
    assert stopped["ingress.1"].get("drop_fragment_odd_length", 0) >= 1
    assert sum(v for k, v in stopped["udp.1"].items() if k.startswith("drop_")) >= 2
    assert stopped["tcp.1"].get("drop_bad_checksum", 0) >= 1
