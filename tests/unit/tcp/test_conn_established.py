"""ESTABLISHED: acceptability (RFC 9293 §3.10.7.4), RFC 5961 defences, data transfer across the
sequence wrap, reassembly, delayed ACKs, flow control, SWS avoidance, Nagle, MSS, options."""

import pytest

from pipeline.wire.seqnum import seq_add, seq_ge
from pipeline.wire.tcp import Flags, TcpOptions
from tests.unit.tcp.builders import LOCAL_ISS, REMOTE_ISS, T0, config, drain, elicit_ack, established, fire, seg
from workers.tcp.connection import CHALLENGE_ACK_LIMIT, InvalidOperation, State, Timer
from workers.tcp.events import Closed, DataReceived, SendSpace

MSS = 1460


def acks(out):
    return [s for s in out if s.flags == Flags.ACK and not s.payload]


# -- segment acceptability, RFC 9293 §3.10.7.4 first check --------------------------------

def test_empty_segment_in_window_is_accepted():
    c = established()
    c.receive(seg(c, "A", seq=seq_add(c.receiver.rcv_nxt, 10)), T0)  # len 0, wnd > 0: RCV.NXT =< SEG.SEQ < RCV.NXT+RCV.WND
    assert c.segments_to_send(T0) == [] and c.invalid_segments == 0


def test_empty_segment_outside_window_gets_ack():
    c = established()
    c.receive(seg(c, "A", seq=seq_add(c.receiver.rcv_nxt, -1)), T0)
    [ack] = c.segments_to_send(T0)
    assert ack.ack == c.receiver.rcv_nxt and ack.seq == c.sender.snd_nxt and c.invalid_segments == 1


def test_old_data_is_acked_and_dropped():
    c = established()
    c.receive(seg(c, "PA", b"x" * 100, seq=seq_add(c.receiver.rcv_nxt, -100)), T0)  # entirely before RCV.NXT
    [ack] = c.segments_to_send(T0)
    assert ack.ack == seq_add(REMOTE_ISS, 1) and c.readable == 0


def test_overlapping_data_is_trimmed_at_the_left():
    c = established()
    c.receive(seg(c, "PA", b"abcdef"), T0)
    c.receive(seg(c, "PA", b"defghi", seq=seq_add(c.receiver.rcv_nxt, -3)), T0)  # last byte in window: acceptable
    assert c.recv() == b"abcdefghi"


def test_data_beyond_window_is_trimmed_at_the_right():
    c = established(config(recv_buffer=4000, mss=1000))
    c.receive(seg(c, "PA", b"z" * 5000), T0)
    assert c.readable == 4000
    [ack] = c.segments_to_send(T0)
    assert ack.window == 0 and ack.ack == seq_add(REMOTE_ISS, 1 + 4000)


def zero_window():
    c = established(config(recv_buffer=2000, mss=1000))
    c.receive(seg(c, "PA", b"z" * 2000), T0)
    [ack] = c.segments_to_send(T0)
    assert ack.window == 0
    return c


def test_zero_window_accepts_only_exact_empty_segment():
    c = zero_window()
    c.receive(seg(c, "A"), T0)  # len 0, wnd 0: SEG.SEQ = RCV.NXT
    assert c.segments_to_send(T0) == []
    c.receive(seg(c, "A", seq=seq_add(c.receiver.rcv_nxt, 1)), T0)
    assert len(c.segments_to_send(T0)) == 1 and c.invalid_segments == 1


def test_zero_window_drops_data_but_processes_its_ack():
    c = zero_window()
    c.send(b"q" * 10)
    c.segments_to_send(T0)
    c.receive(seg(c, "PA", b"more"), T0)  # len > 0, wnd 0: text not acceptable, ACK is
    assert c.sender.snd_una == c.sender.snd_nxt and c.readable == 2000
    [ack] = c.segments_to_send(T0)
    assert ack.ack == seq_add(REMOTE_ISS, 1 + 2000) and ack.window == 0


# -- RFC 5961 ------------------------------------------------------------------------------

def test_rst_exact_sequence_resets():
    c = established()
    c.receive(seg(c, "R"), T0)
    assert c.state is State.CLOSED and drain(c) == [Closed("reset")]


def test_rst_in_window_gets_challenge_ack():
    c = established()
    c.receive(seg(c, "R", seq=seq_add(c.receiver.rcv_nxt, 1)), T0)  # RFC 5961 §3.2
    assert c.state is State.ESTABLISHED
    [ack] = c.segments_to_send(T0)
    assert ack.flags == Flags.ACK and ack.ack == c.receiver.rcv_nxt and c.challenge_acks == 1


def test_rst_outside_window_is_silently_dropped():
    c = established()
    c.receive(seg(c, "R", seq=seq_add(c.receiver.rcv_nxt, 100000)), T0)
    assert c.state is State.ESTABLISHED and c.segments_to_send(T0) == []


def test_syn_in_established_gets_challenge_ack():
    c = established()
    c.receive(seg(c, "S", seq=seq_add(c.receiver.rcv_nxt, 5)), T0)  # RFC 5961 §4.2, whatever the sequence number
    assert c.state is State.ESTABLISHED
    [ack] = c.segments_to_send(T0)
    assert ack.flags == Flags.ACK and c.challenge_acks == 1


def test_ack_of_unsent_data_gets_ack_and_is_dropped():
    c = established()
    c.receive(seg(c, "PA", b"data", ack=seq_add(c.sender.snd_nxt, 1000)), T0)  # RFC 5961 §5.2 / RFC 9293 fifth
    [ack] = c.segments_to_send(T0)
    assert ack.ack == seq_add(REMOTE_ISS, 1) and c.readable == 0


def test_ack_too_old_is_dropped():
    c = established()
    c.send(b"x" * 100)
    c.segments_to_send(T0)
    c.receive(seg(c, "PA", b"data", ack=seq_add(c.sender.snd_una, -70000)), T0)  # below SND.UNA - MAX.SND.WND
    assert c.readable == 0 and len(c.segments_to_send(T0)) == 1


def test_challenge_acks_are_rate_limited():
    c = established()
    for _ in range(3 * CHALLENGE_ACK_LIMIT):
        c.receive(seg(c, "R", seq=seq_add(c.receiver.rcv_nxt, 7)), T0)
        c.segments_to_send(T0)
    assert c.challenge_acks == CHALLENGE_ACK_LIMIT
    assert c.challenge_acks_suppressed == 2 * CHALLENGE_ACK_LIMIT
    c.receive(seg(c, "R", seq=seq_add(c.receiver.rcv_nxt, 7)), T0 + 1.0)
    assert c.challenge_acks == CHALLENGE_ACK_LIMIT + 1


# -- data across the wrap ------------------------------------------------------------------

def test_sending_across_sequence_wrap():
    c = established(config(nagle=False))
    assert int(c.sender.snd_nxt) > 2**32 - 5
    data = bytes(range(256)) * 20
    assert c.send(data) == len(data)
    out = c.segments_to_send(T0)
    assert b"".join(s.payload for s in out) == data
    assert [len(s.payload) for s in out] == [MSS, MSS, MSS, 740]
    assert int(out[1].seq) < 2000  # wrapped
    c.receive(seg(c, "A", ack=seq_add(out[-1].seq, len(out[-1].payload))), T0 + 0.01)
    assert c.sender.snd_una == c.sender.snd_nxt == seq_add(LOCAL_ISS, 1 + len(data))
    assert c.get_timer() is None


def test_receiving_across_sequence_wrap():
    c = established()
    base = c.receiver.rcv_nxt
    for k in range(3):
        c.receive(seg(c, "PA", bytes([k]) * 1000), T0)
    assert c.receiver.rcv_nxt == seq_add(base, 3000) and int(c.receiver.rcv_nxt) < int(base)
    assert c.recv() == b"\0" * 1000 + b"\1" * 1000 + b"\2" * 1000


# -- out of order, reassembly, SACK --------------------------------------------------------

def test_out_of_order_is_held_acked_at_once_and_reassembled():
    c = established(config(sack=True), options=TcpOptions(mss=1460, sack_permitted=True))
    start = c.receiver.rcv_nxt
    blob = bytes(range(250)) * 16  # 4000 bytes; segment k is blob[1000k:1000(k+1)]

    def part(a, b):
        return seg(c, "A", blob[a:b], seq=seq_add(start, a))

    c.receive(part(1000, 2000), T0)
    [dup] = c.segments_to_send(T0)  # RFC 5681 §4.2: immediate duplicate ACK
    assert dup.ack == start and dup.options.sack_blocks == ((seq_add(start, 1000), seq_add(start, 2000)),)
    c.receive(part(3000, 4000), T0)
    [dup] = c.segments_to_send(T0)
    # RFC 2018 §4: the most recent block first
    assert dup.options.sack_blocks == ((seq_add(start, 3000), seq_add(start, 4000)), (seq_add(start, 1000), seq_add(start, 2000)))
    c.receive(part(3000, 4000), T0)  # a duplicate changes nothing
    assert c.readable == 0 and drain(c) == [] and c.ooo_segments == 3
    c.receive(part(0, 1000), T0)  # fills the first gap
    [ack] = c.segments_to_send(T0)  # RFC 5681 §4.2: ACK at once when a gap is filled
    assert ack.ack == seq_add(start, 2000) and ack.options.sack_blocks == ((seq_add(start, 3000), seq_add(start, 4000)),)
    c.receive(part(1500, 3500), T0)  # overlaps both sides of the last gap
    [ack] = c.segments_to_send(T0)
    assert ack.ack == seq_add(start, 4000) and not ack.options.sack_blocks
    assert c.recv() == blob
    assert drain(c) == [DataReceived()]


def test_fin_beyond_a_gap_waits_for_the_gap():
    c = established()
    start = c.receiver.rcv_nxt
    c.receive(seg(c, "FA", b"tail", seq=seq_add(start, 4)), T0)
    assert c.state is State.ESTABLISHED
    c.receive(seg(c, "A", b"head"), T0)
    assert c.state is State.CLOSE_WAIT and c.recv() == b"headtail" and c.receiver.rcv_nxt == seq_add(start, 9)


def test_large_incoming_segment_is_one_byte_range():
    c = established(config(recv_buffer=1 << 20, window_scaling=True), options=TcpOptions(mss=1460, window_scale=7))
    c.segments_to_send(T0)  # advertise the scaled window
    elicit_ack(c)
    c.segments_to_send(T0)
    blob = bytes(range(256)) * 256  # 64 KB, as GRO/TSO delivers it
    c.receive(seg(c, "PA", blob), T0)
    [ack] = c.segments_to_send(T0)  # more than two full segments: ACK at once
    assert ack.ack == seq_add(REMOTE_ISS, 1 + len(blob)) and c.recv() == blob


# -- delayed ACK, RFC 9293 §3.8.6.3 --------------------------------------------------------

def test_single_segment_ack_is_delayed():
    c = established()
    c.receive(seg(c, "PA", b"x" * MSS), T0)
    assert c.segments_to_send(T0) == []
    assert c.get_timer() == T0 + 0.04
    now = fire(c)
    [ack] = c.segments_to_send(now)
    assert ack.ack == seq_add(REMOTE_ISS, 1 + MSS)


def test_every_second_full_segment_is_acked_at_once():
    c = established()
    c.receive(seg(c, "A", b"x" * MSS), T0)
    c.receive(seg(c, "A", b"y" * MSS), T0)
    [ack] = c.segments_to_send(T0)
    assert ack.ack == seq_add(REMOTE_ISS, 1 + 2 * MSS) and Timer.DELAYED_ACK not in c.timers


def test_delayed_ack_rides_on_data():
    c = established()
    c.receive(seg(c, "PA", b"ping"), T0)
    c.send(b"pong")
    [s] = c.segments_to_send(T0)
    assert s.payload == b"pong" and s.ack == seq_add(REMOTE_ISS, 5) and Timer.DELAYED_ACK not in c.timers


# -- flow control: our window ----------------------------------------------------------------

def test_window_is_free_buffer_space_and_reopens_on_read():
    c = established(config(recv_buffer=10000, mss=1000))
    c.receive(seg(c, "A", b"a" * 1000), T0)
    c.receive(seg(c, "A", b"b" * 1000), T0)
    [ack] = c.segments_to_send(T0)
    assert ack.window == 8000  # honest: buffer minus unread bytes
    c.receive(seg(c, "A", b"c" * 8000), T0)
    [ack] = c.segments_to_send(T0)
    assert ack.window == 0
    assert c.recv(500) == b"a" * 500  # small read: receiver SWS avoidance, no update
    assert c.segments_to_send(T0) == []
    elicit_ack(c)
    [ack] = c.segments_to_send(T0)
    assert ack.window == 0  # an increase below min(RCV.BUFF/2, MSS) is not advertised
    c.recv(1500)  # now 2000 free: >= 2 segments, send a window update (RFC 9293 §3.8.6.2.2)
    [upd] = c.segments_to_send(T0)
    assert upd.window == 2000 and upd.ack == ack.ack


def test_right_edge_never_moves_left():
    c = established(config(recv_buffer=8192, window_scaling=True, mss=1000),
                    options=TcpOptions(mss=1000, window_scale=0))
    elicit_ack(c)
    [first] = c.segments_to_send(T0)
    edge = seq_add(first.ack, first.window)
    c.receive(seg(c, "A", b"x" * 3000), T0)
    [ack] = c.segments_to_send(T0)
    assert seq_ge(seq_add(ack.ack, ack.window), edge)


def test_window_scaling_applies_both_ways():
    cfg = config(recv_buffer=1 << 20, window_scaling=True)
    c = established(cfg, options=TcpOptions(mss=1460, window_scale=4), peer_window=1000)
    assert c.sender.snd_wnd == 16000
    c.receive(seg(c, "A", window=2000), T0)
    assert c.sender.snd_wnd == 32000  # RFC 7323 §2.3: SND.WND = SEG.WND << Snd.Wind.Shift
    elicit_ack(c)
    [ack] = c.segments_to_send(T0)
    assert c.options.rcv_wscale == 5 and ack.window == cfg.initial_recv_buffer() >> 5  # scale chosen from the maximum


def test_window_update_rule_ignores_older_segments():
    c = established()
    c.receive(seg(c, "PA", b"x" * 10, window=30000), T0)
    c.receive(seg(c, "A", seq=seq_add(c.receiver.rcv_nxt, -10), window=100), T0)  # older SEG.SEQ than SND.WL1
    assert c.sender.snd_wnd == 30000


# -- flow control: the peer's window -----------------------------------------------------------

def test_peer_window_limits_what_is_sent():
    c = established(peer_window=3000)
    c.send(b"x" * 10000)
    out = c.segments_to_send(T0)
    assert sum(len(s.payload) for s in out) == 2920  # two full segments; 80 bytes would be SWS
    c.receive(seg(c, "A", window=3000), T0)
    assert sum(len(s.payload) for s in c.segments_to_send(T0)) == 2920


def test_sender_sws_sends_half_the_max_window():
    c = established(peer_window=2000)
    c.send(b"x" * 5000)
    [s] = c.segments_to_send(T0)
    assert len(s.payload) == MSS
    c.receive(seg(c, "A", window=1000), T0)  # 1000 usable, < MSS but >= max window / 2
    [s] = c.segments_to_send(T0)
    assert len(s.payload) == 1000


def test_zero_window_probe_with_backoff_and_no_abort_while_answered():
    c = established(config(max_retries=2), peer_window=0)
    c.send(b"abcdefgh")
    assert c.segments_to_send(T0) == []
    assert c.timers.deadline(Timer.ZERO_WINDOW_PROBE) == T0 + 1.0
    now = fire(c)
    [probe] = c.segments_to_send(now)
    assert probe.payload == b"a" and c.zero_window_probes == 1  # RFC 9293 §3.8.6.1: one new octet
    gaps = []
    for _ in range(5):  # more probes than max_retries: the peer answers, so we never give up
        c.receive(seg(c, "A", ack=c.sender.snd_una, window=0), now)
        c.segments_to_send(now)
        t = fire(c)
        gaps.append(t - now)
        now = t
        [again] = c.segments_to_send(now)
        assert again.payload == b"a" and again.seq == probe.seq
    assert gaps == [2.0, 4.0, 8.0, 16.0, 32.0] and c.state is State.ESTABLISHED
    assert c.zero_window_probes == 6  # every probe counts, first by the persist timer, the rest by RTO
    c.receive(seg(c, "A", ack=seq_add(c.sender.snd_una, 1), window=1000), now)  # the window opens
    [rest] = c.segments_to_send(now)
    assert rest.payload == b"bcdefgh"


def test_window_closing_on_data_in_flight_is_probed_by_the_retransmission_timer():
    # The peer takes the first segment and closes its window on the second, as a Linux
    # receiver whose application stopped reading does: its RTO resends are the probes.
    c = established(peer_window=2 * MSS)
    c.send(b"x" * (2 * MSS + 10))
    first, second = c.segments_to_send(T0)
    c.receive(seg(c, "A", ack=seq_add(first.seq, MSS), window=0), T0)
    assert c.segments_to_send(T0) == []
    cwnd = c.sender.cc.cwnd
    for n in (1, 2, 3):
        now = fire(c)
        [probe] = c.segments_to_send(now)
        assert probe.seq == second.seq and len(probe.payload) == 1  # RFC 9293 §3.8.6.1
        assert c.zero_window_probes == n
        c.receive(seg(c, "A", ack=c.sender.snd_una, window=0), now)
    assert c.sender.cc.cwnd == cwnd  # a closed window is not congestion
    c.receive(seg(c, "A", ack=c.sender.snd_una, window=4 * MSS), now)  # opens, the probe octet not taken
    [again] = c.segments_to_send(now)
    assert again.seq == second.seq and len(again.payload) == MSS  # from SND.UNA: no hole
    assert c.fast_retransmits == 0


def test_window_opening_after_an_unaccepted_probe_resends_from_snd_una():
    c = established(peer_window=0)
    c.send(b"abcdefgh")
    assert c.segments_to_send(T0) == []
    now = fire(c)
    [probe] = c.segments_to_send(now)
    assert probe.payload == b"a"
    c.receive(seg(c, "A", ack=c.sender.snd_una, window=1000), now)  # the window opens before the probe is resent
    [again] = c.segments_to_send(now)
    assert again.seq == probe.seq and again.payload == b"a"  # from SND.UNA, not past a hole
    c.receive(seg(c, "A", ack=seq_add(probe.seq, 1), window=1000), now)
    [rest] = c.segments_to_send(now)
    assert rest.payload == b"bcdefgh" and c.fast_retransmits == 0


def test_send_buffer_back_pressure_and_send_space_event():
    c = established(config(send_buffer=4000), peer_window=65535)
    assert c.send(b"x" * 5000) == 4000 and c.send_space == 0
    assert c.send(b"y") == 0
    out = c.segments_to_send(T0)
    c.receive(seg(c, "A", ack=seq_add(out[1].seq, len(out[1].payload))), T0)
    assert drain(c) == [SendSpace()] and c.send_space == 2 * MSS
    c.receive(seg(c, "A"), T0)
    assert drain(c) == []  # once per condition change


def test_send_after_close_raises():
    c = established()
    c.close()
    with pytest.raises(InvalidOperation):
        c.send(b"late")


# -- MSS and segment size ----------------------------------------------------------------------

def test_segments_respect_peer_mss():
    c = established(config(nagle=False), options=TcpOptions(mss=536))
    c.send(b"x" * 2000)
    assert [len(s.payload) for s in c.segments_to_send(T0)] == [536, 536, 536, 392]


def test_segments_leave_room_for_timestamps_and_sack():
    c = established(config(timestamps=True, sack=True), options=TcpOptions(mss=1000, sack_permitted=True,
                                                                          timestamp=(1, 0)))
    c.send(b"x" * 3000)
    out = c.segments_to_send(T0)
    assert [len(s.payload) for s in out[:2]] == [988, 988]  # 12 bytes of TS
    assert all(s.header_len - 20 + len(s.payload) <= 1000 for s in out)
    c.receive(seg(c, "A", b"q", seq=seq_add(c.receiver.rcv_nxt, 5), options=TcpOptions(timestamp=(2, 0))), T0)  # a gap
    c.receive(seg(c, "A", window=65535, options=TcpOptions(timestamp=(3, 0))), T0)
    c.send(b"y" * 3000)
    out = c.segments_to_send(T0)
    assert out[0].options.sack_blocks
    assert all(s.header_len - 20 + len(s.payload) <= 1000 for s in out)


def test_max_send_segment_allows_large_segments():
    c = established(config(max_send_segment=65536), peer_window=65535)
    c.send(b"x" * 60000)
    out = c.segments_to_send(T0)
    assert [len(s.payload) for s in out] == [14600]  # the initial window, in one segment


# -- Nagle, RFC 9293 §3.7.4 --------------------------------------------------------------------

def test_nagle_holds_small_segment_while_data_is_unacked():
    c = established()
    c.send(b"a")
    assert [s.payload for s in c.segments_to_send(T0)] == [b"a"]
    c.send(b"b")
    c.send(b"c")
    assert c.segments_to_send(T0) == []
    c.receive(seg(c, "A"), T0)
    assert [s.payload for s in c.segments_to_send(T0)] == [b"bc"]


def test_nagle_off_sends_at_once():
    c = established(config(nagle=False))
    c.send(b"a")
    c.segments_to_send(T0)
    c.send(b"b")
    assert [s.payload for s in c.segments_to_send(T0)] == [b"b"]


def test_nagle_lets_full_segments_through():
    c = established()
    c.send(b"a")
    c.segments_to_send(T0)
    c.send(b"x" * (MSS + 10))
    assert [len(s.payload) for s in c.segments_to_send(T0)] == [MSS]


# -- timestamps, RFC 7323 -------------------------------------------------------------------------

def ts_conn():
    return established(config(timestamps=True), options=TcpOptions(mss=1460, timestamp=(5000, 0)))


def test_every_segment_carries_tsval_and_echo():
    c = ts_conn()
    c.send(b"x")
    [s] = c.segments_to_send(T0 + 0.25)
    assert s.options.timestamp == (int((T0 + 0.25) * 1000), 5000)


def test_ts_recent_follows_in_order_segments():
    c = ts_conn()
    c.receive(seg(c, "PA", b"x", options=TcpOptions(timestamp=(6000, 1))), T0)
    assert c.receiver.ts_recent == 6000


def test_paws_drops_old_timestamp():
    c = ts_conn()
    c.receive(seg(c, "PA", b"new", options=TcpOptions(timestamp=(6000, 1))), T0)
    c.segments_to_send(T0)
    c.receive(seg(c, "PA", b"old", options=TcpOptions(timestamp=(5999, 1))), T0)  # RFC 7323 §5.3 R1
    [ack] = c.segments_to_send(T0)
    assert c.paws_rejected == 1 and c.recv() == b"new" and ack.ack == c.receiver.rcv_nxt


def test_paws_compares_modulo_2_32():
    c = established(config(timestamps=True), options=TcpOptions(mss=1460, timestamp=(2**32 - 10, 0)))
    c.receive(seg(c, "PA", b"x", options=TcpOptions(timestamp=(5, 1))), T0)  # later, across the wrap
    assert c.paws_rejected == 0 and c.recv() == b"x"


def test_rtt_from_timestamp_echo():
    c = ts_conn()
    c.send(b"x" * 100)
    [s] = c.segments_to_send(T0)
    c.receive(seg(c, "A", options=TcpOptions(timestamp=(5001, s.options.timestamp[0]))), T0 + 0.08)
    assert abs(c.sender.rtt.srtt - 0.08) < 0.0015


def test_lost_window_update_does_not_stall_a_small_window():
    # Sender SWS avoidance holds back 1000 bytes (< MSS, < half the max window); the
    # persist timer overrides it (RFC 9293 §3.8.6.2.1) since nothing is in flight.
    c = established(config(nagle=False), peer_window=4000)
    c.send(b"x" * 5000)
    out = c.segments_to_send(T0)
    assert sum(len(s.payload) for s in out) == 2 * MSS
    c.receive(seg(c, "A", window=1000), T0 + 0.1)  # all acked, but only 1000 bytes of window
    assert c.segments_to_send(T0 + 0.1) == []
    assert c.timers.armed() == {Timer.ZERO_WINDOW_PROBE}
    now = fire(c)
    [s] = c.segments_to_send(now)
    assert len(s.payload) == 1000 and c.zero_window_probes == 0
