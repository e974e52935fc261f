"""The kernel-side SYN filter: its decisions, run by the kernel itself, and when it is attached.

The program tests load the filter with bpf(2) (the verifier checks it) and
run it on packets with BPF_PROG_TEST_RUN (the map of recent SYNs is real too), which hands a socket filter the IP
header at offset 0 as the TUN device does: they need root (CAP_BPF), as the
whole suite does in CI.
"""

from __future__ import annotations

import ipaddress
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt

from pipeline import bpf, synfilter
from pipeline.synfilter import ONE, Reading, SynShedder

REAL4 = ipaddress.IPv4Address("10.0.0.1").packed
REAL6 = ipaddress.IPv6Address("fd00::1").packed


@pytest.fixture(scope="module")
def recent():
    """A map of recent SYNs, as ingress makes it."""
    fd = bpf.create_array_map(synfilter.RECENT_VALUE_SIZE, synfilter.RECENT_SLOTS)
    yield fd
    os.close(fd)


@pytest.fixture(scope="module")
def drop_unknown_syns(recent):
    """The filter at fraction 0, with no repeat ever old enough to be a retransmission (max_age 0):
    every opening SYN from an unknown source is dropped."""
    fd = bpf.load_socket_filter(synfilter.program(0, [REAL4], [REAL6], recent, max_age=0))
    yield fd
    os.close(fd)


def fresh_filter(**ages) -> int:
    """The filter at fraction 0 with a map of its own (closed with the program's last reference)."""
    recent = bpf.create_array_map(synfilter.RECENT_VALUE_SIZE, synfilter.RECENT_SLOTS)
    try:
        return bpf.load_socket_filter(synfilter.program(0, [], [], recent, **ages))
    finally:
        os.close(recent)


def kept(fd: int, packet) -> bool:
    return bpf.test_run(fd, bytes(packet)) == synfilter.KEEP


def expected_kept(packet) -> bool:
    """The rule, stated plainly: drop SYN-without-ACK over TCP from an unknown source."""
    if IP in packet:
        ip = packet[IP]
        if ip.proto != 6 or ip.frag != 0 or ip.src == "10.0.0.1":
            return True
    else:
        ip = packet[IPv6]
        if ip.nh != 6 or ip.src == "fd00::1":
            return True
    return packet[TCP].flags & 0x12 != 0x02


def test_the_verifier_accepts_the_longest_program(recent) -> None:
    real4 = [bytes([10, 1, i // 256, i % 256]) for i in range(synfilter.MAX_REAL4 + 10)]
    real6 = [bytes(15) + bytes([i]) for i in range(synfilter.MAX_REAL6 + 10)]
    os.close(bpf.load_socket_filter(synfilter.program(ONE - 1, real4, real6, recent)))


def test_a_program_the_verifier_refuses_says_why() -> None:
    with pytest.raises(bpf.BpfError, match="R0"):
        bpf.load_socket_filter(bytes.fromhex("9500000000000000"))  # exit without setting r0


@pytest.mark.parametrize("packet, keep", [
    (IP(src="192.0.2.7", dst="10.0.0.2") / TCP(flags="S"), False),
    (IP(src="10.0.0.1", dst="10.0.0.2") / TCP(flags="S"), True),  # a real source
    (IP(src="192.0.2.7", dst="10.0.0.2") / TCP(flags="A"), True),
    (IP(src="192.0.2.7", dst="10.0.0.2") / TCP(flags="SA"), True),
    (IP(src="192.0.2.7", dst="10.0.0.2") / TCP(flags="R"), True),
    (IP(src="192.0.2.7", dst="10.0.0.2", options=[b"\x01\x01\x01\x00"]) / TCP(flags="S"), False),  # IHL 6
    (IP(src="192.0.2.7", dst="10.0.0.2", frag=100) / TCP(flags="S"), True),  # no TCP header there
    (IP(src="192.0.2.7", dst="10.0.0.2") / UDP(), True),
    (IP(src="192.0.2.7", dst="10.0.0.2") / ICMP(), True),
    (IPv6(src="2001:db8::7", dst="fd00::2") / TCP(flags="S"), False),
    (IPv6(src="fd00::1", dst="fd00::2") / TCP(flags="S"), True),
    (IPv6(src="fd00::1:1", dst="fd00::2") / TCP(flags="S"), False),  # differs in the last word only
    (IPv6(src="2001:db8::7", dst="fd00::2") / TCP(flags="A"), True),
    (IPv6(src="2001:db8::7", dst="fd00::2") / IPv6ExtHdrDestOpt() / TCP(flags="S"), True),  # ingress walks those
])
def test_only_opening_syns_from_unknown_sources_are_dropped(drop_unknown_syns, packet, keep) -> None:
    assert kept(drop_unknown_syns, packet) is keep


def test_a_truncated_packet_is_dropped_not_misread(drop_unknown_syns) -> None:
    assert not kept(drop_unknown_syns, bytes(IP(src="192.0.2.7", dst="10.0.0.2") / TCP(flags="S"))[:30])


tcp_flags = st.integers(0, 0xFF)
v4_sources = st.sampled_from(["10.0.0.1", "192.0.2.7", "198.51.100.1"])
v6_sources = st.sampled_from(["fd00::1", "2001:db8::7", "fd00::2"])


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.builds(lambda src, proto, frag, flags, opts: IP(src=src, dst="10.0.0.2", proto=proto, frag=frag,
                                                       options=[b"\x01" * 4] * opts) / TCP(flags=flags),
              v4_sources, st.sampled_from([6, 17]), st.sampled_from([0, 0, 1, 8191]), tcp_flags, st.integers(0, 10)),
    st.builds(lambda src, flags: IPv6(src=src, dst="fd00::2") / TCP(flags=flags), v6_sources, tcp_flags),
))
def test_the_kernel_runs_the_rule(drop_unknown_syns, packet) -> None:
    assert kept(drop_unknown_syns, packet) is expected_kept(packet)


def test_a_fraction_passes_about_that_share(recent) -> None:
    fd = bpf.load_socket_filter(synfilter.program(ONE // 4, [], [], recent, max_age=0))
    try:
        syn = bytes(IP(src="192.0.2.7", dst="10.0.0.2") / TCP(flags="S"))
        passed = sum(bpf.test_run(fd, syn) == synfilter.KEEP for _ in range(4000))
    finally:
        os.close(fd)
    assert 800 < passed < 1200  # 1000 expected; 6 standard deviations either side


@pytest.mark.parametrize("ip", [IP(src="192.0.2.7", dst="10.0.0.2"), IPv6(src="2001:db8::7", dst="fd00::2")])
def test_a_retransmitted_syn_is_kept(ip) -> None:
    fd = fresh_filter(min_gap=0)  # any repeat is old enough
    try:
        syn = ip / TCP(flags="S", sport=40000, seq=123456)
        assert not kept(fd, syn)  # first sighting, at fraction 0
        assert kept(fd, syn)      # the same addresses, ports and ISN again: a retransmission
        assert kept(fd, syn)
        assert not kept(fd, ip / TCP(flags="S", sport=40000, seq=123457))  # another ISN: a new SYN
        assert not kept(fd, ip / TCP(flags="S", sport=40001, seq=123456))  # another port
    finally:
        os.close(fd)


def test_a_repeat_within_the_gap_is_not_a_retransmission() -> None:
    fd = fresh_filter()  # RETRY_MIN_GAP: 0.5 s
    try:
        syn = IP(src="192.0.2.7", dst="10.0.0.2") / TCP(flags="S", sport=40000, seq=1)
        assert not kept(fd, syn)
        assert not kept(fd, syn)  # at once: a replay, not a client's timer
    finally:
        os.close(fd)


def test_a_repeat_older_than_the_max_age_counts_as_new_and_restarts_the_clock() -> None:
    fd = fresh_filter(min_gap=0, max_age=synfilter.ticks(0.005))
    try:
        syn = IP(src="192.0.2.7", dst="10.0.0.2") / TCP(flags="S", sport=40000, seq=1)
        assert not kept(fd, syn)
        time.sleep(0.02)  # the kernel clock passes the max age
        assert not kept(fd, syn)  # too old: new again
        assert kept(fd, syn)      # and counted from that sighting
    finally:
        os.close(fd)


# -- SynShedder: when the filter goes on, how much it passes, when it comes off ------------

class Ingress:
    """What ingress reports, built up interval by interval."""

    def __init__(self) -> None:
        self.reading = Reading(0, 0, 0, 0)

    def read(self, packets: int, syns: int, behind: bool) -> Reading:
        r = self.reading
        self.reading = Reading(r.packets + packets, r.syns + syns, r.drains + 10, r.full + (10 if behind else 0))
        return self.reading


def shedder() -> SynShedder:
    return SynShedder(0.0, target_rate=1000, interval=1.0)


def test_no_filter_while_ingress_keeps_up_however_many_syns() -> None:
    shed, ingress = shedder(), Ingress()
    assert shed.tick(1.0, ingress.read(20_000, 19_000, behind=False), []) is None
    assert shed.fraction == ONE


def test_no_filter_when_ingress_falls_behind_on_other_traffic() -> None:
    shed, ingress = shedder(), Ingress()
    assert shed.tick(1.0, ingress.read(30_000, 500, behind=True), []) is None


def test_a_flood_ingress_cannot_read_puts_a_filter_on_that_passes_the_target_rate() -> None:
    shed, ingress = shedder(), Ingress()
    decision = shed.tick(1.0, ingress.read(30_000, 29_000, behind=True), [REAL4])
    assert shed.capacity == 30_000
    assert decision is not None and decision.fraction == ONE * 1000 // 29_000
    assert decision.real4 == (REAL4,)
    # The flood really offers 100,000/s: ingress keeps up now, and what it read, over the fraction,
    # is the flood's rate.
    syns = 100_000 * 1000 // 29_000
    decision = shed.tick(2.0, ingress.read(syns + 1000, syns, behind=False), [REAL4])
    assert decision is not None and abs(decision.fraction / ONE - 0.01) < 0.0002
    # Steady: no reload.
    syns = int(100_000 * decision.fraction / ONE)
    assert shed.tick(3.0, ingress.read(syns + 1000, syns, behind=False), [REAL4]) is None


def test_while_ingress_is_still_behind_the_fraction_at_least_halves() -> None:
    shed, ingress = shedder(), Ingress()
    shed.tick(1.0, ingress.read(30_000, 1_500, behind=True), [])  # 1,500 SYNs/s: 2/3 pass
    assert shed.fraction == ONE // 2  # behind: what was read is a lower bound
    shed.tick(2.0, ingress.read(30_000, 1_000, behind=True), [])
    assert shed.fraction == ONE // 4


def test_the_filter_comes_off_within_one_interval_of_the_flood_ending() -> None:
    shed, ingress = shedder(), Ingress()
    shed.tick(1.0, ingress.read(30_000, 29_000, behind=True), [])
    assert shed.fraction < ONE
    assert shed.tick(2.0, ingress.read(100, 0, behind=False), []) == synfilter.OFF
    assert shed.fraction == ONE
    assert shed.tick(3.0, ingress.read(100, 0, behind=False), []) is None


def test_the_filter_comes_off_when_ingress_could_read_all_that_is_offered() -> None:
    shed, ingress = shedder(), Ingress()
    shed.tick(1.0, ingress.read(30_000, 29_000, behind=True), [])  # capacity 30,000/s
    # The flood slows to ~10,000 SYNs/s: over the target, but ingress can read it all.
    syns = int(10_000 * shed.fraction / ONE)
    assert shed.tick(2.0, ingress.read(syns + 50, syns, behind=False), []) == synfilter.OFF


def test_the_fraction_has_a_floor() -> None:
    shed, ingress = shedder(), Ingress()
    for second in range(1, 20):  # behind, and behind again: it halves every time, down to the floor
        shed.tick(float(second), ingress.read(30_000, 29_000, behind=True), [])
    assert shed.fraction == int(ONE * synfilter.MIN_FRACTION)


def flooded(shed: SynShedder, ingress: Ingress) -> None:
    """Ingress behind with 29,000 SYNs/s read, then the 100,000 SYNs/s flood read at that fraction."""
    shed.tick(1.0, ingress.read(30_000, 29_000, behind=True), [REAL4])
    syns = int(100_000 * shed.fraction / ONE)
    shed.tick(2.0, ingress.read(syns + 1000, syns, behind=False), [REAL4])


def test_small_changes_do_not_reload_the_filter_but_new_real_sources_do() -> None:
    shed, ingress = shedder(), Ingress()
    flooded(shed, ingress)
    syns = int(105_000 * shed.fraction / ONE)  # 5 % more offered
    assert shed.tick(3.0, ingress.read(syns + 1000, syns, behind=False), [REAL4]) is None
    other = bytes([10, 0, 0, 9])
    decision = shed.tick(4.0, ingress.read(syns + 1000, syns, behind=False), [REAL4, other])
    assert decision is not None and decision.real4 == (other, REAL4)  # newest first


def test_real_sources_are_capped_newest_first_per_family() -> None:
    shed, ingress = shedder(), Ingress()
    sources = [bytes([10, 0, i // 256, i % 256]) for i in range(100)] + [bytes(15) + bytes([i]) for i in range(20)]
    decision = shed.tick(1.0, ingress.read(30_000, 29_000, behind=True), sources)
    assert decision is not None
    assert decision.real4 == tuple(reversed(sources[100 - synfilter.MAX_REAL4:100]))
    assert decision.real6 == tuple(reversed(sources[120 - synfilter.MAX_REAL6:]))


def test_the_program_refuses_a_fraction_of_one() -> None:
    with pytest.raises(ValueError):
        synfilter.program(ONE, [], [], recent_fd=3)
