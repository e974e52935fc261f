"""RFC 6528 ISNs: monotonic in time per 4-tuple, unrelated across tuples and secrets."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.wire.seqnum import seq_ge, seq_gt, seq_sub
from workers.tcp.isn import initial_sequence_number, isn_offset, pack_tuple

SECRET = bytes(range(32))
L = (bytes([10, 0, 0, 1]), 80)
R = (bytes([10, 0, 0, 2]), 40000)


def test_is_a_sequence_number():
    isn = initial_sequence_number(SECRET, L, R, 12.5)
    assert type(isn) is int and 0 <= isn < 2**32


def test_deterministic():
    assert initial_sequence_number(SECRET, L, R, 3.0) == initial_sequence_number(SECRET, L, R, 3.0)


def test_four_microsecond_clock():
    # RFC 6528 §3: M advances by one every 4 µs.
    a = initial_sequence_number(SECRET, L, R, 100.0)
    assert seq_sub(initial_sequence_number(SECRET, L, R, 100.0 + 2**-8), a) == 976  # 3.906 ms / 4 µs
    assert seq_sub(initial_sequence_number(SECRET, L, R, 101.0), a) == 250_000


def test_monotonic_over_time_for_fixed_tuple():
    times = [k * 0.37 for k in range(1000)]
    isns = [initial_sequence_number(SECRET, L, R, t) for t in times]
    assert all(seq_gt(b, a) for a, b in zip(isns, isns[1:]))  # modulo 2**32 comparisons


def test_wraps_modulo_2_32():
    # M wraps after 2**32 * 4 µs (~4.77 h); comparisons stay monotonic across the wrap.
    period = 2**32 / 250_000
    a = initial_sequence_number(SECRET, L, R, period - 1.0)
    b = initial_sequence_number(SECRET, L, R, period + 1.0)
    assert seq_gt(b, a) and seq_sub(b, a) == 500_000


def test_differs_across_tuples():
    others = [
        (L, (R[0], R[1] + 1)),
        ((L[0], 81), R),
        (L, (bytes([10, 0, 0, 3]), R[1])),
        (R, L),  # reversed direction
        ((bytes(15) + b"\x01", 80), (bytes(15) + b"\x02", 40000)),
    ]
    base = isn_offset(SECRET, L, R)
    offsets = {isn_offset(SECRET, lo, re) for lo, re in others}
    assert base not in offsets and len(offsets) == len(others)


def test_differs_across_secrets():
    assert isn_offset(SECRET, L, R) != isn_offset(bytes(32), L, R)
    assert isn_offset(b"k" * 40, L, R) != isn_offset(b"k" * 41, L, R)  # long secrets


def test_pack_tuple_unambiguous():
    # An IPv4 tuple can never encode like an IPv6 one.
    assert pack_tuple(L, R) != pack_tuple((bytes(16), 80), R)
    with pytest.raises(ValueError):
        pack_tuple((b"\x01\x02\x03", 80), R)


def test_short_secret_rejected():
    with pytest.raises(ValueError):
        initial_sequence_number(b"short", L, R, 0.0)


@given(st.integers(0, 65535), st.integers(0, 65535), st.floats(0, 1e6), st.floats(1e-5, 1000))
def test_monotonic_property(lport, rport, t, dt):
    lo, re = (L[0], lport), (R[0], rport)
    a = initial_sequence_number(SECRET, lo, re, t)
    b = initial_sequence_number(SECRET, lo, re, t + dt)
    assert seq_ge(b, a)  # dt < 2**31 ticks, so the circular order is the time order
