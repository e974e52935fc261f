"""Congestion window arithmetic against RFC 5681 / RFC 6582 / RFC 9438 numbers."""

import pytest

from workers.tcp.congestion import (
    ALPHA_CUBIC,
    BETA_CUBIC,
    CUBIC_C,
    Cubic,
    NewReno,
    initial_window,
    make_congestion_control,
)

MSS = 1000


def ack_round(cc, now, srtt=0.1):
    """Acknowledge one window's worth of data, one MSS per ACK (one RTT)."""
    n = cc.cwnd // MSS
    for _ in range(n):
        cc.on_ack(MSS, now, srtt)


# --- initial window ---------------------------------------------------------------

@pytest.mark.parametrize("mss,iw", [(1460, 14600), (536, 5360), (1000, 10000), (9000, 18000), (8960, 17920)])
def test_initial_window_rfc6928(mss, iw):
    # RFC 6928 §2: min(10*MSS, max(2*MSS, 14600)).
    assert initial_window(mss) == iw
    assert NewReno(mss).cwnd == iw
    assert Cubic(mss).cwnd == iw


def test_initial_window_override_and_ssthresh_high():
    cc = NewReno(MSS, initial_window=2 * MSS)
    assert cc.cwnd == 2 * MSS
    assert cc.ssthresh > 1 << 30  # RFC 5681 §3.1: arbitrarily high


def test_factory():
    assert isinstance(make_congestion_control("newreno", MSS), NewReno)
    assert isinstance(make_congestion_control("cubic", MSS), Cubic)
    with pytest.raises(ValueError):
        make_congestion_control("bbr", MSS)


# --- NewReno ----------------------------------------------------------------------

def test_slow_start_doubles_per_rtt():
    # RFC 5681 §3.1: cwnd += SMSS per ACK of one segment -> doubling per RTT.
    cc = NewReno(MSS, initial_window=2 * MSS)
    for expected in (4, 8, 16, 32):
        ack_round(cc, 0.0)
        assert cc.cwnd == expected * MSS


def test_slow_start_abc_limit_two_smss():
    # RFC 3465 §2.2: a stretch ACK grows cwnd by at most L = 2*SMSS.
    cc = NewReno(MSS, initial_window=2 * MSS)
    cc.on_ack(10 * MSS, 0.0, None)
    assert cc.cwnd == 4 * MSS


def test_slow_start_stops_at_ssthresh():
    cc = NewReno(MSS, initial_window=2 * MSS)
    cc.ssthresh = 3 * MSS + 500
    cc.on_ack(2 * MSS, 0.0, None)
    assert cc.cwnd == 3 * MSS + 500  # capped, the rest goes to byte counting
    assert not cc.in_slow_start


def test_congestion_avoidance_one_smss_per_rtt():
    # RFC 5681 §3.1: in congestion avoidance cwnd grows by about one SMSS per RTT.
    cc = NewReno(MSS, initial_window=10 * MSS)
    cc.ssthresh = 10 * MSS
    for rtt in range(1, 6):
        ack_round(cc, 0.0)
        assert cc.cwnd == (10 + rtt) * MSS


def test_congestion_avoidance_stretch_acks_same_growth():
    cc = NewReno(MSS, initial_window=10 * MSS)
    cc.ssthresh = 10 * MSS
    cc.on_ack(5 * MSS, 0.0, None)
    assert cc.cwnd == 10 * MSS
    cc.on_ack(5 * MSS, 0.0, None)
    assert cc.cwnd == 11 * MSS


def test_newreno_loss_halves_flight_size():
    # RFC 5681 §3.1 eq. 4: ssthresh = max(FlightSize/2, 2*SMSS); RFC 6582 §3.2 cwnd = ssthresh.
    cc = NewReno(MSS, initial_window=20 * MSS)
    cc.on_loss(20 * MSS, 1.0)
    assert cc.ssthresh == 10 * MSS and cc.cwnd == 10 * MSS
    cc.on_loss(3 * MSS, 2.0)
    assert cc.ssthresh == 2 * MSS  # floor of 2*SMSS


def test_newreno_loss_uses_flight_size_not_cwnd():
    cc = NewReno(MSS, initial_window=40 * MSS)
    cc.on_loss(8 * MSS, 1.0)  # application-limited: little in flight
    assert cc.ssthresh == 4 * MSS


def test_newreno_recovery_exit_deflates():
    # RFC 6582 §3.2 step 3: on full acknowledgment cwnd = ssthresh.
    cc = NewReno(MSS, initial_window=20 * MSS)
    cc.on_loss(20 * MSS, 1.0)
    cc.cwnd += 3 * MSS + 5 * MSS  # the connection's inflation
    cc.on_recovery_exit(1.5)
    assert cc.cwnd == cc.ssthresh == 10 * MSS


def test_newreno_rto_loss_window_and_repeat():
    # RFC 5681 §3.1: ssthresh per eq. 4, cwnd = LW = 1 SMSS; a repeated timeout
    # of the same segment keeps ssthresh.
    cc = NewReno(MSS, initial_window=20 * MSS)
    cc.on_rto(20 * MSS, 1.0)
    assert cc.cwnd == MSS and cc.ssthresh == 10 * MSS
    cc.on_rto(MSS, 3.0)
    assert cc.cwnd == MSS and cc.ssthresh == 10 * MSS
    # Then slow start back up to ssthresh, then linear.
    for _ in range(10):
        ack_round(cc, 4.0)
    assert 10 * MSS < cc.cwnd < 20 * MSS
    # New data acked: a later timeout lowers ssthresh again.
    cc.on_rto(4 * MSS, 5.0)
    assert cc.ssthresh == 2 * MSS


def test_zero_ack_is_ignored():
    cc = NewReno(MSS)
    before = cc.cwnd
    cc.on_ack(0, 0.0, None)
    assert cc.cwnd == before


# --- CUBIC ------------------------------------------------------------------------

def test_cubic_constants():
    # RFC 9438 §4.1.1 and §4.3 eq. 3.
    assert CUBIC_C == 0.4 and BETA_CUBIC == 0.7
    assert ALPHA_CUBIC == pytest.approx(3 * 0.3 / 1.7)


def test_cubic_slow_start_doubles():
    cc = Cubic(MSS, initial_window=2 * MSS)
    for expected in (4, 8, 16):
        ack_round(cc, 0.0)
        assert cc.cwnd == expected * MSS


def test_cubic_loss_beta_and_wmax():
    # RFC 9438 §4.6: ssthresh = flight_size * 0.7, cwnd = ssthresh; W_max = cwnd before reduction.
    cc = Cubic(MSS, initial_window=100 * MSS)
    cc.on_loss(100 * MSS, 10.0)
    assert cc.ssthresh == 70 * MSS and cc.cwnd == 70 * MSS
    assert cc.w_max == pytest.approx(100.0)
    assert cc.cwnd_prior == pytest.approx(100.0)


def test_cubic_loss_floor_two_segments():
    cc = Cubic(MSS, initial_window=2 * MSS)
    cc.on_loss(2 * MSS, 1.0)
    assert cc.ssthresh == 2 * MSS and cc.cwnd == 2 * MSS


def test_cubic_k_after_loss():
    # RFC 9438 §4.2 eq. 2: K = cbrt((W_max - cwnd_epoch)/C).
    cc = Cubic(MSS, initial_window=100 * MSS)
    cc.on_loss(100 * MSS, 10.0)
    cc.on_recovery_exit(10.5)
    cc.on_ack(MSS, 11.0, 0.1)
    assert cc.t_epoch == 11.0
    assert cc.cwnd_epoch == pytest.approx(70.0)
    assert cc.k == pytest.approx(((100 - 70) / 0.4) ** (1 / 3))  # ~4.217 s


def test_cubic_fast_convergence():
    # RFC 9438 §4.7: loss before reaching W_max -> W_max = cwnd * (1 + beta)/2.
    cc = Cubic(MSS, initial_window=100 * MSS)
    cc.on_loss(100 * MSS, 10.0)
    assert cc.cwnd == 70 * MSS
    cc.on_loss(70 * MSS, 11.0)
    assert cc.w_max == pytest.approx(70 * 1.7 / 2)  # 59.5 segments
    assert cc.ssthresh == 49 * MSS


def test_cubic_no_fast_convergence():
    cc = Cubic(MSS, initial_window=100 * MSS, fast_convergence=False)
    cc.on_loss(100 * MSS, 10.0)
    cc.on_loss(70 * MSS, 11.0)
    assert cc.w_max == pytest.approx(70.0)


def _cubic_after_loss(w_max_segments=200, srtt=0.1):
    cc = Cubic(MSS, initial_window=w_max_segments * MSS)
    cc.on_loss(w_max_segments * MSS, 0.0)
    cc.on_recovery_exit(0.0)
    return cc


def test_cubic_concave_then_plateau_then_convex():
    # RFC 9438 §4.4/§4.5: fast growth far below W_max, flattening near W_max at
    # t = K, then accelerating beyond it.
    srtt = 0.1
    cc = _cubic_after_loss(200, srtt)
    now = 0.0
    trace = []  # (time, cwnd in segments) once per RTT
    for _ in range(200):
        now += srtt
        ack_round(cc, now, srtt)
        trace.append((now, cc.cwnd / MSS))
    k = cc.k
    assert k == pytest.approx(((200 - 140) / 0.4) ** (1 / 3))  # ~5.31 s

    def growth_between(t0, t1):
        c0 = min(c for t, c in trace if t >= t0)
        c1 = min(c for t, c in trace if t >= t1)
        return c1 - c0

    early = growth_between(0.5, 1.5)          # concave, far from W_max
    plateau = growth_between(k - 0.5, k + 0.5)  # near W_max
    late = growth_between(k + 5, k + 6)       # convex
    assert early > plateau
    assert late > plateau
    # At t ~ K cwnd is close to W_max = 200 segments.
    near_k = [c for t, c in trace if abs(t - k) < srtt]
    assert near_k and abs(near_k[0] - 200) < 10


def test_cubic_tracks_w_cubic_curve():
    # cwnd follows W_cubic(t) (within one RTT of lookahead) when the curve is above W_est.
    srtt = 0.05
    cc = _cubic_after_loss(500, srtt)
    now = 0.0
    for _ in range(60):  # 3 s
        now += srtt
        ack_round(cc, now, srtt)
    w = cc.w_cubic(now - cc.t_epoch)
    assert cc.cwnd / MSS == pytest.approx(w, rel=0.05)


def test_cubic_reno_friendly_region():
    # RFC 9438 §4.3: small windows and long RTTs -> W_est (alpha_cubic growth
    # per RTT) beats the cubic curve and cwnd follows W_est.
    srtt = 1.0
    cc = _cubic_after_loss(10, srtt)  # W_max 10, cwnd 7
    cc.on_ack(MSS, 0.001, srtt)  # starts the epoch
    est_before = cc.w_est
    now = 0.001
    ack_round(cc, now, srtt)
    assert cc.w_est > est_before
    assert cc.w_cubic(now - cc.t_epoch) < cc.w_est
    assert cc.cwnd == int(cc.w_est * MSS)


def test_cubic_w_est_alpha_becomes_one_after_cwnd_prior():
    # RFC 9438 §4.3: alpha_cubic = 1 once W_est >= cwnd_prior.
    cc = _cubic_after_loss(10, 1.0)
    cc.on_ack(MSS, 0.0, 1.0)
    cc.w_est = cc.cwnd_prior
    before = cc.w_est
    cwnd_seg = cc.cwnd / MSS
    cc.on_ack(MSS, 0.0, 1.0)
    assert cc.w_est - before == pytest.approx(1.0 / cwnd_seg)


def test_cubic_growth_clamped_to_one_and_a_half_cwnd_per_rtt():
    # RFC 9438 §4.2: target <= 1.5 * cwnd.
    cc = _cubic_after_loss(100, 0.1)
    cc.on_ack(MSS, 0.0, 0.1)
    start = cc.cwnd
    now = 1000.0  # far in the convex region: W_cubic is enormous
    ack_round(cc, now, 0.1)
    assert cc.cwnd <= int(start * 1.5) + MSS


def test_cubic_timeout():
    # RFC 9438 §4.8: ssthresh by beta_cubic, cwnd = 1 SMSS; first CA stage after
    # the timeout uses K = 0 and W_max = cwnd at its start.
    cc = Cubic(MSS, initial_window=100 * MSS)
    cc.on_rto(100 * MSS, 5.0)
    assert cc.cwnd == MSS and cc.ssthresh == 70 * MSS
    cc.on_rto(MSS, 6.0)  # repeated timeout of the same segment
    assert cc.ssthresh == 70 * MSS
    now = 6.0
    while cc.in_slow_start:
        now += 0.1
        ack_round(cc, now)
    cc.on_ack(MSS, now + 0.1, 0.1)
    assert cc.k == 0.0
    assert cc.w_max == pytest.approx(cc.cwnd_epoch)
    assert cc.cwnd_epoch == pytest.approx(70.0, abs=0.01)


def test_cubic_cwnd_monotonic_in_avoidance():
    cc = _cubic_after_loss(80, 0.02)
    now, last = 0.0, cc.cwnd
    for _ in range(500):
        now += 0.02
        ack_round(cc, now, 0.02)
        assert cc.cwnd >= last
        last = cc.cwnd
    assert isinstance(cc.cwnd, int)


def test_cubic_srtt_none_is_tolerated():
    cc = _cubic_after_loss(50)
    cc.on_ack(MSS, 1.0, None)
    assert cc.cwnd >= 35 * MSS

