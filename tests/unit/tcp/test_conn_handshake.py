"""Opening: LISTEN/SYN-SENT/SYN-RECEIVED (RFC 9293 §3.5, §3.10.7.2-4), option negotiation
(RFC 9293 §3.7.1, RFC 7323, RFC 2018), SYN retransmission (RFC 6298), SYN cookies."""

from pipeline.wire.seqnum import seq_add
from pipeline.wire.tcp import Flags, TcpOptions, TcpSegment
from tests.unit.tcp.builders import (
    FULL, LOCAL_ISS, LOCAL_PORT, PLAIN, REMOTE_ISS, REMOTE_PORT, T0, Pair, config, drain, fire, seg, syn, syn_received,
)
from workers.tcp.connection import Connection, State, Timer
from workers.tcp.events import Closed, Connected, DataReceived

ALL = dict(window_scaling=True, timestamps=True, sack=True)


# -- SYN-SENT ----------------------------------------------------------------------------

def test_connect_sends_syn_with_our_options():
    c = Connection.connect(REMOTE_PORT, LOCAL_PORT, LOCAL_ISS, config(**ALL, recv_buffer=1 << 20), T0)
    assert c.state is State.SYN_SENT
    [s] = c.segments_to_send(T0)
    assert (s.src_port, s.dst_port, s.seq, s.flags) == (REMOTE_PORT, LOCAL_PORT, LOCAL_ISS, Flags.SYN)
    assert s.options.mss == 1460 and s.options.sack_permitted
    assert s.options.window_scale == 5  # 1 MB >> 5 fits 16 bits (RFC 7323 §2.3)
    assert s.options.timestamp == (int(T0 * 1000), 0)
    assert s.window == 0xFFFF  # RFC 7323 §2.2: a SYN's window is unscaled


def test_syn_sent_syn_ack_establishes_and_acks():
    c = Connection.connect(REMOTE_PORT, LOCAL_PORT, LOCAL_ISS, config(), T0)
    c.segments_to_send(T0)
    c.receive(seg(c, "SA", seq=REMOTE_ISS, ack=seq_add(LOCAL_ISS, 1), options=PLAIN), T0 + 0.05)
    assert c.state is State.ESTABLISHED and drain(c) == [Connected()]
    [ack] = c.segments_to_send(T0 + 0.05)
    assert ack.flags == Flags.ACK and ack.seq == seq_add(LOCAL_ISS, 1) and ack.ack == seq_add(REMOTE_ISS, 1)
    assert abs(c.sender.rtt.srtt - 0.05) < 1e-9  # the SYN was not retransmitted: a valid sample (RFC 6298 §3)
    assert c.get_timer() is None


def test_syn_sent_bad_ack_gets_reset():
    # RFC 9293 §3.10.7.3 first: SEG.ACK =< ISS or > SND.NXT -> <SEQ=SEG.ACK><CTL=RST>.
    c = Connection.connect(REMOTE_PORT, LOCAL_PORT, LOCAL_ISS, config(), T0)
    c.segments_to_send(T0)
    c.receive(seg(c, "SA", seq=REMOTE_ISS, ack=seq_add(LOCAL_ISS, 5)), T0)
    [rst] = c.segments_to_send(T0)
    assert rst.flags == Flags.RST and rst.seq == seq_add(LOCAL_ISS, 5)
    assert c.state is State.SYN_SENT


def test_syn_sent_rst_needs_acceptable_ack():
    c = Connection.connect(REMOTE_PORT, LOCAL_PORT, LOCAL_ISS, config(), T0)
    c.segments_to_send(T0)
    c.receive(seg(c, "R", seq=0, ack=0), T0)  # no ACK: ignored (RFC 9293 §3.10.7.3 second)
    assert c.state is State.SYN_SENT
    c.receive(seg(c, "RA", seq=0, ack=seq_add(LOCAL_ISS, 1)), T0)
    assert c.state is State.CLOSED and drain(c) == [Closed("reset")]


def test_syn_retransmitted_with_backoff_then_timeout():
    cfg = config(max_syn_retries=3)
    c = Connection.connect(REMOTE_PORT, LOCAL_PORT, LOCAL_ISS, cfg, T0)
    c.segments_to_send(T0)
    times = []
    while c.state is State.SYN_SENT:
        now = fire(c)
        times.append(now - T0)
        out = c.segments_to_send(now)
        if c.state is State.SYN_SENT:
            assert [s.flags for s in out] == [Flags.SYN] and out[0].seq == LOCAL_ISS
    assert times == [1.0, 3.0, 7.0, 15.0]  # RFC 6298 §5.5: 1, 2, 4, 8 s apart
    assert drain(c) == [Closed("timeout")] and c.retransmissions == 3


def test_karn_no_rtt_sample_from_retransmitted_syn():
    c = Connection.connect(REMOTE_PORT, LOCAL_PORT, LOCAL_ISS, config(), T0)
    c.segments_to_send(T0)
    now = fire(c)
    c.segments_to_send(now)
    c.receive(seg(c, "SA", seq=REMOTE_ISS, ack=seq_add(LOCAL_ISS, 1)), now + 0.01)
    assert c.state is State.ESTABLISHED
    assert c.sender.rtt.srtt is None and c.sender.rtt.rto == 3.0  # RFC 6298 §5.7: 3 s until a valid sample
    assert c.sender.cc.cwnd == c.sender.send_mss  # RFC 5681 §3.1: IW is one segment after a lost SYN


def test_timestamps_give_rtt_even_after_retransmission():
    # RFC 7323 §4: the echoed TSval identifies the transmission, so Karn's rule is moot.
    c = Connection.connect(REMOTE_PORT, LOCAL_PORT, LOCAL_ISS, config(timestamps=True), T0)
    c.segments_to_send(T0)
    now = fire(c)
    [syn2] = c.segments_to_send(now)
    echo = syn2.options.timestamp[0]
    c.receive(seg(c, "SA", seq=REMOTE_ISS, ack=seq_add(LOCAL_ISS, 1), options=TcpOptions(timestamp=(77, echo))), now + 0.03)
    assert c.options.timestamps and abs(c.sender.rtt.srtt - 0.03) < 0.0015


def test_simultaneous_open():
    # RFC 9293 §3.5 Figure 7: both send SYN, both go SYN-RECEIVED, then ESTABLISHED.
    a = Connection.connect(1000, 2000, 2**32 - 2, config(), T0)
    b = Connection.connect(2000, 1000, 2**32 - 50, config(), T0)
    sa, sb = a.segments_to_send(T0), b.segments_to_send(T0)
    a.receive(sb[0], T0)
    b.receive(sa[0], T0)
    assert a.state is b.state is State.SYN_RECEIVED
    for _ in range(5):
        oa, ob = a.segments_to_send(T0), b.segments_to_send(T0)
        for s in oa:
            b.receive(s, T0)
        for s in ob:
            a.receive(s, T0)
    assert a.state is b.state is State.ESTABLISHED
    assert Connected() in drain(a) and Connected() in drain(b)
    a.send(b"hello")
    for s in a.segments_to_send(T0):
        b.receive(s, T0)
    assert b.recv() == b"hello"


# -- SYN-RECEIVED ------------------------------------------------------------------------

def test_accept_sends_syn_ack_with_negotiated_options():
    c = Connection.accept(LOCAL_PORT, REMOTE_PORT, syn(FULL), LOCAL_ISS, config(**ALL), T0)
    assert c.state is State.SYN_RECEIVED
    [sa] = c.segments_to_send(T0)
    assert sa.flags == Flags.SYN | Flags.ACK and sa.seq == LOCAL_ISS and sa.ack == seq_add(REMOTE_ISS, 1)
    assert sa.options.window_scale == 3 and sa.options.sack_permitted
    assert sa.options.timestamp == (int(T0 * 1000), 5000)  # echoes the SYN's TSval
    assert c.options.ws_ok and c.options.snd_wscale == 7 and c.options.rcv_wscale == 3
    assert c.sender.send_mss == 1460 - 12  # timestamps cost 12 bytes per segment (RFC 9293 §3.7.1)


def test_accept_offers_only_what_the_peer_offered():
    c = Connection.accept(LOCAL_PORT, REMOTE_PORT, syn(TcpOptions()), LOCAL_ISS, config(**ALL), T0)
    [sa] = c.segments_to_send(T0)
    assert sa.options.window_scale is None and not sa.options.sack_permitted and sa.options.timestamp is None
    assert not (c.options.ws_ok or c.options.sack or c.options.timestamps)
    assert c.options.peer_mss == 536  # RFC 9293 §3.7.1 default


def test_window_scale_clamped_to_14():
    c = Connection.accept(LOCAL_PORT, REMOTE_PORT, syn(TcpOptions(mss=1460, window_scale=20)), LOCAL_ISS,
                          config(window_scaling=True), T0)
    assert c.options.snd_wscale == 14  # RFC 7323 §2.3


def test_syn_received_ack_establishes():
    c = syn_received()
    c.receive(seg(c, "A", b"GET /"), T0 + 0.1)
    assert c.state is State.ESTABLISHED
    assert drain(c) == [Connected(), DataReceived()]
    assert c.recv() == b"GET /"
    assert abs(c.sender.rtt.srtt - 0.1) < 1e-9


def test_syn_received_bad_ack_gets_reset():
    c = syn_received()
    c.receive(seg(c, "A", ack=seq_add(LOCAL_ISS, 10)), T0)
    [rst] = c.segments_to_send(T0)
    assert rst.flags == Flags.RST and rst.seq == seq_add(LOCAL_ISS, 10) and c.state is State.SYN_RECEIVED


def test_syn_received_repeated_syn_repeats_syn_ack():
    c = syn_received()
    c.receive(syn(), T0 + 0.5)
    [sa] = c.segments_to_send(T0 + 0.5)
    assert sa.flags == Flags.SYN | Flags.ACK and sa.seq == LOCAL_ISS


def test_syn_received_rst_in_window_closes():
    c = syn_received()
    c.receive(seg(c, "R", ack=0), T0)
    assert c.state is State.CLOSED and drain(c) == [Closed("reset")]


def test_syn_ack_retransmitted_then_timeout():
    c = syn_received(config(max_syn_retries=2))
    now = fire(c)
    [sa] = c.segments_to_send(now)
    assert sa.flags == Flags.SYN | Flags.ACK
    fire(c)
    fire(c)
    assert c.state is State.CLOSED and drain(c) == [Closed("timeout")]


def test_close_in_syn_received_sends_fin_once_established():
    c = syn_received()
    c.close()
    assert c.state is State.SYN_RECEIVED
    c.receive(seg(c, "A"), T0)
    assert c.state is State.FIN_WAIT_1
    [fin] = c.segments_to_send(T0)
    assert fin.flags == Flags.FIN | Flags.ACK and fin.seq == seq_add(LOCAL_ISS, 1)


def test_close_in_syn_sent_just_closes():
    c = Connection.connect(REMOTE_PORT, LOCAL_PORT, LOCAL_ISS, config(), T0)
    c.close()
    assert c.state is State.CLOSED and drain(c) == [Closed("closed")]


# -- SYN cookies -------------------------------------------------------------------------

def test_from_cookie_is_established_and_takes_data():
    ack = TcpSegment(REMOTE_PORT, LOCAL_PORT, seq_add(REMOTE_ISS, 1), seq_add(LOCAL_ISS, 1), Flags.ACK | Flags.PSH, 1000,
                     b"hello")
    c = Connection.from_cookie(LOCAL_PORT, REMOTE_PORT, ack, LOCAL_ISS, 1200, config(**ALL), T0)
    assert c.state is State.ESTABLISHED
    assert drain(c) == [Connected(), DataReceived()]
    assert c.recv() == b"hello"
    assert not (c.options.ws_ok or c.options.sack or c.options.timestamps) and c.sender.send_mss == 1200 and c.sender.snd_wnd == 1000
    c.send(b"world")
    out = c.segments_to_send(T0)
    assert out[0].payload == b"world" and out[0].ack == seq_add(REMOTE_ISS, 6)


# -- both ends ---------------------------------------------------------------------------

def test_pair_negotiates_everything_across_the_wrap():
    p = Pair(config(**ALL), config(**ALL))
    p.pump()
    assert p.client.state is p.server.state is State.ESTABLISHED
    for c in (p.client, p.server):
        assert c.options.ws_ok and c.options.sack and c.options.timestamps
    assert p.client.options.snd_wscale == p.server.options.rcv_wscale == 3
    assert Timer.RETRANSMIT not in p.client.timers
