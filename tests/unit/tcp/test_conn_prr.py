"""Proportional Rate Reduction (RFC 6937, PRR-SSRB) in SACK fast recovery, with a
hand-driven clock: how much is sent per ACK while the window comes down to ssthresh."""

import math

from pipeline.wire.seqnum import seq_add, seq_sub
from pipeline.wire.tcp import TcpOptions
from tests.unit.tcp.builders import T0, config, established, seg

MSS = 1460
RTT = 0.1


def twenty_in_flight():
    """cwnd grown to 20 segments by ten single-segment ACKs; 20 segments in flight."""
    c = established(config(sack=True, nagle=False), options=TcpOptions(mss=MSS, sack_permitted=True))
    c.send(b"p" * 200 * MSS)
    first = c.segments_to_send(T0)
    flight = []
    for s in first:
        c.receive(seg(c, "A", ack=seq_add(s.seq, MSS)), T0 + RTT)
        flight += c.segments_to_send(T0 + RTT)
    assert c.sender.cc.cwnd == 20 * MSS and len(flight) == 20
    return c, flight


def sack_up_to(c, flight, lo, k, now):
    """The peer holds flight[lo..k] above a hole at flight[0]."""
    c.receive(seg(c, "A", ack=flight[0].seq, options=TcpOptions(
        sack_blocks=((flight[lo].seq, seq_add(flight[k].seq, MSS)),))), now)
    return c.segments_to_send(now)


def test_one_loss_sends_one_segment_per_two_delivered():
    # RFC 6937 §3.1 proportional part (pipe > ssthresh): sndcnt spreads ssthresh over
    # RecoverFS -- here about half -- instead of a burst or a pause.
    c, flight = twenty_in_flight()
    now = T0 + 2 * RTT
    before = [len(sack_up_to(c, flight, 1, k, now + k * 1e-3)) for k in (1, 2)]
    assert before == [1, 1] and not c.sender.recovery.in_fast_recovery  # SACKed data left: new data (RFC 6675 pipe)
    recover_fs = seq_sub(c.sender.snd_nxt, c.sender.snd_una)
    sent, delivered = 0, 0
    for k in range(3, 20):
        out = sack_up_to(c, flight, 1, k, now + k * 1e-3)
        assert c.sender.recovery.in_fast_recovery and len(out) <= 1
        if k == 3:
            assert out[0].seq == flight[0].seq  # RACK: 0 is lost, the fast retransmit
            ssthresh = c.sender.cc.ssthresh
            assert ssthresh == recover_fs // 2
        delivered += MSS
        sent += sum(len(s.payload) for s in out)
        # prr_out follows CEIL(prr_delivered * ssthresh / RecoverFS), in whole segments,
        # until pipe is down to ssthresh; then PRR-SSRB holds it there.
        proportional = MSS * math.ceil(delivered * ssthresh / recover_fs / MSS)
        assert sent == proportional if k < 15 else sent <= proportional
    assert sent == 9 * MSS  # 17 segments delivered, 9 sent: the window came down to ssthresh
    c.receive(seg(c, "A", ack=c.sender.snd_nxt), now + 1)
    assert not c.sender.recovery.in_fast_recovery and c.sender.cc.cwnd == ssthresh


def test_heavy_loss_slow_starts_up_to_ssthresh():
    # PRR-SSRB (pipe < ssthresh): at most one segment more than was delivered per ACK
    # (slow start), and no further than ssthresh.
    c, flight = twenty_in_flight()
    now = T0 + 2 * RTT
    counts = []
    for k in range(16, 20):  # 0..15 are lost
        out = sack_up_to(c, flight, 16, k, now + k * 1e-3)
        counts.append(len(out))
    assert c.sender.recovery.in_fast_recovery
    # Entry (third SACKed segment): the fast retransmit plus 2 (delivered 1 + 1 SMSS);
    # then 2 per ACK that delivers one segment.
    assert counts[:2] == [1, 1] and counts[2] == 3 and counts[3] == 2
    assert c.sender.cc.cwnd <= c.sender.cc.ssthresh


def test_after_recovery_the_window_is_ssthresh():
    c, flight = twenty_in_flight()
    now = T0 + 2 * RTT
    for k in range(1, 20):
        sack_up_to(c, flight, 1, k, now)
    assert c.sender.recovery.in_fast_recovery
    c.receive(seg(c, "A", ack=c.sender.snd_nxt), now + RTT)
    c.segments_to_send(now + RTT)
    assert not c.sender.recovery.in_fast_recovery and c.sender.cc.cwnd == c.sender.cc.ssthresh  # RFC 6937 §3.1: cwnd = ssthresh at the end
