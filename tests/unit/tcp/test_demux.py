"""The TCP demultiplexer: listeners, SYN queue and cookies, resets, timers."""

import collections

import pytest
import structlog

from pipeline.config import DEFAULT_MAX_TIME_WAIT, DEFAULT_SYN_QUEUE
from pipeline.flow import Flow
from pipeline.wire.ipv4 import PROTO_TCP, Ipv4Header, build_ipv4, parse_ipv4
from pipeline.wire.seqnum import seq_add
from pipeline.wire.tcp import Flags, TcpOptions, TcpSegment, parse_tcp
from workers.core import Sink
from workers.tcp import demux as demux_mod
from workers.tcp.config import TcpConfig
from workers.tcp.connection import State
from workers.tcp.time_wait import TIME_WAIT_ISN_GAP

US = bytes([10, 0, 0, 2])
PEER = bytes([10, 0, 0, 1])
T0 = 100.0


def sink():
    return Sink(collections.Counter(), structlog.get_logger())


@pytest.fixture
def demux():
    return demux_mod.TcpDemux(sink(), US, TcpConfig(), secret=b"s" * 32, syn_queue_limit=DEFAULT_SYN_QUEUE,
                              max_time_wait=DEFAULT_MAX_TIME_WAIT)


def packet(seg: TcpSegment, src=PEER) -> bytes:
    return build_ipv4(Ipv4Header(src=src, dst=US, protocol=PROTO_TCP), seg.emit(src, US))


def parse(out) -> TcpSegment:
    pkt, offload = out
    assert offload is None  # no device offloads in these tests
    ip, payload = parse_ipv4(pkt)
    assert ip.src == US and ip.dst == PEER
    return parse_tcp(payload, ip.src, ip.dst)


def syn(sport=40000, dport=7, seq=1000):
    return TcpSegment(sport, dport, seq, 0, Flags.SYN, 65535, options=TcpOptions(mss=1460))


def handshake(demux, sport=40000, dport=7, now=T0):
    [synack] = [parse(p) for p in demux.handle_packet(packet(syn(sport, dport)), now)]
    assert synack.flags == Flags.SYN | Flags.ACK and synack.ack == 1001
    ack = TcpSegment(sport, dport, 1001, seq_add(synack.seq, 1), Flags.ACK, 65535)
    assert demux.handle_packet(packet(ack), now) == []
    return seq_add(synack.seq, 1)


def test_handshake_then_echo(demux):
    our_seq = handshake(demux)
    data = TcpSegment(40000, 7, 1001, our_seq, Flags.ACK | Flags.PSH, 65535, b"ping")
    out = [parse(p) for p in demux.handle_packet(packet(data), T0 + 0.01)]
    assert b"".join(s.payload for s in out) == b"ping"
    assert out[-1].ack == 1005


def test_syn_to_closed_port_gets_rst_ack(demux):
    [rst] = [parse(p) for p in demux.handle_packet(packet(syn(dport=4444, seq=77)), T0)]
    # RFC 9293 §3.10.7.1: no ACK in the segment -> <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>
    assert rst.flags == Flags.RST | Flags.ACK and rst.seq == 0 and rst.ack == 78


def test_reset_acknowledges_across_the_sequence_wrap(demux):
    [rst] = [parse(p) for p in demux.handle_packet(packet(syn(dport=4444, seq=2**32 - 1)), T0)]
    assert rst.flags == Flags.RST | Flags.ACK and rst.ack == 0  # SEG.SEQ + SEG.LEN modulo 2**32


def test_echo_across_the_sequence_wrap(demux):
    isn = 2**32 - 2  # the peer's data starts at 2**32 - 1 and wraps after one byte
    [synack] = [parse(p) for p in demux.handle_packet(packet(syn(seq=isn)), T0)]
    assert synack.ack == 2**32 - 1
    ours = seq_add(synack.seq, 1)
    assert demux.handle_packet(packet(TcpSegment(40000, 7, 2**32 - 1, ours, Flags.ACK, 65535)), T0) == []
    data = TcpSegment(40000, 7, 2**32 - 1, ours, Flags.ACK | Flags.PSH, 65535, b"ping")
    out = [parse(p) for p in demux.handle_packet(packet(data), T0 + 0.01)]
    assert b"".join(s.payload for s in out) == b"ping" and out[-1].ack == 3


def test_ack_for_no_connection_gets_rst_from_its_ack(demux):
    stray = TcpSegment(40000, 8000, 5, 123456, Flags.ACK, 100, b"x")
    [rst] = [parse(p) for p in demux.handle_packet(packet(stray), T0)]
    assert rst.flags == Flags.RST and rst.seq == 123456


def test_reset_is_never_answered_with_a_reset(demux):
    for dport in (7, 4444):
        rst = TcpSegment(40000, dport, 5, 9, Flags.RST | Flags.ACK, 0)
        assert demux.handle_packet(packet(rst), T0) == []


def test_syn_flood_is_answered_with_cookies_and_real_clients_get_in(demux):
    limit = demux.syn_queue_limit
    for i in range(limit + 50):
        demux.handle_packet(packet(syn(sport=10000 + i)), T0)
    assert len(demux.connections) == limit  # memory bounded by the SYN queue
    assert demux.sink.counters["syn_cookies_sent"] == 50
    # A real client arriving during the flood completes the handshake statelessly.
    [synack] = [parse(p) for p in demux.handle_packet(packet(syn(sport=50000, seq=9000)), T0)]
    ack = TcpSegment(50000, 7, 9001, seq_add(synack.seq, 1), Flags.ACK | Flags.PSH, 65535, b"hello")
    out = [parse(p) for p in demux.handle_packet(packet(ack), T0 + 0.1)]
    assert demux.connections[Flow(PEER, 50000, 7)].state is State.ESTABLISHED
    assert b"".join(s.payload for s in out) == b"hello"
    assert demux.sink.counters["syn_cookies_accepted"] == 1


def flood(demux):
    for i in range(demux.syn_queue_limit):
        demux.handle_packet(packet(syn(sport=10000 + i)), T0)


def test_cookie_connection_keeps_window_scale_sack_and_timestamps(demux):
    flood(demux)
    offer = TcpOptions(mss=1460, window_scale=7, sack_permitted=True, timestamp=(555, 0))
    first = TcpSegment(50000, 7, 9000, 0, Flags.SYN, 65535, options=offer)
    [synack] = [parse(p) for p in demux.handle_packet(packet(first), T0)]
    assert Flow(PEER, 50000, 7) not in demux.connections  # stateless: a cookie
    o = synack.options
    assert o.window_scale is not None and o.sack_permitted and o.timestamp[1] == 555
    # The final ACK echoes our TSval; its window is scaled by the peer's shift (RFC 7323 §2.3).
    ack = TcpSegment(50000, 7, 9001, seq_add(synack.seq, 1), Flags.ACK | Flags.PSH, 100, b"hello",
                     options=TcpOptions(timestamp=(556, o.timestamp[0])))
    out = [parse(p) for p in demux.handle_packet(packet(ack), T0 + 0.01)]
    conn = demux.connections[Flow(PEER, 50000, 7)]
    assert conn.state is State.ESTABLISHED and demux.sink.counters["syn_cookies_accepted"] == 1
    assert conn.options.ws_ok and conn.options.snd_wscale == 7 and conn.sender.snd_wnd == 100 << 7
    assert conn.options.sack and conn.options.timestamps and conn.receiver.ts_recent == 556
    assert b"".join(s.payload for s in out) == b"hello"
    assert all(s.options.timestamp and s.options.timestamp[1] == 556 for s in out)


def test_cookie_without_timestamps_offers_and_keeps_only_the_mss(demux):
    flood(demux)
    offer = TcpOptions(mss=1460, window_scale=7, sack_permitted=True)
    first = TcpSegment(50000, 7, 9000, 0, Flags.SYN, 65535, options=offer)
    [synack] = [parse(p) for p in demux.handle_packet(packet(first), T0)]
    assert synack.options == TcpOptions(mss=demux.config.mss)
    ack = TcpSegment(50000, 7, 9001, seq_add(synack.seq, 1), Flags.ACK, 100)
    demux.handle_packet(packet(ack), T0 + 0.01)
    conn = demux.connections[Flow(PEER, 50000, 7)]
    assert conn.state is State.ESTABLISHED and conn.options.peer_mss == 1460
    assert not (conn.options.ws_ok or conn.options.sack or conn.options.timestamps) and conn.sender.snd_wnd == 100


def test_cookie_ack_with_an_impossible_echo_is_reset(demux):
    flood(demux)
    first = TcpSegment(50000, 7, 9000, 0, Flags.SYN, 65535,
                       options=TcpOptions(mss=1460, timestamp=(555, 0)))
    [synack] = [parse(p) for p in demux.handle_packet(packet(first), T0)]
    ack = TcpSegment(50000, 7, 9001, seq_add(synack.seq, 1), Flags.ACK, 100,
                     options=TcpOptions(timestamp=(556, synack.options.timestamp[0] | 0x20)))
    [rst] = [parse(p) for p in demux.handle_packet(packet(ack), T0 + 0.01)]
    assert rst.flags == Flags.RST and Flow(PEER, 50000, 7) not in demux.connections


def test_forged_cookie_ack_is_reset(demux):
    for i in range(demux.syn_queue_limit):
        demux.handle_packet(packet(syn(sport=10000 + i)), T0)
    forged = TcpSegment(50001, 7, 1, 424242, Flags.ACK, 65535)
    [rst] = [parse(p) for p in demux.handle_packet(packet(forged), T0)]
    assert rst.flags == Flags.RST and Flow(PEER, 50001, 7) not in demux.connections


def test_syn_ack_retransmitted_from_the_timer_heap(demux):
    first = parse(demux.handle_packet(packet(syn()), T0)[0])
    deadline = demux.next_deadline()
    assert deadline is not None and deadline > T0
    assert demux.handle_timer(deadline - 0.001) == []
    again = [parse(p) for p in demux.handle_timer(deadline)]
    assert again and again[0].flags == Flags.SYN | Flags.ACK and again[0].seq == first.seq


def test_half_open_connections_leave_the_syn_queue(demux):
    handshake(demux)
    assert not demux.listener.syn_queue[7]


def test_close_resets_open_connections(demux):
    handshake(demux)
    [rst] = [parse(p) for p in demux.close(T0 + 1)]
    assert rst.flags & Flags.RST
    assert not demux.connections


def test_malformed_tcp_is_counted(demux):
    pkt = bytearray(packet(syn()))
    pkt[-1] ^= 0xFF  # corrupt an option byte: checksum fails
    assert demux.handle_packet(bytes(pkt), T0) == []
    assert demux.sink.counters["drop_bad_checksum"] == 1


def test_offload_leaves_checksum_to_the_kernel_and_asks_for_tso():
    from pipeline.offload import GSO_TCPV4, NEEDS_CSUM
    from pipeline.wire.checksum import internet_checksum, pseudo_header_sum

    big = demux_mod.TcpDemux(sink(), US, TcpConfig(max_send_segment=60000), secret=b"s" * 32,
                           services={19: __import__("workers.services.tcp", fromlist=["Chargen"]).Chargen},
                           offload=True, syn_queue_limit=DEFAULT_SYN_QUEUE, max_time_wait=DEFAULT_MAX_TIME_WAIT)
    synack_pkt, _ = big.handle_packet(packet(syn(dport=19)), T0)[0]
    ip, payload = parse_ipv4(synack_pkt)
    synack = parse_tcp(payload, ip.src, ip.dst, verify_checksum=False)
    ack = TcpSegment(40000, 19, 1001, seq_add(synack.seq, 1), Flags.ACK, 65535)
    out = big.handle_packet(packet(ack), T0)
    pkt, (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) = out[0]
    assert flags == NEEDS_CSUM and csum_start == 20 and csum_offset == 16 and hdr_len == 40
    assert gso_type == GSO_TCPV4 and gso_size == 1460 and len(pkt) - 40 > 1460
    # The field holds the pseudo-header sum the kernel finishes (checksum offload).
    tcp = pkt[20:]
    assert int.from_bytes(tcp[16:18], "big") == pseudo_header_sum(US, PEER, PROTO_TCP, len(tcp))
    fixed = bytearray(tcp)
    fixed[16:18] = b"\0\0"
    fixed[16:18] = internet_checksum(bytes(fixed), pseudo_header_sum(US, PEER, PROTO_TCP, len(tcp))).to_bytes(2, "big")
    assert parse_tcp(bytes(fixed), US, PEER).payload


# --- TIME-WAIT reuse by a new SYN (RFC 6191) ------------------------------------------


def time_wait(demux, ts: bool, sport=40000, now=T0, isn=1000):
    """A QOTD connection (port 17: we close first) driven until we hold it in TIME-WAIT."""
    opts = TcpOptions(mss=1460, timestamp=(100, 0)) if ts else TcpOptions(mss=1460)
    first = TcpSegment(sport, 17, isn, 0, Flags.SYN, 65535, options=opts)
    [synack] = [parse(p) for p in demux.handle_packet(packet(first), now)]
    echo = synack.options.timestamp[0] if ts else 0

    def seg(ack, flags, tsval):
        return TcpSegment(sport, 17, seq_add(isn, 1), ack, flags, 65535,
                          options=TcpOptions(timestamp=(tsval, echo)) if ts else TcpOptions())

    out = [parse(p) for p in demux.handle_packet(packet(seg(seq_add(synack.seq, 1), Flags.ACK, 101)), now)]
    assert out and out[-1].fin  # the quote, then our FIN
    fin_end = seq_add(out[-1].seq, out[-1].seg_len)
    demux.handle_packet(packet(seg(fin_end, Flags.ACK | Flags.FIN, 102)), now)
    conn = demux.connections[Flow(PEER, sport, 17)]
    assert conn.state is State.TIME_WAIT and conn.receiver.rcv_nxt == seq_add(isn, 2)
    demux.flow_changes()
    return conn


def new_syn(seq, tsval=None, sport=40000):
    opts = TcpOptions(mss=1460, timestamp=(tsval, 0)) if tsval is not None else TcpOptions(mss=1460)
    return TcpSegment(sport, 17, seq, 0, Flags.SYN, 65535, options=opts)


@pytest.mark.parametrize("ts, syn_seq, tsval", [
    (True, 5, 200),       # RFC 6191: a newer TSval wins whatever the sequence number
    (True, 2000, 102),    # an equal TSval needs a sequence number above RCV.NXT
    (False, 2000, None),  # no timestamps: above RCV.NXT (RFC 1122 §4.2.2.13)
])
def test_new_syn_reopens_a_connection_in_time_wait(demux, ts, syn_seq, tsval):
    old = time_wait(demux, ts)
    [synack] = [parse(p) for p in demux.handle_packet(packet(new_syn(syn_seq, tsval)), T0 + 1)]
    assert synack.flags == Flags.SYN | Flags.ACK and synack.ack == seq_add(syn_seq, 1)
    # RFC 9293 §3.6.1: the new ISN lies above everything the old incarnation sent.
    assert synack.seq == seq_add(old.sender.snd_nxt, TIME_WAIT_ISN_GAP)
    new = demux.connections[Flow(PEER, 40000, 17)]
    assert new is not old and new.state is State.SYN_RECEIVED
    assert demux.sink.counters["time_wait_reused"] == 1
    assert demux.flow_changes() == ([], [])  # still our flow: ingress hears nothing
    ack = TcpSegment(40000, 17, seq_add(syn_seq, 1), seq_add(synack.seq, 1), Flags.ACK, 65535,
                     options=TcpOptions(timestamp=(tsval + 1, synack.options.timestamp[0])) if ts else TcpOptions())
    out = [parse(p) for p in demux.handle_packet(packet(ack), T0 + 1)]
    assert b"".join(s.payload for s in out).startswith(b"Be conservative")


@pytest.mark.parametrize("offset, reopens", [(1000, True), (-5, False)])
def test_time_wait_reuse_compares_across_the_sequence_wrap(demux, offset, reopens):
    isn = 2**32 - 1001  # RCV.NXT in TIME-WAIT is 2**32 - 999: a SYN 1,000 above it has wrapped
    old = time_wait(demux, False, isn=isn)
    demux.handle_packet(packet(new_syn(seq_add(old.receiver.rcv_nxt, offset))), T0 + 1)
    assert (demux.connections[Flow(PEER, 40000, 17)] is not old) == reopens
    assert demux.sink.counters["time_wait_reused"] == int(reopens)


@pytest.mark.parametrize("ts, syn_seq, tsval", [
    (True, 2000, 50),     # an older TSval: an old duplicate, whatever its sequence number
    (True, 5, 102),       # equal TSval, sequence number not above RCV.NXT
    (False, 5, None),     # no timestamps, below RCV.NXT
])
def test_old_duplicate_syn_leaves_time_wait_alone(demux, ts, syn_seq, tsval):
    old = time_wait(demux, ts)
    out = [parse(p) for p in demux.handle_packet(packet(new_syn(syn_seq, tsval)), T0 + 1)]
    assert demux.connections[Flow(PEER, 40000, 17)] is old and old.state is State.TIME_WAIT
    assert demux.sink.counters["time_wait_reused"] == 0
    assert all(not s.syn for s in out)  # TIME-WAIT answers as it always did (an ACK at most)


def test_past_the_limit_the_oldest_time_wait_ends_early():
    demux = demux_mod.TcpDemux(sink(), US, TcpConfig(), secret=b"s" * 32, syn_queue_limit=DEFAULT_SYN_QUEUE,
                               max_time_wait=2)
    held = [time_wait(demux, False, sport=40000 + i, now=T0 + i) for i in range(3)]
    # Like Linux past tcp_max_tw_buckets: the first one is gone, closed without a word to the peer.
    assert [c.state for c in held] == [State.CLOSED, State.TIME_WAIT, State.TIME_WAIT]
    assert Flow(PEER, 40000, 17) not in demux.connections
    assert list(demux.time_wait.held) == [Flow(PEER, 40001, 17), Flow(PEER, 40002, 17)]
    assert demux.sink.counters["time_wait_overflow"] == 1
    assert demux.stats() == {"connections": 2, "time_wait": 2}
    # A SYN for the freed flow is a new connection, as for any flow we hold nothing for.
    [synack] = [parse(p) for p in demux.handle_packet(packet(new_syn(5000)), T0 + 5)]
    assert synack.flags == Flags.SYN | Flags.ACK and demux.connections[Flow(PEER, 40000, 17)].state is State.SYN_RECEIVED
    # The rest leave TIME-WAIT after 2 MSL as always, and the table forgets them.
    demux.handle_timer(T0 + 3 + 2 * TcpConfig().msl)
    assert demux.time_wait.held == {} and list(demux.connections) == [Flow(PEER, 40000, 17)]


def test_with_no_time_wait_allowed_a_connection_closes_at_once():
    demux = demux_mod.TcpDemux(sink(), US, TcpConfig(), secret=b"s" * 32, syn_queue_limit=DEFAULT_SYN_QUEUE,
                               max_time_wait=0)
    with pytest.raises(KeyError):
        time_wait(demux, False)  # the helper finds no connection left in TIME-WAIT
    assert demux.connections == {} and demux.time_wait.held == {} and demux.next_deadline() is None
    assert demux.flow_changes() == ([Flow(PEER, 40000, 17)], [Flow(PEER, 40000, 17)])
