"""Receive-buffer autotuning (Linux tcp_rcv_space_adjust, Dynamic Right-Sizing): the window
we advertise follows what the application reads per round trip, from a small initial buffer
up to ``recv_buffer`` and no further; the right edge never moves left (RFC 7323 §2.4); the
window scale of our SYN and SYN-ACK is chosen from the maximum (RFC 7323 §2.3).

The peer is a window-limited sender one round trip away, driven by a hand-held clock: each
round trip it sends, in one burst, everything up to the right edge of the ACKs it got in the
round trip before, echoing their timestamp (RFC 7323 §4).
"""

import math

import pytest

from pipeline.wire.seqnum import seq_add, seq_ge, seq_gt, seq_lt, seq_sub
from pipeline.wire.tcp import NO_OPTIONS, Flags, TcpOptions, TcpSegment
from tests.unit.tcp.builders import LOCAL_ISS, LOCAL_PORT, REMOTE_PORT, T0, config, established, syn
from workers.tcp.config import TcpConfig
from workers.tcp.connection import Connection

INITIAL = 64 * 1024  # TcpConfig.initial_recv_buffer() at MSS 1460
MAX = 8 << 20        # 128 times INITIAL: seven doublings
SEG = 15000         # the peer's segments (GRO hands over any size; not a multiple of the scale unit)


class Peer:
    """The remote sender: one burst per round trip, up to the edge our ACKs of the last one offered."""

    def __init__(self, cfg: TcpConfig, rtt: float = 0.125, timestamps: bool = True) -> None:
        options = TcpOptions(mss=1460, window_scale=7, timestamp=(5000, 0) if timestamps else None)
        self.c = established(cfg, options=options)
        self.rtt = rtt
        self.timestamps = timestamps
        self.snd_nxt = self.c.receiver.rcv_nxt
        self.edge = self.c.receiver.rcv_adv  # what the handshake offered
        self.tsval = 5000
        self.echo = 1  # the builder's handshake echoed nothing of ours
        self.edges: list[int] = []  # the right edge of every ACK we sent, in order
        self.rounds = 0

    def run_round(self, per_segment=None, per_round=None) -> int:
        """One round trip; returns the largest window (bytes) our ACKs advertised in it."""
        c = self.c
        now = T0 + self.rounds * self.rtt
        self.rounds += 1
        self.tsval += 1
        acks: list[TcpSegment] = []
        while seq_lt(self.snd_nxt, self.edge):
            n = min(SEG, seq_sub(self.edge, self.snd_nxt))
            opts = TcpOptions(timestamp=(self.tsval, self.echo)) if self.timestamps else NO_OPTIONS
            c.receive(TcpSegment(REMOTE_PORT, LOCAL_PORT, self.snd_nxt, c.sender.snd_nxt, Flags.ACK, 65535, b"x" * n, opts),
                      now)
            self.snd_nxt = seq_add(self.snd_nxt, n)
            if per_segment:
                per_segment(c)
            acks += c.segments_to_send(now)
        if per_round:
            per_round(c)
            acks += c.segments_to_send(now)
        while (t := c.get_timer()) is not None and t < now + self.rtt:  # the delayed ACK
            c.handle_timer(t)
            acks += c.segments_to_send(t)
        # The peer hears every ACK before its next burst; the first of them clocks it (its echo).
        shift = c.options.rcv_wscale
        largest = 0
        for a in acks:
            edge = seq_add(a.ack, a.window << shift)
            self.edges.append(edge)
            largest = max(largest, a.window << shift)
            if seq_gt(edge, self.edge):
                self.edge = edge
        if self.timestamps and acks:
            self.echo = acks[0].options.timestamp[0]
        return largest


def make_peer(rtt: float = 0.125, timestamps: bool = True) -> Peer:
    return Peer(config(recv_buffer=MAX, window_scaling=True, timestamps=timestamps), rtt, timestamps)


def read_all(c: Connection) -> None:
    c.recv()


def assert_right_edge_never_moves_left(edges: list[int]) -> None:
    for before, after in zip(edges, edges[1:]):
        assert seq_ge(after, before), "a right edge moved left (RFC 7323 §2.4)"


# -- the initial buffer and the window scale -----------------------------------------------------

def test_initial_buffer_is_64_kib_or_four_segments_within_the_maximum():
    assert TcpConfig(mss=1460, recv_buffer=1 << 20).initial_recv_buffer() == INITIAL
    assert TcpConfig(mss=65480, recv_buffer=4 << 20).initial_recv_buffer() == 4 * 65480  # a 65520 MTU
    assert TcpConfig(mss=1000, recv_buffer=10000).initial_recv_buffer() == 10000  # small maximum: fixed
    fixed = TcpConfig(recv_buffer=1 << 20, recv_buffer_initial=1 << 20)
    assert fixed.initial_recv_buffer() == 1 << 20


@pytest.mark.parametrize("initial", [0xFFFF - 1, (1 << 20) + 1])
def test_initial_buffer_must_cover_a_syn_window_and_fit_the_maximum(initial):
    with pytest.raises(ValueError):
        TcpConfig(recv_buffer=1 << 20, recv_buffer_initial=initial)


def test_syn_offers_the_scale_of_the_maximum_and_the_window_of_the_initial_buffer():
    cfg = config(recv_buffer=MAX, window_scaling=True)
    c = Connection.connect(REMOTE_PORT, LOCAL_PORT, LOCAL_ISS, cfg, T0)
    [s] = c.segments_to_send(T0)
    # RFC 7323 §2.3: 8 MiB >> 8 fits 16 bits; the initial 64 KiB alone would need a shift of 1.
    assert s.options.window_scale == 8 and s.window == 0xFFFF  # §2.2: a SYN's window is unscaled


def test_syn_ack_offers_the_scale_of_the_maximum_and_the_first_window_is_the_initial_buffer():
    cfg = config(recv_buffer=MAX, window_scaling=True)
    c = Connection.accept(LOCAL_PORT, REMOTE_PORT, syn(TcpOptions(mss=1460, window_scale=2)), LOCAL_ISS, cfg, T0)
    [s] = c.segments_to_send(T0)
    assert s.flags == Flags.SYN | Flags.ACK and s.options.window_scale == 8 and s.window == 0xFFFF
    c.receive(TcpSegment(REMOTE_PORT, LOCAL_PORT, s.ack, seq_add(s.seq, 1), Flags.ACK, 100), T0 + 0.01)
    c.receive(TcpSegment(REMOTE_PORT, LOCAL_PORT, s.ack, seq_add(s.seq, 1), Flags.ACK, 100, b"x"), T0 + 0.01)
    c.recv()
    c.handle_timer(c.get_timer())
    [ack] = c.segments_to_send(T0 + 0.1)
    assert ack.window << 8 == INITIAL  # scaled by the maximum's shift, sized by the initial buffer


# -- growth ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("timestamps", [True, False], ids=["ts-echo", "window-timing"])
@pytest.mark.parametrize("rtt", [0.125, 0.5])
def test_reader_that_takes_everything_doubles_its_window_per_round_trip_up_to_the_maximum(rtt, timestamps):
    peer = make_peer(rtt, timestamps)
    windows = [peer.run_round(per_segment=read_all) for _ in range(16)]
    assert windows[0] == INITIAL  # starts small
    assert all(b >= a for a, b in zip(windows, windows[1:]))
    assert max(windows) == MAX and all(w <= MAX for w in windows)  # up to the maximum, never past it
    climb = windows.index(MAX)
    # Seven doublings from 64 KiB to 8 MiB: about one per round trip (a mean factor of 1.7 to 2.7),
    # whatever the round trip is -- the measurement follows the RTT, not the clock.
    assert 5 <= climb <= 9, windows
    assert 1.7 <= math.exp(math.log(MAX / INITIAL) / climb) <= 2.7
    assert windows[climb:] == [MAX] * (16 - climb)  # and stays there
    assert_right_edge_never_moves_left(peer.edges)


def test_reader_that_reads_little_keeps_the_initial_window():
    peer = make_peer()
    got = 0

    def slow(c):  # 16 KB per round trip: a quarter of the initial buffer
        nonlocal got
        got += len(c.recv(16000))
    windows = [peer.run_round(per_round=slow) for _ in range(40)]
    assert got == 40 * 16000  # the transfer goes on, at the reader's pace
    assert max(windows) <= INITIAL and peer.c.readable <= INITIAL  # little memory held
    assert_right_edge_never_moves_left(peer.edges)


def test_window_follows_a_moderate_reader_and_settles_well_below_the_maximum():
    peer = make_peer()
    rate = 100_000  # bytes per round trip: more than half the initial buffer
    held = []  # unread bytes plus the window: what the peer may make us hold
    for _ in range(40):
        peer.run_round(per_round=lambda c: c.recv(rate))
        held.append(peer.c.readable + seq_sub(peer.c.receiver.rcv_adv, peer.c.receiver.rcv_nxt))
    assert held[0] == INITIAL
    # It grew to a few round trips of reading and stopped there, far below the maximum.
    assert all(2 * rate <= h <= 4 * rate for h in held[10:]) and 4 * rate < MAX
    assert max(held[20:]) <= max(held[5:20]) + (1 << peer.c.options.rcv_wscale)  # settled (but for scale rounding)
    assert_right_edge_never_moves_left(peer.edges)


def test_right_edge_never_moves_left_while_a_bursty_reader_grows_the_buffer():
    peer = make_peer(timestamps=False)
    # Nothing read for three round trips (the window closes), then everything at once.
    windows = [peer.run_round(per_round=read_all if k % 4 == 3 else None) for k in range(40)]
    assert min(windows) == 0 and max(windows) > 2 * INITIAL  # closed, and grown
    assert_right_edge_never_moves_left(peer.edges)


def test_fixed_buffer_when_the_initial_size_is_the_maximum():
    peer = Peer(config(recv_buffer=1 << 20, recv_buffer_initial=1 << 20, window_scaling=True, timestamps=True))
    windows = [peer.run_round(per_segment=read_all) for _ in range(4)]
    assert windows[1:] == [1 << 20] * 3  # the old behaviour: the whole buffer from the start
