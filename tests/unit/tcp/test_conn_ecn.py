"""ECN (RFC 3168 §6.1): negotiation, echoing CE, reacting to ECE once per window, CWR,
and which segments go out ECT(0) (``conn.ect(seg)``)."""

from pipeline.wire.seqnum import seq_add, seq_sub
from pipeline.wire.tcp import Flags, TcpOptions, TcpSegment
from tests.unit.tcp.builders import (
    LOCAL_ISS, LOCAL_PORT, PLAIN, REMOTE_ISS, REMOTE_PORT, T0, Pair, config, drain, elicit_ack, fire, seg, syn,
)
from workers.tcp.connection import Connection

ECN = Flags.ECE | Flags.CWR
MSS = 1460


def ecn_syn(options=PLAIN):
    s = syn(options)
    return TcpSegment(s.src_port, s.dst_port, s.seq, s.ack, Flags.SYN | ECN, s.window, options=s.options)


def accepted(cfg=None, first=None):
    c = Connection.accept(LOCAL_PORT, REMOTE_PORT, first or ecn_syn(), LOCAL_ISS, cfg or config(ecn=True), T0)
    [synack] = c.segments_to_send(T0)
    c.receive(seg(c, "A"), T0)
    c.segments_to_send(T0)
    drain(c)
    return c, synack


def test_ecn_setup_syn_gets_an_ecn_setup_syn_ack():
    c, synack = accepted()
    assert synack.flags == Flags.SYN | Flags.ACK | Flags.ECE and c.options.ecn  # §6.1.1: ECE, not CWR
    assert not c.ect(synack)  # §6.1.1: never a SYN


def test_no_ecn_without_the_peer_asking_or_when_off():
    c, synack = accepted(first=syn(PLAIN))
    assert synack.flags == Flags.SYN | Flags.ACK and not c.options.ecn
    c, synack = accepted(cfg=config(ecn=False))
    assert synack.flags == Flags.SYN | Flags.ACK and not c.options.ecn
    c, synack = accepted(first=TcpSegment(REMOTE_PORT, LOCAL_PORT, REMOTE_ISS, LOCAL_ISS, Flags.SYN | Flags.ECE,
                                          65535, options=PLAIN))
    assert not c.options.ecn  # ECE alone is no ECN-setup SYN


def test_active_open_negotiates_both_ways():
    p = Pair(config(ecn=True), config(ecn=True))
    p.pump()
    assert p.log[0][1].flags == Flags.SYN | ECN
    assert p.client.options.ecn and p.server.options.ecn
    p = Pair(config(ecn=True), config(ecn=False))
    p.pump()
    assert not p.client.options.ecn and not p.server.options.ecn


def test_only_new_data_is_ect():
    c, _ = accepted(config(ecn=True, nagle=False))
    c.send(b"a" * 3 * MSS)
    out = c.segments_to_send(T0)
    assert len(out) == 3 and all(c.ect(s) for s in out)  # §6.1.2: data segments are ECT
    elicit_ack(c)
    [ack] = c.segments_to_send(T0)
    assert not ack.payload and not c.ect(ack)  # §6.1.4: pure ACKs are not ECT
    now = fire(c)  # the retransmission timer
    [rtx] = c.segments_to_send(now)
    assert rtx.seq == out[0].seq and not c.ect(rtx)  # §6.1.5: retransmissions are not ECT


def test_ce_is_echoed_until_cwr():
    c, _ = accepted()
    c.receive(seg(c, "A", b"x" * 100), T0, ce=True)
    c.receive(seg(c, "A", b"y" * 100), T0)
    elicit_ack(c)
    [ack] = c.segments_to_send(T0)
    assert ack.flags & Flags.ECE and c.ce_received == 1
    c.receive(seg(c, "A", b"z" * 100), T0)
    elicit_ack(c)
    assert c.segments_to_send(T0 + 1)[0].flags & Flags.ECE  # every ACK until CWR (§6.1.3)
    c.receive(TcpSegment(REMOTE_PORT, LOCAL_PORT, c.receiver.rcv_nxt, c.sender.snd_nxt, Flags.ACK | Flags.CWR, 65535, b"w" * 100),
              T0 + 1)
    elicit_ack(c, T0 + 1)
    [ack] = c.segments_to_send(T0 + 1)
    assert not ack.flags & Flags.ECE


def test_ece_reduces_cwnd_once_per_window_and_sets_cwr():
    c, _ = accepted(config(ecn=True, nagle=False))
    c.send(b"d" * 10 * MSS)
    out = c.segments_to_send(T0)
    cwnd = c.sender.cc.cwnd
    ece = Flags.ACK | Flags.ECE
    c.receive(TcpSegment(REMOTE_PORT, LOCAL_PORT, c.receiver.rcv_nxt, seq_add(out[0].seq, MSS), ece, 65535), T0 + 0.01)
    flight = seq_sub(c.sender.snd_nxt, c.sender.snd_una)  # RFC 5681 eq. 4 FlightSize, once the ACK is taken
    assert c.sender.cc.ssthresh == max(flight // 2, 2 * MSS) and c.sender.cc.cwnd == c.sender.cc.ssthresh < cwnd
    assert c.ece_received == 1 and c.retransmissions == 0 and not c.sender.recovery.in_fast_recovery
    reduced = c.sender.cc.cwnd
    c.receive(TcpSegment(REMOTE_PORT, LOCAL_PORT, c.receiver.rcv_nxt, seq_add(out[0].seq, 2 * MSS), ece, 65535), T0 + 0.01)
    assert c.sender.cc.cwnd >= reduced  # the same window: no second reduction
    c.receive(seg(c, "A", ack=c.sender.snd_nxt), T0 + 0.02)  # the rest of the window, without ECE
    c.send(b"n" * MSS)
    new = [s for s in c.segments_to_send(T0 + 0.01) if s.payload]
    assert new and new[0].flags & Flags.CWR and c.ect(new[0])
    assert all(not s.flags & Flags.CWR for s in new[1:])


def test_new_data_queued_by_a_timer_is_ect_in_the_next_batch():
    c, _ = accepted(config(ecn=True, nagle=False, sack=True, timestamps=True),
                    ecn_syn(TcpOptions(mss=MSS, sack_permitted=True, timestamp=(1, 0))))
    assert c.options.sack and c.options.timestamps and c.options.ecn
    c.send(b"k" * 100)
    [s] = c.segments_to_send(T0)
    c.receive(seg(c, "A", options=TcpOptions(timestamp=(2, s.options.timestamp[0]))), T0 + 0.01)
    c.send(b"a" * 2 * (MSS - 12))
    out = c.segments_to_send(T0 + 0.02)
    assert len(out) == 2
    c.send(b"b" * 100)  # waits: the loss probe will carry it
    t = c.get_timer()
    c.handle_timer(t)  # RFC 8985 §7.3: new data as the probe, queued inside handle_timer
    [probe] = c.segments_to_send(t)
    assert probe.payload == b"b" * 100 and c.ect(probe) and not any(c.ect(s) for s in out)
