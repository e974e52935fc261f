"""Sequence-number helpers against a reference model: unbounded integers near a base.

Two sequence numbers less than 2**31 apart stand for two points on the
integer line (RFC 9293 §3.4, RFC 1982 §3.2): their wire values are the points
modulo 2**32.  Every helper must answer as the plain integers do, wherever the
base sits -- in particular just below the wrap.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.wire.seqnum import (
    HALF, MASK, MOD, seq_add, seq_ge, seq_gt, seq_in_window, seq_le, seq_lt, seq_max, seq_min, seq_sub,
)

bases = st.one_of(st.integers(0, MASK), st.integers(MOD - 70_000, MASK), st.integers(0, 70_000))
offsets = st.integers(-(HALF // 2) + 1, HALF // 2 - 1)  # any two of these are less than 2**31 apart


def wire(base: int, off: int) -> int:
    return (base + off) % MOD


@given(bases, offsets, offsets)
def test_order_and_distance_follow_the_integers(base, x, y):
    a, b = wire(base, x), wire(base, y)
    assert seq_sub(a, b) == x - y
    assert seq_lt(a, b) == (x < y)
    assert seq_le(a, b) == (x <= y)
    assert seq_gt(a, b) == (x > y)
    assert seq_ge(a, b) == (x >= y)
    assert seq_max(a, b) == wire(base, max(x, y))
    assert seq_min(a, b) == wire(base, min(x, y))


@given(bases, offsets, st.integers(-(HALF // 2) + 1, HALF // 2 - 1))
def test_add_wraps_and_stays_reduced(base, x, n):
    a = wire(base, x)
    got = seq_add(a, n)
    assert 0 <= got < MOD and got == wire(base, x + n)
    assert seq_sub(got, a) == n


@given(bases, offsets, offsets, st.integers(0, HALF // 2))
def test_in_window(base, x, start, length):
    assert seq_in_window(wire(base, x), wire(base, start), length) == (start <= x < start + length)


def test_across_the_wrap():
    top = MOD - 10
    after = seq_add(top, 20)
    assert after == 10
    assert seq_lt(top, after) and seq_gt(after, top) and not seq_lt(after, top)
    assert seq_sub(after, top) == 20 and seq_sub(top, after) == -20
    assert seq_in_window(0, top, 11) and not seq_in_window(1, top, 11)
    assert seq_max(top, after) == after and seq_min(top, after) == top


def test_half_way_is_below_in_both_directions():
    # RFC 1982 §3.2 leaves a distance of exactly 2**31 undefined; ours says
    # "below" both ways, and the distance is -2**31 both ways (seq_sub's range).
    a, b = 5, 5 + HALF
    assert seq_lt(a, b) and seq_lt(b, a)
    assert seq_sub(a, b) == seq_sub(b, a) == -HALF
    assert not seq_lt(a, a) and seq_le(a, a) and seq_ge(a, a) and seq_sub(a, a) == 0
