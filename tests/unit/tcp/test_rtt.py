"""RFC 6298 RTO estimation, checked against the RFC's own formulas."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.tcp.rtt import RttEstimator


def test_initial_rto_before_any_sample():
    # RFC 6298 §2.1: RTO = 1 s until a measurement is made.
    est = RttEstimator()
    assert est.srtt is None and est.rttvar is None
    assert est.rto == 1.0


def test_first_sample():
    # RFC 6298 §2.2: SRTT = R, RTTVAR = R/2, RTO = SRTT + max(G, 4*RTTVAR).
    est = RttEstimator(min_rto=0.01)
    est.sample(0.1)
    assert est.srtt == pytest.approx(0.1)
    assert est.rttvar == pytest.approx(0.05)
    assert est.rto == pytest.approx(0.1 + 4 * 0.05)


def test_subsequent_sample_updates_rttvar_with_old_srtt():
    # RFC 6298 §2.3: RTTVAR <- 3/4 RTTVAR + 1/4 |SRTT - R'| (old SRTT), SRTT <- 7/8 SRTT + 1/8 R'.
    est = RttEstimator(min_rto=0.01)
    est.sample(0.1)
    est.sample(0.3)
    rttvar = 0.75 * 0.05 + 0.25 * abs(0.1 - 0.3)
    srtt = 0.875 * 0.1 + 0.125 * 0.3
    assert est.rttvar == pytest.approx(rttvar)
    assert est.srtt == pytest.approx(srtt)
    assert est.rto == pytest.approx(srtt + 4 * rttvar)


def test_granularity_term_when_variance_is_tiny():
    # RFC 6298 §2.2: the max(G, K*RTTVAR) term.
    est = RttEstimator(min_rto=0.001, granularity=0.5)
    for _ in range(200):
        est.sample(0.1)
    assert est.rttvar < 0.01
    assert est.rto == pytest.approx(est.srtt + 0.5)


def test_min_rto_clamp_default_is_linux_like():
    est = RttEstimator()
    est.sample(0.001)
    assert est.rto == 0.2


def test_rfc_min_rto_one_second():
    # RFC 6298 §2.4 when configured as the RFC says.
    est = RttEstimator(min_rto=1.0)
    est.sample(0.05)
    assert est.rto == 1.0


def test_backoff_doubles_and_clamps_at_max():
    # RFC 6298 §5.5 (double) and §2.5 (maximum).
    est = RttEstimator(max_rto=60.0)
    rtos = []
    for _ in range(10):
        est.backoff()
        rtos.append(est.rto)
    assert rtos[:5] == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert rtos[5:] == [60.0] * 5
    assert est.backoffs == 10


def test_sample_collapses_backoff():
    # RFC 6298 note after §5.7: a new measurement recomputes RTO.
    est = RttEstimator(min_rto=0.01)
    est.sample(0.1)
    base = est.rto
    est.backoff()
    est.backoff()
    assert est.rto == pytest.approx(4 * base)
    est.sample(0.1)
    assert est.rto < 2 * base
    assert est.backoffs == 0


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        RttEstimator(min_rto=2.0, max_rto=1.0)
    with pytest.raises(ValueError):
        RttEstimator().sample(-1.0)


@given(st.lists(st.floats(min_value=0.0, max_value=100.0), min_size=1, max_size=50),
       st.integers(min_value=0, max_value=40))
def test_rto_always_within_bounds(samples, backoffs):
    est = RttEstimator()
    for r in samples:
        est.sample(r)
        assert est.min_rto <= est.rto <= est.max_rto
    for _ in range(backoffs):
        est.backoff()
        assert est.min_rto <= est.rto <= est.max_rto
