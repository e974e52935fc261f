"""RACK (RFC 8985 §6) with a hand-driven clock: time-based loss marking from per-segment
send times, the reordering window and its timer, lost retransmissions, and the tail loss
probe (§7) that lets RACK see a lost tail."""

import pytest

from pipeline.wire.seqnum import seq_add
from pipeline.wire.tcp import TcpOptions
from tests.unit.tcp.builders import T0, config, established, seg
from workers.tcp.connection import Timer

MSS = 1460
SACK = TcpOptions(mss=MSS, sack_permitted=True)
RTT = 0.1


def sack_conn(**changes):
    return established(config(sack=True, nagle=False, **changes), options=SACK)


def send(c, n, now, queued=0):
    """Queue n + queued full segments; return what goes out now."""
    c.send(b"r" * (n + queued) * MSS)
    return c.segments_to_send(now)


def end(s):
    return seq_add(s.seq, len(s.payload))


def ack(c, una, blocks, now):
    """The peer's ACK of una with SACK blocks given as (first segment, last segment) pairs."""
    c.receive(seg(c, "A", ack=una, options=TcpOptions(sack_blocks=tuple(blocks))), now)
    return c.segments_to_send(now)


def test_one_sacked_segment_waits_for_the_reordering_window():
    c = sack_conn()
    segs = send(c, 10, T0, queued=5)
    out = ack(c, segs[0].seq, [(segs[1].seq, end(segs[1]))], T0 + RTT)
    # Less than DupThresh SMSS SACKed and no reordering seen yet: reo_wnd = min_RTT/4
    # (§6.2 step 4), so segment 0 is not lost before RACK.rtt + reo_wnd after it was sent.
    assert not c.sender.recovery.in_fast_recovery and c.retransmissions == 0
    assert [s.seq for s in out] == [end(segs[9])]  # the SACKed segment left: one new one (pipe)
    deadline = c.timers.deadline(Timer.REORDER)
    assert deadline == pytest.approx(T0 + RTT + RTT / 4)
    assert c.get_timer() == deadline
    c.handle_timer(deadline)
    out = c.segments_to_send(deadline)
    assert c.sender.recovery.in_fast_recovery and out[0].seq == segs[0].seq and c.timeouts == 0


def test_data_filling_the_hole_in_time_is_no_loss_and_widens_the_window():
    c = sack_conn()
    segs = send(c, 10, T0)
    ack(c, segs[0].seq, [(segs[1].seq, end(segs[1]))], T0 + RTT)
    ack(c, end(segs[1]), [], T0 + RTT + 0.001)  # segment 0 was only late (reordered)
    assert Timer.REORDER not in c.timers and c.retransmissions == 0 and not c.sender.recovery.in_fast_recovery
    # Reordering seen (§6.2 step 3): even with DupThresh SMSS SACKed the window stays open.
    now = T0 + RTT + 0.002
    out = ack(c, end(segs[1]), [(segs[3].seq, end(segs[5]))], now)
    assert c.retransmissions == 0 and not c.sender.recovery.in_fast_recovery and not [s for s in out if s.seq < end(segs[9])]
    assert c.timers.deadline(Timer.REORDER) > now


def test_loss_is_a_matter_of_time_not_of_how_much_is_sacked():
    c = sack_conn()
    [a] = send(c, 1, T0)
    [b] = send(c, 1, T0 + 0.05)
    # Only b is SACKed (one segment, not DupThresh), but a was sent 50 ms before b and
    # b's RTT is 50 ms: a is overdue by more than reo_wnd (12.5 ms) -- lost at once.
    out = ack(c, a.seq, [(b.seq, end(b))], T0 + 0.1)
    assert c.sender.recovery.in_fast_recovery and [s.seq for s in out] == [a.seq]


def test_sent_after_is_by_time_then_by_sequence():
    # §6.2 RACK_sent_after: segments sent at the same time are ordered by sequence.
    c = sack_conn()
    segs = send(c, 3, T0)
    out = ack(c, segs[0].seq, [(segs[1].seq, end(segs[1]))], T0 + RTT)
    assert out == [] and not c.sender.recovery.in_fast_recovery
    t = c.get_timer()
    assert t == c.timers.deadline(Timer.REORDER) == pytest.approx(T0 + RTT + RTT / 4)
    c.handle_timer(t)
    out = c.segments_to_send(t)
    # 0 was "sent before" the delivered 1 (same time, lower sequence): lost.  2 was not
    # (higher sequence): nothing says it is lost, it is not resent.
    assert c.sender.recovery.in_fast_recovery and [s.seq for s in out] == [segs[0].seq]


def test_a_lost_retransmission_is_found_by_rack_and_resent():
    c = sack_conn()
    segs = send(c, 10, T0, queued=20)
    out = ack(c, segs[0].seq, [(segs[1].seq, end(segs[9]))], T0 + RTT)
    rtx, *new = out
    assert rtx.seq == segs[0].seq and new and c.sender.recovery.in_fast_recovery
    # New data sent with the retransmission is delivered, the retransmission is not:
    # once RACK.rtt has passed since it was sent (reo_wnd is zero in recovery), it is lost.
    now = T0 + 2 * RTT
    again = ack(c, segs[0].seq, [(segs[1].seq, end(new[-1]))], now)
    assert again[0].seq == segs[0].seq and c.lost_retransmissions == 1 and c.timeouts == 0


def test_a_retransmission_is_not_lost_because_older_data_was_delivered():
    c = sack_conn()
    segs = send(c, 10, T0, queued=20)
    [rtx, *_] = ack(c, segs[0].seq, [(segs[1].seq, end(segs[8]))], T0 + RTT)
    assert rtx.seq == segs[0].seq
    # Segment 9 was sent before the retransmission: its SACK says nothing about it.
    ack(c, segs[0].seq, [(segs[1].seq, end(segs[9]))], T0 + 3 * RTT)
    assert c.lost_retransmissions == 0


def test_tail_loss_probe_lets_rack_find_a_lost_tail():
    # §7: the last segments are lost; nothing later can be SACKed, so a probe (here new
    # data) goes out after the PTO, is SACKed, and RACK marks the tail lost: no RTO.
    c = established(config(sack=True, timestamps=True, nagle=False),
                    options=TcpOptions(mss=MSS, sack_permitted=True, timestamp=(5000, 0)))
    c.send(b"x" * 100)
    [s] = c.segments_to_send(T0)
    c.receive(seg(c, "A", options=TcpOptions(timestamp=(5001, s.options.timestamp[0]))), T0 + 0.01)
    assert c.sender.rtt.srtt == pytest.approx(0.01)
    now = T0 + 1
    mss = MSS - 12
    c.send(b"t" * 3 * mss)
    tail = c.segments_to_send(now)
    assert len(tail) == 3
    c.send(b"u" * mss)  # queued after the output: it will be the probe
    pto = c.timers.deadline(Timer.LOSS_PROBE)
    assert pto == pytest.approx(now + 2 * 0.01 + 0.002)  # §7.2: 2*SRTT (+ timer slack)
    assert c.get_timer() == pto
    c.handle_timer(pto)
    [probe] = c.segments_to_send(pto)
    assert probe.seq == end(tail[-1]) and c.loss_probes == 1  # §7.3: new data first
    t = pto + 0.01
    c.receive(seg(c, "A", ack=tail[0].seq, options=TcpOptions(
        sack_blocks=((probe.seq, end(probe)),), timestamp=(5002, probe.options.timestamp[0]))), t)
    out = c.segments_to_send(t)
    # The probe was sent a PTO after the tail and is delivered: the tail is lost (§6.2).
    assert c.sender.recovery.in_fast_recovery and out[0].seq == tail[0].seq and c.timeouts == 0
