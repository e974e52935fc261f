"""Out-of-order receive queue with SACK block generation.

RFC 9293 §3.10.7.4 lets a receiver hold segments that start beyond RCV.NXT
until the gap is filled; RFC 2018 §4 says which SACK blocks to report.

Contract: the connection delivers in-order data itself and puts anything that
starts beyond ``rcv_nxt`` here with :meth:`ReassemblyQueue.add`; after each
advance of ``rcv_nxt`` it calls :meth:`pop` to collect the bytes that became
contiguous.  Only bytes in ``[rcv_nxt, rcv_nxt + capacity)`` are kept, so the
queue never holds more than ``capacity`` bytes; ``max_ranges`` bounds the
number of disjoint ranges (so many one-byte holes cannot cost unbounded
bookkeeping).  Overlapping and duplicate data is merged; where copies
disagree, the first one received wins.

Internally sequence numbers are mapped to unbounded ints relative to an
anchor that follows ``rcv_nxt``, so wrapping at 2**32 needs no special case.
Each range keeps its data as a deque of chunks and merges small into large,
so no byte is copied more than once per add and pop joins each range once.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque

from pipeline.wire.seqnum import seq_add, seq_sub

# Ranges must fit well inside half the sequence space for the signed
# distances of sequence numbers (seq_sub) to be unambiguous (RFC 9293 §3.4).
MAX_CAPACITY = 1 << 30


class _Range:
    __slots__ = ("start", "end", "chunks", "last")

    def __init__(self, start: int, end: int, chunks: deque[bytes], last: int) -> None:
        self.start = start  # absolute position of the first byte
        self.end = end  # absolute position after the last byte
        self.chunks = chunks  # contiguous pieces, in order
        self.last = last  # arrival counter of the newest segment touching this range


class ReassemblyQueue:
    """Bytes received beyond RCV.NXT, as sorted disjoint ranges."""

    __slots__ = ("capacity", "max_ranges", "_starts", "_ranges", "_held", "_anchor", "_anchor_abs", "_clock")

    def __init__(self, capacity: int, max_ranges: int = 512) -> None:
        if not 0 < capacity <= MAX_CAPACITY:
            raise ValueError("capacity out of range")
        if max_ranges < 1:
            raise ValueError("max_ranges must be positive")
        self.capacity = capacity
        self.max_ranges = max_ranges
        self._starts: list[int] = []  # sorted; _starts[i] == _ranges[i].start
        self._ranges: list[_Range] = []
        self._held = 0
        self._anchor: int | None = None
        self._anchor_abs = 0
        self._clock = 0

    # -- coordinates ---------------------------------------------------------------

    def _sync(self, rcv_nxt: int) -> int:
        """Move the anchor to rcv_nxt and return its absolute position."""
        if self._anchor is None or not self._ranges:
            # Nothing held: start afresh, however far rcv_nxt moved meanwhile.
            self._anchor_abs = int(rcv_nxt)  # positions start at the sequence number (any origin works)
        else:
            self._anchor_abs += seq_sub(rcv_nxt, self._anchor)
        self._anchor = rcv_nxt
        return self._anchor_abs

    def _seq(self, pos: int) -> int:
        assert self._anchor is not None
        return seq_add(self._anchor, pos - self._anchor_abs)

    # -- queue ---------------------------------------------------------------------

    @property
    def bytes_held(self) -> int:
        return self._held

    def __len__(self) -> int:
        return len(self._ranges)

    def clear(self) -> None:
        self._starts.clear()
        self._ranges.clear()
        self._held = 0
        self._anchor = None
        self._clock = 0

    def _drop_stale(self, rcv_abs: int) -> None:
        """Forget bytes below rcv_nxt; they were delivered by another copy."""
        ranges = self._ranges
        n = 0
        while n < len(ranges) and ranges[n].end <= rcv_abs:
            self._held -= ranges[n].end - ranges[n].start
            n += 1
        if n:
            del ranges[:n]
            del self._starts[:n]
        if ranges and ranges[0].start < rcv_abs:
            r = ranges[0]
            cut = rcv_abs - r.start
            self._held -= cut
            chunks = r.chunks
            while cut >= len(chunks[0]):
                cut -= len(chunks.popleft())
            if cut:
                chunks[0] = chunks[0][cut:]
            r.start = rcv_abs
            self._starts[0] = rcv_abs

    def add(self, seq: int, data: bytes | memoryview, rcv_nxt: int) -> None:
        """Hold the part of ``data`` (starting at ``seq``) inside [rcv_nxt, rcv_nxt + capacity)."""
        if not data:
            return
        rcv_abs = self._sync(rcv_nxt)
        self._drop_stale(rcv_abs)
        assert self._anchor is not None
        s = rcv_abs + seq_sub(seq, self._anchor)
        e = s + len(data)
        # RFC 9293 §3.10.7.4: only data in the receive window is kept; bytes
        # before RCV.NXT are old duplicates, bytes past our buffer are dropped.
        lo = max(s, rcv_abs)
        hi = min(e, rcv_abs + self.capacity)
        if lo >= hi:
            return
        view = memoryview(data)
        self._clock += 1
        starts, ranges = self._starts, self._ranges
        # Ranges overlapping or touching [lo, hi): indices i .. j-1.
        i = bisect_right(starts, lo) - 1
        if i < 0 or ranges[i].end < lo:
            i += 1
        j = bisect_right(starts, hi)
        if i == j:
            whole = lo == s and hi == e
            self._insert(i, lo, hi, data if whole and type(data) is bytes else bytes(view[lo - s : hi - s]))
            return
        # Merge: new data fills the gaps around and between ranges i..j-1;
        # existing bytes win on overlap.  Grow the range with most chunks.
        group = ranges[i:j]
        b = max(range(len(group)), key=lambda k: len(group[k].chunks))
        base = group[b]
        chunks = base.chunks
        added = 0
        # Left of base, walking backwards: gap after group[k], then group[k].
        right_edge = base.start
        for k in range(b - 1, -1, -1):
            r = group[k]
            if r.end < right_edge:
                chunks.appendleft(bytes(view[r.end - s : right_edge - s]))
                added += right_edge - r.end
            chunks.extendleft(reversed(r.chunks))
            right_edge = r.start
        if lo < right_edge:
            chunks.appendleft(bytes(view[lo - s : right_edge - s]))
            added += right_edge - lo
        # Right of base, walking forwards.
        left_edge = base.end
        for k in range(b + 1, len(group)):
            r = group[k]
            if left_edge < r.start:
                chunks.append(bytes(view[left_edge - s : r.start - s]))
                added += r.start - left_edge
            chunks.extend(r.chunks)
            left_edge = r.end
        if left_edge < hi:
            chunks.append(bytes(view[left_edge - s : hi - s]))
            added += hi - left_edge
        base.start = min(lo, group[0].start)
        base.end = max(hi, group[-1].end)
        base.last = self._clock
        self._held += added
        ranges[i:j] = [base]
        starts[i:j] = [base.start]

    def _insert(self, i: int, lo: int, hi: int, piece: bytes) -> None:
        if len(self._ranges) >= self.max_ranges:
            # Bounded bookkeeping: keep what is nearest RCV.NXT, like Linux's
            # out-of-order queue pruning from the highest sequence numbers.
            if i == len(self._ranges):
                return
            dead = self._ranges.pop()
            self._starts.pop()
            self._held -= dead.end - dead.start
        self._ranges.insert(i, _Range(lo, hi, deque((piece,)), self._clock))
        self._starts.insert(i, lo)
        self._held += hi - lo

    def pop(self, rcv_nxt: int) -> bytes:
        """Remove and return the bytes contiguous from rcv_nxt (b"" if none)."""
        if not self._ranges:
            return b""
        rcv_abs = self._sync(rcv_nxt)
        self._drop_stale(rcv_abs)
        if not self._ranges or self._ranges[0].start != rcv_abs:
            return b""
        r = self._ranges.pop(0)
        self._starts.pop(0)
        self._held -= r.end - r.start
        return b"".join(r.chunks)

    def sack_blocks(self, limit: int = 4) -> list[tuple[int, int]]:
        """SACK blocks (left edge, right edge), most recently received first (RFC 2018 §4)."""
        # RFC 2018 §4: the first block holds the segment that triggered this
        # ACK; the rest repeat the most recent ones.  Recency of each range is
        # the newest segment merged into it.
        if limit <= 0 or not self._ranges:
            return []
        if limit == 1:
            recent = [max(self._ranges, key=lambda r: r.last)]
        else:
            recent = sorted(self._ranges, key=lambda r: r.last, reverse=True)[:limit]
        return [(self._seq(r.start), self._seq(r.end)) for r in recent]

    def __repr__(self) -> str:
        spans = ", ".join(f"[{a},{b})" for a, b in self.sack_blocks(len(self._ranges)))
        return f"ReassemblyQueue(held={self._held}, ranges=[{spans}])"
