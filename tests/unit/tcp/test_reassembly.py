"""Out-of-order queue: merging, trimming, capacity, wrap-around, SACK block order."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.wire.seqnum import seq_add, seq_le, seq_lt, seq_sub
from workers.tcp.reassembly import ReassemblyQueue

STREAM = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable


def blocks(q, base, limit=4):
    """SACK blocks as offsets from base, for readable assertions."""
    return [(seq_sub(a, base), seq_sub(b, base)) for a, b in q.sack_blocks(limit)]


def test_in_order_after_gap_fill():
    base = 1000
    q = ReassemblyQueue(65535)
    q.add(seq_add(base, 10), STREAM[10:20], base)
    assert q.pop(base) == b""
    assert q.bytes_held == 10 and len(q) == 1
    # The connection delivers [0, 10) itself, then pops.
    assert q.pop(seq_add(base, 10)) == STREAM[10:20]
    assert q.bytes_held == 0 and len(q) == 0


def test_disjoint_then_bridged():
    base = 0
    q = ReassemblyQueue(65535)
    q.add(seq_add(base, 10), STREAM[10:20], base)
    q.add(seq_add(base, 30), STREAM[30:40], base)
    assert len(q) == 2 and q.bytes_held == 20
    q.add(seq_add(base, 15), STREAM[15:35], base)  # overlaps both and fills the hole
    assert len(q) == 1 and q.bytes_held == 30
    assert q.pop(seq_add(base, 10)) == STREAM[10:40]


def test_duplicate_and_contained():
    base = 5
    q = ReassemblyQueue(65535)
    q.add(seq_add(base, 100), STREAM[100:200], base)
    q.add(seq_add(base, 100), STREAM[100:200], base)
    q.add(seq_add(base, 120), STREAM[120:130], base)
    assert q.bytes_held == 100 and len(q) == 1
    q.add(seq_add(base, 50), STREAM[50:250], base)  # covers it on both sides
    assert q.bytes_held == 200 and len(q) == 1
    assert q.pop(seq_add(base, 50)) == STREAM[50:250]


def test_adjacent_ranges_merge():
    base = 0
    q = ReassemblyQueue(65535)
    q.add(seq_add(base, 10), STREAM[10:20], base)
    q.add(seq_add(base, 20), STREAM[20:30], base)
    q.add(seq_add(base, 5), STREAM[5:10], base)
    assert len(q) == 1
    assert q.pop(seq_add(base, 5)) == STREAM[5:30]


def test_first_copy_wins_on_overlap():
    base = 0
    q = ReassemblyQueue(100)
    q.add(seq_add(base, 10), b"AAAAAAAAAA", base)
    q.add(seq_add(base, 5), b"BBBBBBBBBBBBBBBBBBBB", base)
    assert q.pop(seq_add(base, 5)) == b"BBBBB" + b"AAAAAAAAAA" + b"BBBBB"


def test_data_before_rcv_nxt_is_trimmed():
    base = 100
    q = ReassemblyQueue(1000)
    q.add(seq_add(base, -10), STREAM[0:30], base)  # first 10 bytes are old
    assert q.bytes_held == 20
    assert q.pop(base) == STREAM[10:30]
    q.add(seq_add(base, -50), STREAM[:10], base)  # entirely old
    assert q.bytes_held == 0 and len(q) == 0


def test_pop_discards_stale_and_returns_rest():
    base = 0
    q = ReassemblyQueue(1000)
    q.add(seq_add(base, 10), STREAM[10:50], base)
    q.add(seq_add(base, 60), STREAM[60:70], base)
    # Another copy delivered up to 30 meanwhile.
    assert q.pop(seq_add(base, 30)) == STREAM[30:50]
    assert q.bytes_held == 10
    # rcv_nxt jumped past everything.
    assert q.pop(seq_add(base, 100)) == b""
    assert q.bytes_held == 0 and len(q) == 0


def test_capacity_bounds_window():
    base = 0
    q = ReassemblyQueue(100)
    q.add(seq_add(base, 90), STREAM[90:200], base)  # only [90, 100) fits
    assert q.bytes_held == 10
    q.add(seq_add(base, 150), STREAM[150:160], base)  # wholly beyond
    assert q.bytes_held == 10 and len(q) == 1
    q.add(seq_add(base, 0), STREAM[0:100], base)
    assert q.bytes_held == 100
    assert q.pop(base) == STREAM[0:100]


def test_capacity_window_slides_with_rcv_nxt():
    base = 0
    q = ReassemblyQueue(100)
    q.add(seq_add(base, 50), STREAM[50:100], base)
    q.add(seq_add(base, 120), STREAM[120:140], seq_add(base, 60))  # window is now [60, 160)
    assert q.bytes_held <= 100
    assert q.pop(seq_add(base, 60)) == STREAM[60:100]
    assert q.bytes_held == 20


def test_max_ranges_bound_keeps_lowest():
    base = 0
    q = ReassemblyQueue(10000, max_ranges=4)
    for k in range(10):
        q.add(seq_add(base, 10 + 10 * k), STREAM[10 + 10 * k : 15 + 10 * k], base)
    assert len(q) == 4
    q.add(seq_add(base, 1), STREAM[1:2], base)  # lower than all: evicts the highest
    assert len(q) == 4
    starts = sorted(seq_sub(a, base) for a, _ in q.sack_blocks(10))
    assert starts == [1, 10, 20, 30]
    q.add(seq_add(base, 12), STREAM[12:24], base)  # merging is always allowed
    assert len(q) == 3


@pytest.mark.parametrize("isn", [2**32 - 5, 2**32 - 1, 2**32 - 3000, 0])
def test_wraparound(isn):
    base = isn
    q = ReassemblyQueue(65535)
    q.add(seq_add(base, 2000), STREAM[2000:4000], base)
    q.add(seq_add(base, 1000), STREAM[1000:2500], base)
    q.add(seq_add(base, 4100), STREAM[4100:4101], base)
    assert blocks(q, base) == [(4100, 4101), (1000, 4000)]
    q.add(seq_add(base, 4000), STREAM[4000:4100], base)  # touches both: one range
    assert blocks(q, base) == [(1000, 4101)]
    assert q.pop(seq_add(base, 1000)) == STREAM[1000:4101]
    assert q.bytes_held == 0


def test_sack_blocks_most_recent_first():
    # RFC 2018 §4: the block containing the newest segment first, then the others most recent first.
    base = 0
    q = ReassemblyQueue(65535)
    q.add(seq_add(base, 100), STREAM[100:110], base)
    q.add(seq_add(base, 300), STREAM[300:310], base)
    q.add(seq_add(base, 200), STREAM[200:210], base)
    assert blocks(q, base) == [(200, 210), (300, 310), (100, 110)]
    q.add(seq_add(base, 110), STREAM[110:120], base)  # extends the oldest block
    assert blocks(q, base) == [(100, 120), (200, 210), (300, 310)]
    q.add(seq_add(base, 305), STREAM[305:308], base)  # a duplicate inside a block still makes it newest
    assert blocks(q, base)[0] == (300, 310)


def test_sack_blocks_limit():
    base = 0
    q = ReassemblyQueue(65535)
    for k in range(6):
        q.add(seq_add(base, 100 * (k + 1)), STREAM[100 * (k + 1) : 100 * (k + 1) + 10], base)
    assert blocks(q, base, 3) == [(600, 610), (500, 510), (400, 410)]
    assert blocks(q, base, 1) == [(600, 610)]
    assert q.sack_blocks(0) == []


def test_clear_and_empty_add():
    base = 0
    q = ReassemblyQueue(1000)
    q.add(seq_add(base, 10), b"", base)
    assert len(q) == 0
    q.add(seq_add(base, 10), b"x", base)
    q.clear()
    assert len(q) == 0 and q.bytes_held == 0 and q.sack_blocks() == []


def test_bad_capacity():
    with pytest.raises(ValueError):
        ReassemblyQueue(0)
    with pytest.raises(ValueError):
        ReassemblyQueue(2**31)


def test_memoryview_input():
    base = 0
    q = ReassemblyQueue(1000)
    q.add(seq_add(base, 5), memoryview(STREAM)[5:10], base)
    assert q.pop(seq_add(base, 5)) == STREAM[5:10]


def test_many_small_segments_reverse_order_is_fast():
    # Reverse arrival makes every segment prepend to one growing range.
    base = 2**32 - 100
    n = 20000
    data = bytes(n)
    q = ReassemblyQueue(n + 1)
    for k in range(n - 1, 0, -1):
        q.add(seq_add(base, k), data[k : k + 1], base)
    assert len(q) == 1 and q.bytes_held == n - 1
    assert q.pop(seq_add(base, 1)) == data[1:]


def _chunks_strategy():
    return st.lists(st.tuples(st.integers(0, 2999), st.integers(1, 400)), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(
    isn=st.integers(0, 2**32 - 1),
    pieces=_chunks_strategy(),
    seed=st.integers(0, 2**32),
)
def test_any_permutation_and_duplication_reassembles(isn, pieces, seed):
    """Chunks covering the stream, shuffled and duplicated, reassemble to the stream."""
    total = 3000
    stream = STREAM[:total]
    rng = random.Random(seed)
    # Make sure the chunks cover the stream, then add overlapping extras and duplicates.
    cover = []
    pos = 0
    while pos < total:
        size = rng.randint(1, 300)
        cover.append((pos, min(size, total - pos)))
        pos += size
    segs = cover + [(a, min(n, total - a)) for a, n in pieces] + rng.sample(cover, k=min(5, len(cover)))
    rng.shuffle(segs)
    base = isn
    q = ReassemblyQueue(total)
    rcv_nxt = base
    out = bytearray()
    for a, n in segs:
        seg_seq = seq_add(base, a)
        if seq_le(seg_seq, rcv_nxt) and seq_lt(rcv_nxt, seq_add(seg_seq, n)):
            # In order: the connection delivers it itself, then pops.
            skip = seq_sub(rcv_nxt, seg_seq)
            out += stream[a + skip : a + n]
            rcv_nxt = seq_add(base, a + n)
        elif seq_lt(rcv_nxt, seg_seq):
            q.add(seg_seq, stream[a : a + n], rcv_nxt)
        got = q.pop(rcv_nxt)
        out += got
        rcv_nxt = seq_add(rcv_nxt, len(got))
        assert q.bytes_held <= total
    assert bytes(out) == stream
    assert q.bytes_held == 0 and len(q) == 0


@settings(max_examples=200, deadline=None)
@given(
    isn=st.integers(0, 2**32 - 1),
    pieces=_chunks_strategy(),
    cap=st.integers(1, 3000),
)
def test_held_bytes_match_union_and_capacity(isn, pieces, cap):
    base = isn
    q = ReassemblyQueue(cap)
    covered = set()
    for a, n in pieces:
        q.add(seq_add(base, a + 1), STREAM[a : a + n], base)
        covered.update(range(a + 1, min(a + 1 + n, cap)))
    assert q.bytes_held == len(covered) <= cap
    # Ranges are disjoint, non-adjacent and their data is right.
    spans = sorted((seq_sub(a, base), seq_sub(b, base)) for a, b in q.sack_blocks(len(q)))
    assert len(spans) == len(q)
    for (a1, b1), (a2, _) in zip(spans, spans[1:]):
        assert b1 < a2
    assert sum(b - a for a, b in spans) == q.bytes_held
