"""Overload control (pipeline.admission), driven by hand: segments and ``now`` in, verdicts out.

Admission parses nothing: it reads the view routing checked. The tests make
that view the way ingress does, by routing the packet (``checked``).
"""

from __future__ import annotations

import collections
import tracemalloc

from pipeline import admission
from pipeline.admission import Admission
from pipeline.flow import Flow
from pipeline.membership import Membership
from pipeline.ratelimit import TokenBucket
from pipeline.routing import SETTLE_TIME, Router, Segment
from pipeline.wire.ipv4 import PROTO_TCP, Ipv4Header
from pipeline.wire.tcp import Flags, TcpSegment

STACK = bytes([10, 0, 0, 2])
STACK6 = bytes.fromhex("fd000000000000000000000000000002")
CLIENT = bytes([10, 0, 0, 1])

_members = Membership(3.0)
_members.seen("tcp.1", "tcp", 0.0)
# The router of an attach-mode ingress, so relayed flows pass too; its drops are no test's business.
_router = Router(STACK, _members, lambda reason, **f: None, started=-SETTLE_TIME, address6=STACK6, forward=True)


def checked(packet: bytes) -> Segment | None:
    """The checked view routing hands admission with this packet's route (None: no TCP segment)."""
    worker, role, _, segment = _router.route(packet, 0.0)
    assert worker == "tcp.1" and role == "tcp", "routing did not accept the packet"
    return segment


def packet(src: bytes, sport: int, isn: int, flags: Flags = Flags.SYN, dport: int = 8000,
           dst: bytes = STACK) -> bytes:
    tcp = TcpSegment(sport, dport, isn, 0, flags, 65535).emit(src, dst)
    return Ipv4Header(src, dst, PROTO_TCP).emit(len(tcp)) + tcp


def segment(src: bytes, sport: int, isn: int, flags: Flags = Flags.SYN, dport: int = 8000,
            dst: bytes = STACK) -> Segment:
    seg = checked(packet(src, sport, isn, flags, dport, dst))
    assert seg is not None
    return seg


def spoofed(i: int, net: int = 100) -> Segment:
    """A flood SYN: a new random-looking source, port and ISN every time."""
    return segment(bytes([net, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF]), 1024 + i % 60000, i * 7919)


class Harness:
    def __init__(self, **kw) -> None:
        self.known: set[bytes] = set()
        self.drops: collections.Counter[str] = collections.Counter()
        self.admitted: collections.Counter[str] = collections.Counter()
        self.adm = Admission(self.known.__contains__, lambda reason, **f: self.drops.update([reason]),
                             self.admitted, **kw)

    def establish(self, src: bytes, sport: int) -> None:
        """A worker announced this flow (it completed the handshake)."""
        self.known.add(Flow(src, sport, 8000).key)


def test_token_bucket_refills_at_its_rate_up_to_its_burst():
    b = TokenBucket(rate=10.0, burst=3)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take(0.05) is False  # half a token
    assert b.take(0.1) is True
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_non_syn_segments_are_never_shed():
    h = Harness(syn_rate=1.0, syn_burst=1)
    for i in range(50):
        h.adm.admit(spoofed(i), 0.0)  # empty the bucket
    for flags in (Flags.ACK, Flags.SYN | Flags.ACK, Flags.RST, Flags.FIN | Flags.ACK, Flags.PSH | Flags.ACK):
        assert h.adm.admit(segment(CLIENT, 5000, 1, flags), 0.0), flags


def test_syns_are_admitted_at_the_configured_rate_then_shed_and_counted():
    h = Harness(syn_rate=100.0, syn_burst=10)
    verdicts = [h.adm.admit(spoofed(i), i * 0.001) for i in range(1000)]  # 1000 SYNs in 1 s
    # 10 in the burst, then 100/s over the second.
    assert 105 <= sum(verdicts) <= 111
    assert h.drops["shed_syn_rate"] == 1000 - sum(verdicts)
    assert h.admitted["syn_admitted"] == sum(verdicts)


def test_under_a_flood_a_retransmitted_syn_gets_in():
    h = Harness(syn_rate=10.0, syn_burst=10)
    real = segment(CLIENT, 40000, 123456)
    # A flood that happens not to land in the real SYN's slot (one that does evicts it:
    # test_a_colliding_syn_costs_only_the_preference).
    flood = (syn for syn in map(spoofed, range(10**6)) if h.adm.slot(syn) != h.adm.slot(real))
    now = 0.0
    for _ in range(200):
        h.adm.admit(next(flood), now)
    assert not h.adm.admit(real, now)  # the first try is shed like the flood
    for _ in range(5000):  # 1 s of flood at 5000/s
        now += 0.0002
        h.adm.admit(next(flood), now)
    assert h.adm.admit(real, now)  # RFC 6298: the retransmission 1 s later
    assert h.admitted["syn_admitted_retry"] == 1


def test_a_colliding_syn_costs_only_the_preference():
    h = Harness(syn_rate=1.0, syn_burst=1)
    h.adm.admit(spoofed(0), 0.0)  # spend the only token
    real = segment(CLIENT, 40000, 123456)
    assert not h.adm.admit(real, 0.0)
    # The rival: this SYN with whichever ISN lands in the real one's slot.
    template = packet(bytes([100, 0, 0, 1]), 1025, 0)
    rivals = (checked(template[:24] + isn.to_bytes(4, "big") + template[28:]) for isn in range(2**32))
    rival = next(syn for syn in rivals if syn is not None and h.adm.slot(syn) == h.adm.slot(real))
    assert not h.adm.admit(rival, 0.5)  # takes the slot
    assert not h.adm.admit(real, 0.9)  # not known as a retransmission any more: shed as new
    assert h.drops["shed_syn_rate"] == 3 and h.admitted["syn_admitted_retry"] == 0


def test_a_repeat_too_soon_or_too_late_is_not_a_retransmission():
    h = Harness(syn_rate=1.0, syn_burst=1)
    h.adm.admit(spoofed(1), 0.0)  # spend the only token
    real = segment(CLIENT, 40000, 99)
    assert not h.adm.admit(real, 0.0)
    assert not h.adm.admit(real, admission.RETRY_MIN_GAP / 2)  # a duplicate, not a retransmission
    late = admission.RETRY_MAX_AGE + 1
    assert not h.adm.admit(segment(CLIENT, 40000, 98), 0.0)
    h.adm.syns = TokenBucket(0.0001, 1)
    h.adm.syns.tokens, h.adm.syns.stamp = 0.0, late
    assert not h.adm.admit(segment(CLIENT, 40000, 98), late)  # too old: new again
    assert h.drops["shed_syn_rate"] == 4


def test_replayed_syns_draw_on_their_own_bounded_bucket():
    h = Harness(syn_rate=1.0, syn_burst=1, retry_rate=10.0, retry_burst=5)
    by_slot = {h.adm.slot(syn): syn for syn in map(spoofed, range(200))}
    syns = list(by_slot.values())[:100]  # one per slot: none evicts another
    for s in syns:
        h.adm.admit(s, 0.0)
    admitted = sum(h.adm.admit(s, 1.0) for s in syns)  # every one replayed 1 s later
    assert admitted == 5 + 1  # the retry burst, and one token the shared bucket regained
    assert h.drops["shed_retry_rate"] == 100 - 5 - 1


def test_a_real_source_has_its_own_bucket_when_the_shared_one_is_empty():
    h = Harness(syn_rate=1.0, syn_burst=1, source_rate=10.0, source_burst=4)
    h.establish(CLIENT, 50000)
    assert h.adm.admit(segment(CLIENT, 50000, 1, Flags.ACK), 0.0)  # proves CLIENT real
    for i in range(100):
        h.adm.admit(spoofed(i), 0.0)
    new = [h.adm.admit(segment(CLIENT, 50001 + i, 1000 + i), 0.0) for i in range(10)]
    assert new == [True] * 4 + [False] * 6  # its burst, then its own limit
    assert h.drops["shed_source_rate"] == 6
    assert h.adm.admit(segment(CLIENT, 50100, 5), 0.1)  # refilled at its rate


def test_a_relayed_flow_makes_its_source_real_too():
    # Attach mode: a relayed flow's key ends with its destination (pipeline.flow.Flow.key).
    h = Harness(syn_rate=1.0, syn_burst=1)
    server = bytes([192, 0, 2, 10])
    h.known.add(Flow(CLIENT, 50000, 443, server).key)
    assert h.adm.admit(segment(CLIENT, 50000, 1, Flags.ACK, dport=443, dst=server), 0.0)
    assert CLIENT in h.adm.real


def test_a_packet_of_an_unknown_flow_does_not_make_its_source_real():
    h = Harness(syn_rate=1.0, syn_burst=1)
    spoof = bytes([100, 1, 2, 3])
    assert h.adm.admit(segment(spoof, 50000, 1, Flags.ACK), 0.0)  # admitted (the worker resets it)
    h.adm.admit(spoofed(0), 0.0)
    assert not h.adm.admit(segment(spoof, 50001, 2), 0.0)
    assert h.adm.real == {}


def test_real_sources_table_is_bounded_oldest_out():
    h = Harness()
    for i in range(admission.REAL_SOURCES + 10):
        src = (0x0B000000 + i).to_bytes(4, "big")
        h.establish(src, 1)
        h.adm.admit(segment(src, 1, 0, Flags.ACK), 0.0)
    assert len(h.adm.real) == admission.REAL_SOURCES
    assert (0x0B000000).to_bytes(4, "big") not in h.adm.real
    assert (0x0B000000 + admission.REAL_SOURCES + 9).to_bytes(4, "big") in h.adm.real


def test_memory_is_bounded_whatever_arrives():
    h = Harness(syn_rate=100.0, syn_burst=10)
    flood = [spoofed(i) for i in range(5000)]
    for i, syn in enumerate(flood):  # warm up: every table and bucket exists
        h.adm.admit(syn, i * 1e-5)
    # Four more floods from other sources, checked before measuring: the views are ingress's, not admission's.
    floods = [[spoofed(j, net=i + 1) for j in range(len(flood))] for i in range(4)]
    tracemalloc.start()
    try:
        for i, syns in enumerate(floods):
            for j, syn in enumerate(syns):
                h.adm.admit(syn, 1.0 + i + j * 1e-5)
        grown = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert grown < 50_000  # the tables were allocated up front; a flood adds nothing that stays
    assert sum(h.drops.values()) + sum(h.admitted.values()) == 25000


def test_the_syn_rate_halves_while_a_worker_falls_behind_and_grows_back_when_it_keeps_up():
    h = Harness(syn_rate=4000.0)
    h.adm.forwarded("tcp.1", 100)
    h.adm.worker_report("tcp.1", 100, 1.0)  # first report: the baseline
    assert h.adm.syns.rate == 4000.0
    sent = taken = 100
    rates = []
    for t in range(2, 6):  # it takes in 1,000 of the 3,000 packets sent each second
        sent += 3000
        taken += 1000
        h.adm.forwarded("tcp.1", 3000)
        h.adm.worker_report("tcp.1", taken, float(t))
        rates.append(h.adm.syns.rate)
    assert rates == [2000.0, 1000.0, 500.0, 250.0]
    assert h.adm.backlogs["tcp.1"] == sent - taken
    for t in range(6, 40):  # it catches up, then keeps up
        h.adm.forwarded("tcp.1", 100)
        taken = sent = sent + 100
        h.adm.worker_report("tcp.1", taken, float(t))
    assert h.adm.syns.rate == 4000.0  # back to the configured rate, not beyond
    assert h.admitted["syn_rate"] == 4000


def test_the_syn_rate_never_drops_below_its_floor():
    h = Harness(syn_rate=4000.0)
    h.adm.worker_report("tcp.1", 0, 0.0)
    for t in range(1, 30):
        h.adm.forwarded("tcp.1", 10_000)
        h.adm.worker_report("tcp.1", 0, float(t))
    assert h.adm.syns.rate == admission.SYN_RATE_MIN


def test_a_restarted_worker_does_not_look_behind():
    h = Harness(syn_rate=4000.0)
    h.adm.forwarded("tcp.1", 50_000)
    h.adm.worker_report("tcp.1", 50_000, 1.0)
    h.adm.forwarded("tcp.1", 100)
    h.adm.worker_report("tcp.1", 90, 2.0)  # a new process: its count starts again
    assert h.adm.backlogs["tcp.1"] == 0
    assert h.adm.syns.rate == 4000.0


def test_the_worst_worker_decides():
    h = Harness(syn_rate=4000.0)
    for w in ("tcp.1", "tcp.2"):
        h.adm.worker_report(w, 0, 0.0)
    h.adm.forwarded("tcp.1", 5000)  # tcp.1 is behind
    h.adm.worker_report("tcp.1", 0, 1.0)
    h.adm.forwarded("tcp.2", 10)
    h.adm.worker_report("tcp.2", 10, 1.1)  # tcp.2 keeps up, but tcp.1 is still behind
    assert h.adm.syns.rate == 1000.0


def test_ipv6_syns_are_admitted_and_shed_like_ipv4_ones():
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
    from scapy.layers.inet import TCP
    h = Harness(syn_rate=1.0, syn_burst=2)
    syn6 = [bytes(IPv6(src=f"fd00::{i + 10:x}", dst="fd00::2") / TCP(sport=1000 + i, dport=8000, flags="S"))
            for i in range(4)]
    with_options = bytes(IPv6(src="fd00::99", dst="fd00::2") / IPv6ExtHdrDestOpt() / TCP(dport=8000, flags="S"))
    assert [h.adm.admit(checked(p), 0.0) for p in syn6] == [True, True, False, False]
    assert not h.adm.admit(checked(with_options), 0.0)  # routing found it behind its extension header
    assert h.adm.admit(checked(bytes(IPv6(src="fd00::10", dst="fd00::2") / TCP(dport=8000, flags="A"))), 0.0)
    assert h.drops["shed_syn_rate"] == 3


def test_an_icmp_error_routed_to_a_tcp_worker_is_never_shed():
    from scapy.layers.inet import ICMP, IP, TCP
    quoted = IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=8000, dport=40000, flags="S")
    error = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=3, code=4) / bytes(quoted)[:28])
    # Routing gives it to the flow's owner (role tcp) with no segment: admission is not asked.
    assert checked(error) is None
