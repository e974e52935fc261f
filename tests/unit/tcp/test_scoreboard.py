"""Sender SACK scoreboard: recording, validation, holes, advance, wrap-around."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.wire.seqnum import seq_add, seq_sub
from workers.tcp.scoreboard import SackScoreboard

MSS = 100


def rel(sb, base):
    return [(seq_sub(a, base), seq_sub(b, base)) for a, b in sb.ranges()]


@pytest.fixture(params=[1000, 2**32 - 250])
def base(request):
    return request.param


def test_empty(base):
    sb = SackScoreboard()
    assert sb.sacked_bytes == 0 and sb.highest_sacked is None and len(sb) == 0
    assert not sb.is_sacked(base)
    assert sb.next_hole(base, seq_add(base, 1000)) is None


def test_record_and_merge(base):
    sb = SackScoreboard()
    una, nxt = base, seq_add(base, 1000)
    sb.update([(seq_add(base, 200), seq_add(base, 300))], una, nxt)
    sb.update([(seq_add(base, 500), seq_add(base, 600)), (seq_add(base, 200), seq_add(base, 300))], una, nxt)
    assert rel(sb, base) == [(200, 300), (500, 600)]
    assert sb.sacked_bytes == 200
    sb.update([(seq_add(base, 250), seq_add(base, 500))], una, nxt)  # bridges both
    assert rel(sb, base) == [(200, 600)] and sb.sacked_bytes == 400
    sb.update([(seq_add(base, 600), seq_add(base, 700))], una, nxt)  # adjacent
    assert rel(sb, base) == [(200, 700)]
    assert sb.highest_sacked == seq_add(base, 700)


def test_is_sacked_edges(base):
    sb = SackScoreboard()
    sb.update([(seq_add(base, 200), seq_add(base, 300))], base, seq_add(base, 1000))
    assert not sb.is_sacked(seq_add(base, 199))
    assert sb.is_sacked(seq_add(base, 200))
    assert sb.is_sacked(seq_add(base, 299))
    assert not sb.is_sacked(seq_add(base, 300))


def test_invalid_blocks_ignored(base):
    # RFC 2018 §8 / RFC 2883: blocks beyond SND.NXT, empty/inverted blocks and
    # D-SACK blocks below SND.UNA are not scoreboard information.
    sb = SackScoreboard()
    una, nxt = seq_add(base, 100), seq_add(base, 1000)
    sb.update(
        [
            (seq_add(base, 900), seq_add(base, 1100)),  # beyond snd_nxt
            (seq_add(base, 500), seq_add(base, 500)),  # empty
            (seq_add(base, 600), seq_add(base, 550)),  # inverted
            (seq_add(base, 10), seq_add(base, 90)),  # D-SACK below snd_una
            (seq_add(base, 50), seq_add(base, 100)),  # ends exactly at snd_una
            (seq_add(base, 2**31), seq_add(base, 2**31 + 10)),  # garbage far away
        ],
        una,
        nxt,
    )
    assert len(sb) == 0 and sb.sacked_bytes == 0
    sb.update([(seq_add(base, 900), seq_add(base, 1000))], una, nxt)  # right edge == snd_nxt is fine
    assert rel(sb, base) == [(900, 1000)]


def test_block_straddling_snd_una_is_clipped(base):
    sb = SackScoreboard()
    sb.update([(seq_add(base, 50), seq_add(base, 200))], seq_add(base, 100), seq_add(base, 1000))
    assert rel(sb, base) == [(100, 200)]


def test_next_hole_walk(base):
    # Sent [0, 1000); SACKed [200, 300), [500, 600), [800, 900).
    sb = SackScoreboard()
    una, nxt = base, seq_add(base, 1000)
    sb.update([(seq_add(base, a), seq_add(base, a + 100)) for a in (200, 500, 800)], una, nxt)
    holes = []
    p = una
    while (h := sb.next_hole(p, nxt)) is not None:
        holes.append((seq_sub(h[0], base), seq_sub(h[1], base)))
        p = h[1]
    # Nothing above the highest SACKed byte counts as a hole.
    assert holes == [(0, 200), (300, 500), (600, 800)]
    assert sb.next_hole(seq_add(base, 250), nxt) == (seq_add(base, 300), seq_add(base, 500))
    assert sb.next_hole(seq_add(base, 350), nxt) == (seq_add(base, 350), seq_add(base, 500))
    assert sb.next_hole(seq_add(base, 850), nxt) is None
    assert sb.next_hole(seq_add(base, 900), nxt) is None


def test_advance_forgets_and_trims(base):
    sb = SackScoreboard()
    nxt = seq_add(base, 1000)
    sb.update([(seq_add(base, 200), seq_add(base, 300)), (seq_add(base, 500), seq_add(base, 600))], base, nxt)
    sb.advance(seq_add(base, 250))
    assert rel(sb, base) == [(250, 300), (500, 600)] and sb.sacked_bytes == 150
    assert sb.next_hole(base, nxt) == (seq_add(base, 300), seq_add(base, 500))
    sb.advance(seq_add(base, 600))
    assert len(sb) == 0 and sb.sacked_bytes == 0 and sb.highest_sacked is None


def test_update_advances_too(base):
    sb = SackScoreboard()
    sb.update([(seq_add(base, 200), seq_add(base, 300))], base, seq_add(base, 1000))
    sb.update([(seq_add(base, 500), seq_add(base, 600))], seq_add(base, 300), seq_add(base, 1000))
    assert rel(sb, base) == [(500, 600)]


def test_max_ranges_keeps_lowest(base):
    sb = SackScoreboard(max_ranges=3)
    nxt = seq_add(base, 10000)
    for k in range(1, 6):
        sb.update([(seq_add(base, 100 * k), seq_add(base, 100 * k + 10))], base, nxt)
    assert rel(sb, base) == [(100, 110), (200, 210), (300, 310)]
    sb.update([(seq_add(base, 50), seq_add(base, 60))], base, nxt)
    assert rel(sb, base) == [(50, 60), (100, 110), (200, 210)]
    assert sb.sacked_bytes == 30


def test_sacked_above(base):
    sb = SackScoreboard()
    nxt = seq_add(base, 10000)
    sb.update([(seq_add(base, a), seq_add(base, b)) for a, b in ((100, 200), (300, 400), (500, 501))], base, nxt)
    assert sb.sacked_above(base) == 201
    assert sb.sacked_above(seq_add(base, 150)) == 49 + 100 + 1


def test_covers(base):
    sb = SackScoreboard()
    sb.update([(seq_add(base, 200), seq_add(base, 300)), (seq_add(base, 400), seq_add(base, 500))], base, seq_add(base, 1000))
    assert sb.covers(seq_add(base, 200), seq_add(base, 300)) and sb.covers(seq_add(base, 250), seq_add(base, 260))
    assert not sb.covers(seq_add(base, 199), seq_add(base, 300)) and not sb.covers(seq_add(base, 200), seq_add(base, 301))
    assert not sb.covers(seq_add(base, 250), seq_add(base, 450))  # a hole in between
    assert not SackScoreboard().covers(base, seq_add(base, 1))


def test_clear(base):
    sb = SackScoreboard()
    sb.update([(seq_add(base, 200), seq_add(base, 300))], base, seq_add(base, 1000))
    sb.clear()
    assert len(sb) == 0 and sb.sacked_bytes == 0 and sb.highest_sacked is None


@settings(max_examples=200, deadline=None)
@given(
    isn=st.integers(0, 2**32 - 1),
    acks=st.lists(
        st.tuples(st.integers(0, 50), st.lists(st.tuples(st.integers(-20, 520), st.integers(-5, 60)), max_size=4)),
        max_size=30,
    ),
)
def test_matches_a_set_model(isn, acks):
    base = isn
    nxt_off = 500
    sb = SackScoreboard()
    model: set[int] = set()
    una_off = 0
    for step, blocks in acks:
        una_off = min(una_off + step, nxt_off)
        sent = [(seq_add(base, a), seq_add(base, a + n)) for a, n in blocks]
        sb.update(sent, seq_add(base, una_off), seq_add(base, nxt_off))
        model = {b for b in model if b >= una_off}
        for a, n in blocks:
            if n > 0 and a + n <= nxt_off and a + n > una_off:
                model.update(range(max(a, una_off), a + n))
        assert sb.sacked_bytes == len(model)
        for off in range(una_off, nxt_off, 7):
            assert sb.is_sacked(seq_add(base, off)) == (off in model)
            for n in (1, 13, 60):  # covers(): every byte of [off, off + n) SACKed
                assert sb.covers(seq_add(base, off), seq_add(base, off + n)) == all(b in model for b in range(off, off + n))
        # Holes are exactly the unSACKed bytes below the highest SACKed byte.
        holes = set()
        p = seq_add(base, una_off)
        while (h := sb.next_hole(p, seq_add(base, nxt_off))) is not None:
            assert seq_sub(h[0], p) >= 0 and seq_sub(h[1], h[0]) > 0
            holes.update(range(seq_sub(h[0], base), seq_sub(h[1], base)))
            p = h[1]
        top = max(model) + 1 if model else una_off
        assert holes == set(range(una_off, top)) - model
        if model:
            assert sb.highest_sacked == seq_add(base, top)
