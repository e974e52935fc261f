"""SACK loss recovery (RFC 6675), limited transmit (RFC 3042), tail loss probes and
probe-based loss marking (RFC 8985), lost-retransmission detection, RTT sampling under
loss (RFC 6298, RFC 7323), and one duplicate ACK per out-of-order segment (RFC 5681 §4.2)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.wire.seqnum import seq_add, seq_sub
from pipeline.wire.tcp import TcpOptions
from tests.unit.tcp.builders import T0, config, established, seg
from workers.tcp.connection import Timer
from workers.tcp.scoreboard import SackScoreboard

MSS = 1460
SACK = TcpOptions(mss=MSS, sack_permitted=True)
SACK_TS = TcpOptions(mss=MSS, sack_permitted=True, timestamp=(5000, 0))
MSS_TS = MSS - 12


def send(c, nbytes, now=T0):
    c.send(b"\x5a" * nbytes)
    return c.segments_to_send(now)


def sack_ack(c, ack, blocks, now, **kw):
    """An ACK from the peer for ack with SACK blocks [(left, right), ...]."""
    opts = TcpOptions(sack_blocks=tuple(blocks), timestamp=kw.pop("ts", None))
    c.receive(seg(c, "A", ack=ack, options=opts, **kw), now)
    return c.segments_to_send(now)


def end(s):
    return seq_add(s.seq, len(s.payload))


# -- the scoreboard's byte counts ------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4900), st.integers(1, 400)), max_size=8),
       st.sampled_from([1000, 2**32 - 250]))
def test_sacked_below_and_above_add_up(blocks, base):
    sb = SackScoreboard()
    sb.update([(seq_add(base, a), seq_add(base, min(a + n, 5000))) for a, n in blocks], base, seq_add(base, 5000))
    for off in range(0, 5000, 37):
        s = seq_add(base, off)
        assert sb.sacked_below(s) + sb.sacked_above(seq_add(s, -1)) == sb.sacked_bytes


# -- sending while SACKs arrive ----------------------------------------------------------------

def test_sacked_data_lets_new_data_out():
    # RFC 6675 §4 pipe: SACKed data left the network (RFC 3042 generalized).
    c = established(config(sack=True), options=SACK)
    segs = send(c, 14 * MSS)
    assert len(segs) == 10  # initial window
    out = sack_ack(c, segs[0].seq, [(segs[1].seq, end(segs[1]))], T0 + 0.001)
    assert [s.seq for s in out] == [end(segs[9])] and not c.sender.recovery.in_fast_recovery


def test_limited_transmit_without_sack():
    c = established(config())
    segs = send(c, 12 * MSS)
    assert len(segs) == 10
    for k in (1, 2, 3):
        c.receive(seg(c, "A", ack=segs[0].seq), T0 + 0.001 * k)
        out = c.segments_to_send(T0 + 0.001 * k)
        if k < 3:
            assert [s.seq for s in out] == [seq_add(end(segs[9]), (k - 1) * MSS)]  # RFC 3042 §2
    assert c.sender.recovery.in_fast_recovery and out[0].seq == segs[0].seq  # the third: fast retransmit


# -- RFC 6675 recovery -------------------------------------------------------------------------

def test_recovery_retransmits_every_lost_hole_the_window_allows():
    c = established(config(sack=True), options=SACK, peer_window=65535)
    segs = send(c, 10 * MSS)
    blocks = [(segs[7].seq, end(segs[9])), (segs[4].seq, end(segs[5])), (segs[1].seq, end(segs[2]))]
    out = sack_ack(c, segs[0].seq, blocks, T0 + 0.001)
    # 0, 3 and 6 are lost (3 SACKed ranges or > 2 SMSS above each); cwnd = ssthresh = 5
    # segments, pipe = 0 in flight + retransmissions: all three go out on this one ACK.
    assert c.sender.recovery.in_fast_recovery and c.sender.cc.cwnd == 5 * MSS
    assert [s.seq for s in out] == [segs[0].seq, segs[3].seq, segs[6].seq]
    assert c.retransmissions == 3


def test_lost_retransmission_is_detected_and_resent():
    c = established(config(sack=True), options=SACK)
    segs = send(c, 30 * MSS)
    assert len(segs) == 10
    now = T0 + 0.001
    out = sack_ack(c, segs[0].seq, [(segs[1].seq, end(segs[9]))], now)
    rtx, *new = out
    assert rtx.seq == segs[0].seq and new  # ssthresh 5 segments, pipe 1: new data after it
    # The new data is SACKed, the retransmission is not: it was lost as well.
    out = sack_ack(c, segs[0].seq, [(segs[1].seq, end(new[-1]))], now + 0.001)
    assert out[0].seq == segs[0].seq and c.lost_retransmissions == 1
    assert c.timeouts == 0


# -- tail loss probes --------------------------------------------------------------------------

def with_srtt(**changes):
    """ESTABLISHED with SACK, timestamps and an RTT sample of 1 ms; nothing outstanding."""
    c = established(config(sack=True, timestamps=True, **changes), options=SACK_TS)
    [s] = send(c, 100)
    c.receive(seg(c, "A", options=TcpOptions(timestamp=(5001, s.options.timestamp[0]))), T0 + 0.001)
    assert abs(c.sender.rtt.srtt - 0.001) < 1e-9
    return c


def test_loss_probe_retransmits_the_last_segment_twice_then_the_rto():
    c = with_srtt()
    now = T0 + 0.01
    segs = send(c, 3 * MSS_TS, now)
    t = c.get_timer()
    assert abs(t - (now + 2 * 0.001 + 0.002)) < 1e-9  # RFC 8985 §7.2: PTO = 2*SRTT (+ 2 ms)
    c.handle_timer(t)
    [p] = c.segments_to_send(t)
    assert p.seq == segs[-1].seq and c.loss_probes == 1  # nothing new: the last segment
    t2 = c.get_timer()
    assert abs((t2 - t) - 2 * 0.004) < 1e-9  # the second probe after twice the PTO
    c.handle_timer(t2)
    [p2] = c.segments_to_send(t2)
    assert p2.seq == segs[-1].seq
    assert c.timers.armed() == {Timer.RETRANSMIT}  # then only the RTO is left


def test_loss_probe_sends_new_data_beyond_cwnd():
    c = with_srtt()
    now = T0 + 0.01
    segs = send(c, 15 * MSS_TS, now)
    assert len(segs) == 10  # cwnd-limited: the rest waits
    t = c.get_timer()
    c.handle_timer(t)
    [p] = c.segments_to_send(t)
    assert p.seq == end(segs[-1]) and len(p.payload) == MSS_TS


def test_sacked_probe_marks_the_data_before_it_lost():
    # One 14 KB TSO segment lost whole; the one-SMSS probe behind it is SACKed: too
    # little for IsLost (RFC 6675), but the probe left a PTO later (RACK, RFC 8985 §6.2).
    c = with_srtt(max_send_segment=65000)
    now = T0 + 0.01
    [big] = send(c, 20 * MSS_TS, now)
    assert len(big.payload) > 10 * MSS_TS - 100  # the whole cwnd in one segment
    t = c.get_timer()
    c.handle_timer(t)
    [probe] = c.segments_to_send(t)
    assert probe.seq == end(big)
    out = sack_ack(c, big.seq, [(probe.seq, end(probe))], t + 0.001)
    assert c.sender.recovery.in_fast_recovery and out[0].seq == big.seq and c.timeouts == 0


def test_recovery_probe_resends_a_lost_retransmission_with_nothing_after_it():
    c = with_srtt()
    now = T0 + 0.01
    segs = send(c, 4 * MSS_TS, now)
    out = sack_ack(c, segs[0].seq, [(segs[1].seq, end(segs[3]))], now + 0.001, ts=(5002, 0))
    assert c.sender.recovery.in_fast_recovery and [s.seq for s in out] == [segs[0].seq]
    t = c.get_timer()
    assert t < now + 0.1  # well before the 200 ms RTO
    c.handle_timer(t)
    [again] = c.segments_to_send(t)
    assert again.seq == segs[0].seq and c.timeouts == 0


# -- RTT sampling under loss -------------------------------------------------------------------

def test_timestamp_echo_of_a_fast_retransmission_is_an_rtt_sample():
    # RFC 7323 §4.1: the echo identifies the transmission, retransmitted or not.
    c = with_srtt()
    now = T0 + 0.01
    segs = send(c, 4 * MSS_TS, now)
    [r] = sack_ack(c, segs[0].seq, [(segs[1].seq, end(segs[3]))], now + 0.001, ts=(5002, 0))
    before = c.sender.rtt.srtt
    c.receive(seg(c, "A", options=TcpOptions(timestamp=(5003, r.options.timestamp[0]))), now + 0.005)
    assert c.sender.rtt.srtt != before and not c.sender.recovery.in_fast_recovery


# -- receiver ----------------------------------------------------------------------------------

def test_one_duplicate_ack_per_out_of_order_segment():
    c = established(config(sack=True), options=SACK)
    base = c.receiver.rcv_nxt
    for k in (1, 2, 3):
        c.receive(seg(c, "A", b"x" * 100, seq=seq_add(base, 100 * k)), T0)
    acks = c.segments_to_send(T0)
    assert [a.ack for a in acks] == [base] * 3  # RFC 5681 §4.2: each one at once
    assert [len(a.options.sack_blocks[0]) and seq_sub(a.options.sack_blocks[0][1], base) for a in acks] == [200, 300, 400]


def test_second_timeout_of_one_segment_forgets_sack_in_case_the_receiver_reneged():
    c = established(config(sack=True), options=SACK)
    segs = send(c, 4 * MSS)
    sack_ack(c, segs[0].seq, [(segs[2].seq, end(segs[3]))], T0 + 0.01)
    t = c.get_timer()
    c.handle_timer(t)  # RACK's reorder timer (RFC 8985 §6.2): 0 and 1 are lost, fast retransmit
    assert [s.seq for s in c.segments_to_send(t)] == [segs[0].seq] and c.timeouts == 0
    t = c.get_timer()
    c.handle_timer(t)  # first RTO: the SACKed segments are skipped (RFC 6675 §5.1)
    assert [s.seq for s in c.segments_to_send(t)] == [segs[0].seq]
    t = c.get_timer()
    c.handle_timer(t)  # the same segment again: SACK information is dropped (RFC 2018 §8)
    c.segments_to_send(t)
    c.receive(seg(c, "A", ack=end(segs[0])), t + 0.01)
    c.receive(seg(c, "A", ack=end(segs[1])), t + 0.02)
    out = c.segments_to_send(t + 0.02)
    assert [s.seq for s in out] == [segs[2].seq, segs[3].seq]  # resent, not skipped


def test_echo_of_the_original_syn_ack_after_its_retransmission_is_no_sample():
    # The handshake's ACK echoes the first SYN-ACK's TSval although we retransmitted
    # it: that "RTT" would include the timeout, so RFC 6298 §5.7's 3 s RTO applies.
    from tests.unit.tcp.builders import syn_received
    c = syn_received(config(timestamps=True), options=TcpOptions(mss=MSS, timestamp=(5000, 0)))
    first_tsval = ts_of_syn_ack = int(T0 * 1000) & 0xFFFFFFFF
    t = c.get_timer()
    c.handle_timer(t)  # SYN-ACK retransmitted after 1 s
    [again] = c.segments_to_send(t)
    assert again.options.timestamp[0] > ts_of_syn_ack
    c.receive(seg(c, "A", options=TcpOptions(timestamp=(5001, first_tsval))), t + 0.5)
    assert c.sender.rtt.srtt is None and c.sender.rtt.rto == 3.0
