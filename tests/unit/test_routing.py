"""Ingress routing: flow ownership, settling after a restart, dead workers' flows."""

import collections
import struct

from pipeline.membership import Membership
from pipeline.flow import Flow
from pipeline.routing import SETTLE_TIME, Router
from pipeline.wire.ipv4 import PROTO_TCP, PROTO_UDP, Ipv4Header, build_ipv4
from pipeline.wire.tcp import ACK, SYN

US = bytes([10, 0, 0, 2])
PEER = bytes([10, 0, 0, 1])


def tcp_packet(sport: int, dport: int = 8000, flags: int = ACK, dst: bytes = US, src: bytes = PEER) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 1000, 0, 0)
    return build_ipv4(Ipv4Header(src=src, dst=dst, protocol=PROTO_TCP), tcp)


def make(now=100.0, workers=("tcp.1", "tcp.2")):
    drops = collections.Counter()
    members = Membership(3.0)
    for w in workers:
        members.seen(w, "tcp", now)
    return Router(US, members, lambda reason, **kw: drops.update([reason]), started=now), drops


def test_announced_flows_stay_with_their_owner_when_a_worker_joins():
    r, _ = make(now=0.0)
    later = SETTLE_TIME + 1
    owners = {p: r.route(tcp_packet(p), later)[0] for p in range(40000, 40200)}
    for p, w in owners.items():
        r.update_flows(w, False, (Flow(PEER, p, 8000),), ())
    r.members.seen("tcp.3", "tcp", later)
    assert {p: r.route(tcp_packet(p), later)[0] for p in owners} == owners
    # New connections do reach the newcomer.
    assert "tcp.3" in {r.route(tcp_packet(p, flags=SYN), later)[0] for p in range(50000, 50100)}


def test_after_a_restart_unknown_flows_wait_but_new_connections_do_not():
    r, _ = make(now=100.0)
    assert r.route(tcp_packet(40000), 100.1)[:2] == (None, "tcp")   # held until owners re-announce
    assert r.route(tcp_packet(40000, flags=SYN), 100.1)[0] in ("tcp.1", "tcp.2")
    r.update_flows("tcp.2", True, (Flow(PEER, 40000, 8000),), ())
    assert r.route(tcp_packet(40000), 100.1)[:2] == ("tcp.2", "tcp")
    assert r.route(tcp_packet(40001), 100 + SETTLE_TIME + 0.1)[0] is not None


def test_full_announcement_replaces_and_forget_returns_orphans():
    r, _ = make()
    r.update_flows("tcp.1", False, (Flow(PEER, 1, 8000), Flow(PEER, 2, 8000)), ())
    r.update_flows("tcp.1", True, (Flow(PEER, 3, 8000),), ())
    assert set(r.flows.values()) == {"tcp.1"} and len(r.flows) == 1
    r.update_flows("tcp.2", False, (Flow(PEER, 4, 7),), (Flow(PEER, 3, 8000),))  # not tcp.2's to close
    assert len(r.flows) == 2
    assert r.forget_worker("tcp.1") == [Flow(PEER, 3, 8000)]
    assert Flow(PEER, 4, 7).key in r.flows and Flow.from_key(Flow(PEER, 4, 7).key) == Flow(PEER, 4, 7)


def test_flows_of_a_dead_worker_go_to_a_survivor():
    r, _ = make(now=0.0)
    r.update_flows("tcp.1", False, (Flow(PEER, 40000, 8000),), ())
    r.members.remove("tcp.1")
    assert r.route(tcp_packet(40000), 10.0)[:2] == ("tcp.2", "tcp")


def test_not_for_us_and_malformed_are_dropped():
    r, drops = make()
    assert r.route(tcp_packet(1, dst=bytes([10, 0, 0, 9])), 200.0)[:2] == (None, "")
    assert r.route(b"\x45\x00", 200.0)[:2] == (None, "")
    assert r.route(b"", 200.0)[:2] == (None, "")
    assert drops == {"not_for_us": 1, "truncated": 1, "not_ipv4": 1}


def test_other_protocols_go_to_their_role():
    r, _ = make()
    r.members.seen("udp.1", "udp", 0.0)
    udp = build_ipv4(Ipv4Header(src=PEER, dst=US, protocol=PROTO_UDP), struct.pack("!HHHH", 1, 7, 8, 0))
    assert r.route(udp, 200.0)[:2] == ("udp.1", "udp")
    odd = build_ipv4(Ipv4Header(src=PEER, dst=US, protocol=253), b"x")
    assert r.route(odd, 200.0)[:2] == (None, "icmp")  # held: no icmp worker yet


def test_tcp_header_is_checked_once_here():
    # Workers read the TCP header through a trusted view: what it cannot hold stops at ingress.
    r, drops = make()
    short = build_ipv4(Ipv4Header(src=PEER, dst=US, protocol=PROTO_TCP), bytes(12))
    bad_offset = bytearray(tcp_packet(40000))
    bad_offset[20 + 12] = 15 << 4  # Data Offset 60 bytes, the segment has 20
    assert r.route(short, 200.0)[:2] == (None, "") and r.route(bytes(bad_offset), 200.0)[:2] == (None, "")
    assert drops == {"truncated": 1, "bad_data_offset": 1}


def test_without_forwarding_other_destinations_are_dropped():
    r, drops = make(now=0.0)
    assert r.route(tcp_packet(40000, flags=SYN, dst=bytes([192, 0, 2, 10])), 10.0)[:2] == (None, "")
    assert drops["not_for_us"] == 1


def test_forwarded_flows_are_keyed_by_destination_and_keep_their_owner():
    r, drops = make(now=0.0)
    r.forward = True
    later = SETTLE_TIME + 1
    server_a, server_b = bytes([192, 0, 2, 10]), bytes([192, 0, 2, 11])
    # The same client port to two servers: two flows, each may live on its own worker.
    for dst in (server_a, server_b):
        owner, role, _, _ = r.route(tcp_packet(40000, flags=SYN, dst=dst), later)
        assert role == "tcp" and owner is not None
    r.update_flows("tcp.2", False, (Flow(PEER, 40000, 80, server_a),), ())
    r.update_flows("tcp.1", False, (Flow(PEER, 40000, 80, server_b),), ())
    assert r.route(tcp_packet(40000, 80, dst=server_a), later)[0] == "tcp.2"
    assert r.route(tcp_packet(40000, 80, dst=server_b), later)[0] == "tcp.1"
    assert sorted(r.forget_worker("tcp.2")) == [Flow(PEER, 40000, 80, server_a)]
    # Never relayed: multicast, broadcast, "this network".
    for dst in (bytes([224, 0, 0, 1]), bytes([255] * 4), bytes(4)):
        assert r.route(tcp_packet(40000, flags=SYN, dst=dst), later)[:2] == (None, "")
    assert drops["not_unicast"] == 3


WORKERS = ("tcp.1", "tcp.2", "tcp.3", "tcp.4")


def owners(r: Router, dport: int, src: bytes = PEER, dst: bytes = US) -> set[str | None]:
    """The workers that 50 new connections from one client to ``dport`` go to."""
    later = SETTLE_TIME + 1
    return {r.route(tcp_packet(p, dport=dport, flags=SYN, src=src, dst=dst), later)[0] for p in range(40000, 40050)}


def announce(r: Router, workers, steered) -> None:
    for w in workers:
        r.members.seen(w, "tcp", 1.0, seq=1, steered=frozenset(steered))


def test_a_port_workers_steer_by_client_keeps_one_clients_connections_on_one_worker():
    r, _ = make(now=0.0, workers=WORKERS)
    announce(r, WORKERS, {5201})  # iperf3's service declares it (workers.services.registry.steered_ports)
    # All of one client's connections to 5201 (an iperf3 test's control and data streams) go to one worker ...
    assert len(owners(r, 5201)) == 1
    # ... different clients spread over the workers ...
    clients = [bytes([10, 0, 1, i]) for i in range(40)]
    assert len({next(iter(owners(r, 5201, src=c))) for c in clients}) == 4
    # ... and other ports still spread by the whole 4-tuple.
    assert len(owners(r, 8000)) == 4


def test_a_port_no_worker_announced_is_not_steered():
    r, _ = make(now=0.0, workers=WORKERS)
    assert len(owners(r, 5201)) == 4  # ingress knows no port of its own
    announce(r, WORKERS, {5201})
    assert len(owners(r, 5202)) == 4
    announce(r, WORKERS, ())  # announced no more (a worker restarted with other services)
    assert len(owners(r, 5201)) == 4


def test_a_steered_port_goes_only_to_the_workers_that_announced_it():
    r, _ = make(now=0.0, workers=WORKERS)
    announce(r, ("tcp.2", "tcp.3"), {5201})
    clients = [bytes([10, 0, 1, i]) for i in range(40)]
    by_client = [owners(r, 5201, src=c) for c in clients]
    assert all(len(o) == 1 for o in by_client)
    assert set().union(*by_client) == {"tcp.2", "tcp.3"}


def test_relayed_flows_are_never_steered():
    r, _ = make(now=0.0, workers=WORKERS)
    r.forward = True
    announce(r, WORKERS, {5201})
    assert len(owners(r, 5201, dst=bytes([192, 0, 2, 10]))) == 4  # the port is the relayed server's


def test_a_tcp_segments_checked_view_is_handed_on_with_its_route():
    r, _ = make(now=0.0)
    r.forward = True
    r.members.seen("udp.1", "udp", 0.0)
    later = SETTLE_TIME + 1
    _, role, _, segment = r.route(tcp_packet(40000, flags=SYN), later)
    assert role == "tcp" and segment is not None
    assert segment.src == PEER and segment.key == Flow(PEER, 40000, 8000).key and segment.tcp.starts_connection
    server = bytes([192, 0, 2, 10])
    assert r.route(tcp_packet(40000, 80, dst=server), later)[3].key == Flow(PEER, 40000, 80, server).key
    udp = build_ipv4(Ipv4Header(src=PEER, dst=US, protocol=PROTO_UDP), struct.pack("!HHHH", 1, 7, 8, 0))
    assert r.route(udp, later)[3] is None
