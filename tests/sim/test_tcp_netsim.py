"""Seeded end-to-end runs of Connection against Connection over a lossy, duplicating,
reordering channel: every byte arrives in order and both sides close cleanly."""

import random

import pytest

from tests.sim.netsim import Link, Simulation
from workers.tcp.config import TcpConfig
from workers.tcp.connection import State

ALL_OPTIONS = dict(window_scaling=True, timestamps=True, sack=True)
NO_OPTIONS = dict(window_scaling=False, timestamps=False, sack=False)


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def check(sim: Simulation, up: bytes, down: bytes) -> None:
    c, s = sim.client, sim.server
    assert s is not None, "handshake never completed"
    assert bytes(s.received) == up, f"server got {len(s.received)} of {len(up)} bytes"
    assert bytes(c.received) == down, f"client got {len(c.received)} of {len(down)} bytes"
    assert c.eof and s.eof
    assert c.conn.state is State.CLOSED and s.conn.state is State.CLOSED
    assert c.closed_reason == "closed" and s.closed_reason == "closed"


SCENARIOS = [
    # name, link, options, slow reader
    ("clean", Link(delay=0.01), ALL_OPTIONS, None),
    ("lossy", Link(loss=0.03, delay=0.01, jitter=0.002), ALL_OPTIONS, None),
    ("reorder-dup", Link(loss=0.01, duplicate=0.05, delay=0.01, jitter=0.02), ALL_OPTIONS, None),
    ("heavy-loss", Link(loss=0.10, duplicate=0.02, delay=0.005, jitter=0.005), ALL_OPTIONS, None),
    ("no-options", Link(loss=0.03, duplicate=0.02, delay=0.01, jitter=0.01), NO_OPTIONS, None),
    ("slow-reader", Link(loss=0.02, delay=0.01, jitter=0.005), ALL_OPTIONS, (3000, 0.05)),
]


@pytest.mark.parametrize("congestion", ["newreno", "cubic"])
@pytest.mark.parametrize("name,link,options,slow", SCENARIOS, ids=[s[0] for s in SCENARIOS])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_transfer_survives_the_network(seed, name, link, options, slow, congestion):
    recv_buffer = 32 * 1024 if slow else 128 * 1024
    cfg = TcpConfig(congestion=congestion, msl=1.0, recv_buffer=recv_buffer, **options)
    up, down = payload(seed, 120_000), payload(seed + 100, 40_000)
    sim = Simulation(seed, cfg, cfg, link, link, up, down, slow_reader=slow)
    sim.run()
    check(sim, up, down)


def test_large_segments_with_max_send_segment():
    """A TSO-style sender (64 KB segments) against a normal receiver."""
    big = TcpConfig(max_send_segment=65000, msl=1.0, recv_buffer=1 << 20)
    normal = TcpConfig(msl=1.0, recv_buffer=1 << 20)
    up = payload(9, 500_000)
    sim = Simulation(9, big, normal, Link(loss=0.02, delay=0.01, jitter=0.003), Link(delay=0.01), up, b"")
    sim.run()
    check(sim, up, b"")


@pytest.mark.parametrize("seed", [4, 23, 24])
def test_tiny_receiver_under_heavy_loss(seed):
    """One-segment receive buffer, long delayed ACKs, keepalive, 15% loss: every loss costs an
    RTO, so RTT samples must not include RTOs and a lost window update must not stall."""
    client = TcpConfig(mss=536, recv_buffer=32768, msl=1.0, nagle=False)
    server = TcpConfig(recv_buffer=1460, send_buffer=1000, delayed_ack=0.2, keepalive=0.5, msl=1.0)
    up, down = payload(seed, 60_000), payload(seed + 1, 20_000)
    link = Link(loss=0.15, delay=0.001, jitter=0.03)
    sim = Simulation(seed, client, server, link, link, up, down, slow_reader=(5000, 0.01))
    sim.run(limit=120)  # without the stale-echo rule these seeds take 700 s
    check(sim, up, down)
