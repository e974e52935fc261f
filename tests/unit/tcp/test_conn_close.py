"""Closing (RFC 9293 §3.6, §3.10.4, §3.10.7.4): active, passive, simultaneous close, half-close,
TIME-WAIT, FIN retransmission, abort, keepalive (§3.8.4)."""

from pipeline.wire.seqnum import seq_add
from pipeline.wire.tcp import Flags
from tests.unit.tcp.builders import (
    T0, Pair, close_wait, closing, config, drain, established, fin_wait_1, fin_wait_2, fire, last_ack, seg, time_wait,
)
from workers.tcp.connection import State, Timer
from workers.tcp.events import Closed, DataReceived, PeerClosed

MSL = 30.0


# -- FIN-WAIT-1 / FIN-WAIT-2 -----------------------------------------------------------------

def test_close_sends_fin_after_queued_data():
    c = established(config(nagle=False))
    c.send(b"last words")
    c.close()
    assert c.state is State.FIN_WAIT_1
    [s] = c.segments_to_send(T0)
    assert s.payload == b"last words" and s.flags == Flags.ACK | Flags.PSH | Flags.FIN


def test_fin_wait_1_ack_of_fin_goes_to_fin_wait_2():
    c = fin_wait_1()
    c.receive(seg(c, "A"), T0)
    assert c.state is State.FIN_WAIT_2 and c.get_timer() is None


def test_fin_is_retransmitted():
    c = fin_wait_1()
    now = fire(c)
    [s] = c.segments_to_send(now)
    assert s.flags == Flags.ACK | Flags.FIN and s.seq == seq_add(c.sender.snd_nxt, -1)


def test_fin_retransmission_gives_up():
    c = fin_wait_1(config(max_retries=2))
    for _ in range(3):
        fire(c)
    assert c.state is State.CLOSED and drain(c) == [Closed("timeout")]


def test_half_close_still_receives():
    c = fin_wait_2()
    c.receive(seg(c, "PA", b"more data"), T0)
    assert c.recv() == b"more data" and c.state is State.FIN_WAIT_2
    assert drain(c) == [DataReceived()]


def test_fin_wait_2_fin_goes_to_time_wait_and_acks():
    c = fin_wait_2()
    c.receive(seg(c, "FA"), T0)
    assert c.state is State.TIME_WAIT and drain(c) == [PeerClosed()]
    [ack] = c.segments_to_send(T0)
    assert ack.flags == Flags.ACK and ack.ack == c.receiver.rcv_nxt
    assert c.get_timer() == T0 + 2 * MSL


def test_fin_wait_1_fin_and_ack_together_go_to_time_wait():
    c = fin_wait_1()
    c.receive(seg(c, "FA"), T0)
    assert c.state is State.TIME_WAIT


# -- CLOSING (simultaneous close) --------------------------------------------------------------

def test_fin_wait_1_fin_without_ack_of_ours_is_closing():
    c = fin_wait_1()
    c.receive(seg(c, "FA", ack=c.sender.snd_una), T0)
    assert c.state is State.CLOSING


def test_closing_ack_of_fin_goes_to_time_wait():
    c = closing()
    c.receive(seg(c, "A"), T0)
    assert c.state is State.TIME_WAIT


def test_simultaneous_close_through_real_exchange():
    p = Pair()
    p.pump()
    p.client.close()
    p.server.close()
    fc, fs = p.client.segments_to_send(p.now), p.server.segments_to_send(p.now)
    p.server.receive(fc[0], p.now)
    p.client.receive(fs[0], p.now)
    assert p.client.state is p.server.state is State.CLOSING
    p.pump()
    assert p.client.state is p.server.state is State.TIME_WAIT
    p.advance(2 * MSL)
    assert p.client.state is p.server.state is State.CLOSED


# -- TIME-WAIT ----------------------------------------------------------------------------------

def test_time_wait_reacks_retransmitted_fin_and_restarts_2msl():
    c = time_wait()
    later = T0 + 10
    c.receive(seg(c, "FA", seq=seq_add(c.receiver.rcv_nxt, -1)), later)
    [ack] = c.segments_to_send(later)
    assert ack.flags == Flags.ACK and ack.ack == c.receiver.rcv_nxt
    assert c.get_timer() == later + 2 * MSL and c.state is State.TIME_WAIT


def test_time_wait_expires_after_2msl():
    c = time_wait()
    assert fire(c) == T0 + 2 * MSL
    assert c.state is State.CLOSED and drain(c) == [Closed("closed")]


# -- CLOSE-WAIT / LAST-ACK (passive close) -------------------------------------------------------

def test_peer_fin_in_established_is_close_wait_and_acked_at_once():
    c = established()
    c.receive(seg(c, "PFA", b"bye"), T0)
    assert c.state is State.CLOSE_WAIT
    assert drain(c) == [DataReceived(), PeerClosed()]
    [ack] = c.segments_to_send(T0)
    assert ack.ack == c.receiver.rcv_nxt
    assert c.recv() == b"bye" and c.recv() == b""


def test_close_wait_can_still_send():
    c = close_wait()
    c.send(b"reply")
    [s] = c.segments_to_send(T0)
    assert s.payload == b"reply"


def test_close_wait_close_is_last_ack_then_closed():
    c = close_wait()
    c.close()
    assert c.state is State.LAST_ACK
    [fin] = c.segments_to_send(T0)
    assert fin.flags & Flags.FIN
    c.receive(seg(c, "A"), T0)
    assert c.state is State.CLOSED and drain(c) == [Closed("closed")]


def test_last_ack_retransmits_fin():
    c = last_ack()
    now = fire(c)
    [fin] = c.segments_to_send(now)
    assert fin.flags & Flags.FIN


def test_data_after_fin_is_ignored_but_acked():
    c = close_wait()
    c.receive(seg(c, "PA", b"zombie", seq=c.receiver.rcv_nxt), T0)
    assert c.readable == 0


# -- full sequences ------------------------------------------------------------------------------

def test_active_and_passive_close_through_real_exchange():
    p = Pair()
    p.pump()
    p.client.send(b"request")
    p.client.close()
    p.pump()
    assert p.client.state is State.FIN_WAIT_2 and p.server.state is State.CLOSE_WAIT
    assert p.server.recv() == b"request"
    p.server.send(b"response")  # half-close: the other direction still flows
    p.server.close()
    p.pump()
    assert p.client.recv() == b"response"
    assert p.client.state is State.TIME_WAIT and p.server.state is State.CLOSED
    assert Closed("closed") in drain(p.server)


def test_lost_last_ack_is_recovered_by_time_wait():
    p = Pair()
    p.pump()
    p.client.close()
    p.pump()
    p.server.close()
    # the client's final ACK is lost: the server retransmits its FIN, TIME-WAIT answers it
    p.pump(drop=lambda s: s.dst_port == p.server.local_port)
    assert p.client.state is State.TIME_WAIT and p.server.state is State.LAST_ACK
    p.advance(5.0)
    assert p.server.state is State.CLOSED


# -- abort --------------------------------------------------------------------------------------

def test_abort_sends_rst_and_closes():
    c = established()
    c.abort()
    [rst] = c.segments_to_send(T0)
    assert rst.flags == Flags.RST and rst.seq == c.sender.snd_nxt
    assert c.state is State.CLOSED and drain(c) == [Closed("aborted")]
    c.abort()  # idempotent


def test_abort_in_time_wait_sends_nothing():
    c = time_wait()
    c.abort()
    assert c.segments_to_send(T0) == [] and c.state is State.CLOSED


def test_segment_for_closed_connection_gets_rst():
    c = established()
    c.abort()
    c.segments_to_send(T0)
    c.receive(seg(c, "PA", b"x", ack=c.sender.snd_nxt), T0)
    [rst] = c.segments_to_send(T0)
    assert rst.flags == Flags.RST


# -- keepalive, RFC 9293 §3.8.4 --------------------------------------------------------------------

def test_keepalive_probes_after_idle_and_gives_up():
    c = established(config(keepalive=100.0, keepalive_interval=10.0, keepalive_probes=3))
    c.segments_to_send(T0)
    assert c.get_timer() == T0 + 100
    times = []
    while c.state is State.ESTABLISHED:
        now = fire(c)
        out = c.segments_to_send(now)
        if c.state is State.ESTABLISHED:
            [probe] = out
            assert probe.seq == seq_add(c.sender.snd_nxt, -1) and not probe.payload  # SEG.SEQ = SND.NXT - 1
            times.append(now - T0)
    assert times == [100, 110, 120] and drain(c) == [Closed("timeout")]


def test_keepalive_answer_resets_the_probes():
    c = established(config(keepalive=100.0, keepalive_interval=10.0, keepalive_probes=3))
    c.segments_to_send(T0)
    now = fire(c)
    c.segments_to_send(now)
    c.receive(seg(c, "A"), now + 1)  # the peer answers
    c.segments_to_send(now + 1)
    assert c.get_timer() == now + 1 + 100 and c.timers.armed() == {Timer.KEEPALIVE}


def test_keepalive_off_by_default():
    c = established()
    c.segments_to_send(T0)
    assert c.get_timer() is None
