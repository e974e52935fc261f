"""Loss recovery: retransmission timer (RFC 6298), Karn's rule, NewReno fast retransmit and
recovery (RFC 5681 §3.2, RFC 6582), SACK-driven hole retransmission (RFC 2018, RFC 6675)."""

from pipeline.wire.seqnum import seq_add
from pipeline.wire.tcp import Flags, TcpOptions
from tests.unit.tcp.builders import T0, config, drain, established, fire, seg
from workers.tcp.connection import State
from workers.tcp.events import Closed

MSS = 1460
SACK = TcpOptions(mss=1460, sack_permitted=True)


def flight(c, n):
    """Send n full segments and return them."""
    c.send(bytes(range(256)) * (n * MSS // 256) + b"\xee" * (n * MSS % 256))
    out = c.segments_to_send(T0)
    assert [len(s.payload) for s in out] == [MSS] * n
    return out


def end(s):
    return seq_add(s.seq, len(s.payload))


# -- retransmission timer -----------------------------------------------------------------

def test_rto_retransmits_first_segment_with_backoff_then_gives_up():
    c = established(config(max_retries=3))
    [s] = flight(c, 1)
    gaps, now = [], T0
    while c.state is State.ESTABLISHED:
        t = fire(c)
        gaps.append(t - now)
        now = t
        out = c.segments_to_send(now)
        if c.state is State.ESTABLISHED:
            assert [(r.seq, r.payload) for r in out] == [(s.seq, s.payload)]
    assert gaps == [1.0, 2.0, 4.0, 8.0]  # RFC 6298 §5.5 doubling
    assert drain(c) == [Closed("timeout")] and c.retransmissions == 3


def test_rto_collapses_cwnd_and_goes_back_n():
    c = established()
    segs = flight(c, 4)
    now = fire(c)
    [r] = c.segments_to_send(now)
    assert r.seq == segs[0].seq and c.sender.cc.cwnd == MSS  # RFC 5681 §3.1 loss window
    c.receive(seg(c, "A", ack=end(segs[0])), now + 0.1)
    out = c.segments_to_send(now + 0.1)
    assert [s.seq for s in out] == [segs[1].seq, segs[2].seq]  # slow start again: 2 segments


def test_karn_no_sample_from_retransmitted_data():
    c = established()
    flight(c, 2)
    now = fire(c)
    c.segments_to_send(now)
    c.receive(seg(c, "A", ack=seq_add(c.sender.snd_una, MSS // 2)), now + 0.05)  # part of the retransmission
    assert c.sender.rtt.srtt is None and c.sender.rtt.rto == 2.0  # RFC 6298 §3 and §5.7: keep the backed-off RTO


def test_backoff_collapses_when_the_timeout_retransmission_is_acknowledged():
    # Our deviation from RFC 6298 §5.7's note: go-back-N without timestamps yields no
    # RTT sample (Karn), and every further random loss would double the RTO again.
    c = established()
    segs = flight(c, 3)
    now = fire(c)
    fire(c)  # lost again: RTO 4 s
    c.segments_to_send(now)
    assert c.sender.rtt.rto == 4.0
    c.receive(seg(c, "A", ack=end(segs[0])), now + 3.1)
    assert c.sender.rtt.srtt is None and c.sender.rtt.rto == 1.0 and c.sender.snd_una == end(segs[0])


def test_rtt_sample_from_fresh_data():
    c = established()
    flight(c, 1)
    c.receive(seg(c, "A"), T0 + 0.2)
    assert abs(c.sender.rtt.srtt - 0.2) < 1e-9 and abs(c.sender.rtt.rto - 0.6) < 1e-9


def test_new_ack_restarts_timer_and_full_ack_stops_it():
    c = established()
    segs = flight(c, 2)
    c.receive(seg(c, "A", ack=end(segs[0])), T0 + 0.5)
    assert c.get_timer() == T0 + 0.5 + c.sender.rtt.rto  # RFC 6298 §5.3
    c.receive(seg(c, "A"), T0 + 0.6)
    assert c.get_timer() is None  # §5.2


# -- NewReno -------------------------------------------------------------------------------

def dup(c, segs, k=0, **kw):
    c.receive(seg(c, "A", ack=segs[k].seq, **kw), T0 + 0.1)
    return c.segments_to_send(T0 + 0.1)


def test_three_dup_acks_fast_retransmit_and_newreno_recovery():
    c = established(config(nagle=False))
    segs = flight(c, 10)
    assert dup(c, segs) == [] and dup(c, segs) == []
    [r] = dup(c, segs)  # third duplicate: fast retransmit (RFC 5681 §3.2 step 2)
    assert r.seq == segs[0].seq and r.payload == segs[0].payload
    assert c.sender.recovery.in_fast_recovery and c.fast_retransmits == 1
    assert c.sender.cc.ssthresh == 5 * MSS and c.sender.cc.cwnd == 8 * MSS  # ssthresh = flight/2; + 3*SMSS
    for _ in range(3):
        assert dup(c, segs) == []  # inflation: 11 MSS > 10 in flight, but no new data queued
    assert c.sender.cc.cwnd == 11 * MSS
    c.send(b"n" * MSS)
    [new] = c.segments_to_send(T0 + 0.1)
    assert new.seq == end(segs[9])  # cwnd inflated past the flight: new data goes out
    # partial ACK (segs 0-3 arrived, 4 lost too): retransmit 4 at once (RFC 6582 §3.2 step 5)
    c.receive(seg(c, "A", ack=segs[4].seq), T0 + 0.2)
    [r2] = c.segments_to_send(T0 + 0.2)
    assert r2.seq == segs[4].seq and c.sender.recovery.in_fast_recovery
    assert c.sender.cc.cwnd == 11 * MSS - 4 * MSS + MSS
    # full ACK: leave recovery with cwnd = ssthresh (step 3)
    c.receive(seg(c, "A", ack=end(new)), T0 + 0.3)
    assert not c.sender.recovery.in_fast_recovery and c.sender.cc.cwnd == c.sender.cc.ssthresh == 5 * MSS


def test_dup_acks_with_window_change_are_not_duplicates():
    c = established()
    segs = flight(c, 5)
    for w in (60000, 60001, 60002):
        dup(c, segs, window=w)
    assert c.fast_retransmits == 0 and c.dup_acks == 0


def test_no_second_fast_retransmit_below_recover():
    c = established()
    segs = flight(c, 10)
    for _ in range(3):
        dup(c, segs)
    c.receive(seg(c, "A"), T0 + 0.2)  # full ACK
    c.send(b"x" * 3 * MSS)
    c.segments_to_send(T0 + 0.2)
    for _ in range(3):
        c.receive(seg(c, "A", ack=c.sender.snd_una), T0 + 0.3)
    # ACK == recover does not "cover more than recover" (RFC 6582 §3.2 step 2)
    assert c.fast_retransmits == 1


# -- SACK ----------------------------------------------------------------------------------

def sacked(c, segs, k, blocks):
    opts = TcpOptions(sack_blocks=tuple((segs[a].seq, end(segs[b])) for a, b in blocks))
    return dup(c, segs, k, options=opts)


def test_sack_recovery_retransmits_only_holes():
    c = established(config(sack=True), options=SACK)
    segs = flight(c, 10)  # segments 2 and 5 are lost
    c.receive(seg(c, "A", ack=segs[2].seq), T0 + 0.1)  # 0 and 1 arrived
    assert sacked(c, segs, 2, [(3, 3)]) == []
    assert sacked(c, segs, 2, [(3, 4)]) == []
    # DupThresh SMSS SACKed: RACK's reordering window is zero (RFC 8985 §6.2 step 4) and
    # 2, sent before the delivered 6, is lost: fast retransmit, cwnd = ssthresh
    [r] = sacked(c, segs, 2, [(6, 6), (3, 4)])
    assert r.seq == segs[2].seq and c.sender.recovery.in_fast_recovery
    assert c.sender.cc.ssthresh == c.sender.cc.cwnd == 4 * MSS  # FlightSize 8 segments / 2, no inflation (pipe instead)
    # 7 delivered: 5 was sent before it, and in recovery reo_wnd is zero -- lost at once
    # (RFC 6675 IsLost() waited for DupThresh SMSS above it); PRR-SSRB allows one segment.
    assert [s.seq for s in sacked(c, segs, 2, [(6, 7), (3, 4)])] == [segs[5].seq]
    out = sacked(c, segs, 2, [(6, 8), (3, 4)])
    # Nothing new to send, so the highest outstanding segment goes out once as the
    # rescue retransmission (NextSeg rule 4).
    assert [s.seq for s in out] == [segs[9].seq]
    assert sacked(c, segs, 2, [(6, 9), (3, 4)]) == []  # no SACKed data is ever resent
    # the retransmitted 2 arrives: partial ACK up to the next hole, already resent
    c.receive(seg(c, "A", ack=segs[5].seq, options=TcpOptions(sack_blocks=((segs[6].seq, end(segs[9])),))),
              T0 + 0.2)
    assert c.segments_to_send(T0 + 0.2) == []
    c.receive(seg(c, "A"), T0 + 0.3)
    assert not c.sender.recovery.in_fast_recovery and c.retransmissions == 3 and c.sender.cc.cwnd == c.sender.cc.ssthresh


def test_rto_go_back_skips_sacked_data():
    c = established(config(sack=True), options=SACK)
    segs = flight(c, 6)
    sacked(c, segs, 0, [(2, 3)])
    now = fire(c)
    [r] = c.segments_to_send(now)
    assert r.seq == segs[0].seq
    c.receive(seg(c, "A", ack=end(segs[0]), options=TcpOptions(sack_blocks=((segs[2].seq, end(segs[3])),))),
              now + 0.1)
    out = c.segments_to_send(now + 0.1)
    assert [s.seq for s in out] == [segs[1].seq, segs[4].seq]  # 2 and 3 were SACKed: skipped
    c.receive(seg(c, "A", ack=end(segs[4])), now + 0.2)
    out = c.segments_to_send(now + 0.2)
    assert [s.seq for s in out] == [segs[5].seq]
    assert all(s.flags & Flags.ACK for s in out)


# -- large segments ------------------------------------------------------------------------

def test_retransmissions_are_one_smss_even_with_large_segments():
    c = established(config(max_send_segment=65536, sack=True), options=SACK)
    c.send(b"x" * 14600)
    [big] = c.segments_to_send(T0)
    assert len(big.payload) == 14600
    now = fire(c)
    [r] = c.segments_to_send(now)
    assert r.seq == big.seq and len(r.payload) == MSS  # RFC 5681 §3.1: cwnd is one SMSS after an RTO


def test_tiny_peer_mss_is_clamped():
    c = established(options=TcpOptions(mss=1))
    assert c.options.peer_mss == 64
    c.send(b"x" * 100)
    assert len(c.segments_to_send(T0)[0].payload) == 64


def test_stale_timestamp_echo_after_spurious_retransmission_is_no_rtt_sample():
    # The ACK was lost; our retransmission is a duplicate, and the receiver echoes the
    # original's TSval (RFC 7323 §4.3). That "RTT" would include the RTO: skip it.
    c = established(config(timestamps=True), options=TcpOptions(mss=1460, timestamp=(10, 0)))
    c.send(b"x" * 100)
    [s] = c.segments_to_send(T0)
    now = fire(c)
    c.segments_to_send(now)
    c.receive(seg(c, "A", options=TcpOptions(timestamp=(11, s.options.timestamp[0]))), now + 0.01)
    assert c.sender.snd_una == c.sender.snd_nxt and c.sender.rtt.srtt is None


def test_sack_marks_loss_without_pure_duplicate_acks():
    # The peer's ACKs ride on its own data, so none is a duplicate ACK (RFC 5681 §2);
    # its SACK blocks still show segment 0 lost (RFC 6675 §5 IsLost).
    c = established(config(sack=True), options=SACK)
    segs = flight(c, 6)
    for k in (1, 2, 3):
        blocks = TcpOptions(sack_blocks=((segs[1].seq, end(segs[k])),))
        c.receive(seg(c, "PA", b"reply", ack=segs[0].seq, options=blocks), T0 + 0.1)
        out = [s for s in c.segments_to_send(T0 + 0.1) if s.payload]
    assert c.dup_acks == 0 and c.fast_retransmits == 1 and c.sender.recovery.in_fast_recovery
    assert [s.seq for s in out] == [segs[0].seq]
