"""SYN cookies: round trip, MSS rounding, tampering, expiry, option encoding."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.wire.seqnum import seq_add
from workers.tcp.syncookies import (
    MAX_AGE,
    MSS_TABLE,
    PERIOD,
    CookieOptions,
    SynCookies,
    decode_cookie_options,
    decode_ts_options,
    encode_ts_options,
    mss_index,
)

SECRET = b"0123456789abcdef0123456789abcdef"
L = (bytes([192, 0, 2, 1]), 443)
R = (bytes([198, 51, 100, 7]), 51000)
NOW = 1_000_000.0


@pytest.fixture
def sc():
    return SynCookies(SECRET)


def final_ack(cookie, client_isn):
    """What the final ACK carries: seq = seq_add(client_isn, 1), ack = cookie + 1."""
    return seq_add(client_isn, 1), seq_add(cookie, 1)


def test_round_trip_through_final_ack(sc):
    client_isn = 0xDEADBEEF
    cookie = sc.make(L, R, client_isn, 1460, NOW)
    assert type(cookie) is int and 0 <= cookie < 2**32
    seq, ack = final_ack(cookie, client_isn)
    assert sc.check(L, R, seq_add(seq, -1), seq_add(ack, -1), NOW + 1) == 1460


@pytest.mark.parametrize(
    "mss,expected",
    [(1460, 1460), (1500, 1460), (1459, 1440), (1300, 1220), (1220, 1220), (9000, 8960), (600, 536), (100, 536)],
)
def test_mss_rounded_down(sc, mss, expected):
    cookie = sc.make(L, R, 7, mss, NOW)
    assert sc.check(L, R, 7, cookie, NOW) == expected
    assert MSS_TABLE[mss_index(mss)] == expected


def test_valid_for_max_age_ticks_then_expires(sc):
    t0 = 64.0 * 5000  # start of a tick
    cookie = sc.make(L, R, 1, 1460, t0)
    for age in range(MAX_AGE + 1):
        assert sc.check(L, R, 1, cookie, t0 + age * PERIOD + 63.9) == 1460
    assert sc.check(L, R, 1, cookie, t0 + (MAX_AGE + 1) * PERIOD) is None
    assert sc.check(L, R, 1, cookie, t0 + 10_000 * PERIOD) is None


def test_not_valid_after_wire_counter_wraps(sc):
    # The 8-bit counter on the wire repeats every 256 ticks; H2 covers the full counter.
    cookie = sc.make(L, R, 1, 1460, NOW)
    assert sc.check(L, R, 1, cookie, NOW + 256 * PERIOD) is None


def test_from_the_future_rejected(sc):
    cookie = sc.make(L, R, 1, 1460, NOW + 5 * PERIOD)
    assert sc.check(L, R, 1, cookie, NOW) is None


def test_tampering_rejected(sc):
    client_isn = 123456
    cookie = sc.make(L, R, client_isn, 1460, NOW)
    assert sc.check(L, R, client_isn, seq_add(cookie, 1), NOW) is None
    assert sc.check(L, R, client_isn, seq_add(cookie, -1), NOW) is None
    for bit in range(32):
        assert sc.check(L, R, client_isn, cookie ^ (1 << bit), NOW) is None
    assert sc.check(L, R, seq_add(client_isn, 1), cookie, NOW) is None  # other client ISN
    assert sc.check(L, (R[0], R[1] + 1), client_isn, cookie, NOW) is None  # other port
    assert sc.check((bytes([192, 0, 2, 2]), 443), R, client_isn, cookie, NOW) is None  # other address
    assert SynCookies(b"x" * 32).check(L, R, client_isn, cookie, NOW) is None  # other secret


def test_random_cookies_almost_never_pass(sc):
    rng = random.Random(4)
    hits = sum(
        sc.check(L, R, rng.getrandbits(32), rng.getrandbits(32), NOW) is not None
        for _ in range(20000)
    )
    # Expected ~ 20000 * 3 / 2**21 ~ 0.03
    assert hits == 0


def test_cookies_look_unrelated_across_tuples(sc):
    cookies = {int(sc.make(L, (R[0], port), 1, 1460, NOW)) for port in range(1000, 1100)}
    assert len(cookies) == 100


def test_ipv6(sc):
    l6 = (bytes(15) + b"\x01", 80)
    r6 = (bytes(15) + b"\x02", 5555)
    cookie = sc.make(l6, r6, 99, 1440, NOW)
    assert sc.check(l6, r6, 99, cookie, NOW) == 1440


def test_short_secret_rejected():
    with pytest.raises(ValueError):
        SynCookies(b"short")


@settings(max_examples=300, deadline=None)
@given(
    isn=st.integers(0, 2**32 - 1),
    mss=st.integers(1, 65535),
    now=st.floats(0, 1e9),
    delay=st.floats(0, PERIOD * MAX_AGE),
    lport=st.integers(0, 65535),
    rport=st.integers(0, 65535),
)
def test_round_trip_property(isn, mss, now, delay, lport, rport):
    sc = SynCookies(SECRET)
    lo, re = (L[0], lport), (R[0], rport)
    cookie = sc.make(lo, re, isn, mss, now)
    assert sc.check(lo, re, isn, cookie, now + delay) == MSS_TABLE[mss_index(mss)]


# --- options in TSval ---------------------------------------------------------------


@pytest.mark.parametrize("wscale", [None, 0, 7, 14])
@pytest.mark.parametrize("sack_ok", [False, True])
@pytest.mark.parametrize("tsval", [0, 5, 63, 64, 1_000_000, 2**32 - 1])
def test_ts_options_round_trip(tsval, wscale, sack_ok):
    ts = encode_ts_options(tsval, wscale, sack_ok)
    assert decode_ts_options(ts) == (wscale, sack_ok)
    # Never ahead of the real clock, and at most 63 ticks behind (modulo 2**32).
    assert 0 <= (tsval - ts) % 2**32 < 64


def test_ts_options_invalid():
    with pytest.raises(ValueError):
        encode_ts_options(100, 15, False)
    assert decode_ts_options(0x20) is None
    assert decode_ts_options(0x0F | 0x40) == (None, False)  # bits above 5 are the clock


@given(
    tsval=st.integers(0, 2**32 - 1),
    peer_tsval=st.integers(0, 2**32 - 1),
    wscale=st.one_of(st.none(), st.integers(0, 14)),
    sack_ok=st.booleans(),
    mss=st.sampled_from(MSS_TABLE),
)
def test_cookie_options_round_trip_through_the_echo(tsval, peer_tsval, wscale, sack_ok, mss):
    # Our SYN-ACK's TSval comes back as the final ACK's TSecr (RFC 7323 §3.2).
    ours = encode_ts_options(tsval, wscale, sack_ok)
    assert 0 <= (tsval - ours) % 2**32 < 64  # never ahead of our clock (RFC 7323 §5.4)
    assert decode_cookie_options((peer_tsval, ours), mss) == CookieOptions(mss, wscale, sack_ok, True)


def test_cookie_options_without_timestamps_keep_only_the_mss():
    assert decode_cookie_options(None, 1460) == CookieOptions(1460, None, False, False)


def test_cookie_options_refuse_an_echo_we_cannot_have_sent():
    assert decode_cookie_options((1, 0x20), 1460) is None  # the ECN bit: we never set it
    assert decode_cookie_options((1, 0x0E), 1460) == CookieOptions(1460, 14, False, True)
    assert decode_cookie_options((1, 0x40 | 0x0F), 1460) == CookieOptions(1460, None, False, True)
