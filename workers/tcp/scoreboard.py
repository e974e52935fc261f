"""Sender-side SACK scoreboard (RFC 2018, ideas from RFC 6675).

Contract: the SACK recovery passes each ACK's SACK blocks to
:meth:`SackScoreboard.update` together with its current ``snd_una`` and
``snd_nxt``, calls :meth:`advance` when ``snd_una`` moves, and asks
:meth:`next_hole` what to retransmit.  SACK information is advisory: the
sender must keep all unacknowledged data, because a receiver may renege
(RFC 2018 §8), so dropping scoreboard state is always safe -- which is how
the number of ranges is bounded.

The SACK recovery builds one at the first SACK block a connection receives
(``SackRecovery.need_scoreboard``), and drops it when the peer may have reneged: most
connections never see a SACK block and never pay for one.

``highest_sacked`` is the right edge of the highest SACKed range, i.e. the
sequence number just after the highest SACKed byte (the same convention as a
SACK block's right edge).  Sequence numbers are mapped to unbounded ints
relative to an anchor that follows ``snd_una``, so wrap-around at 2**32 needs
no special case.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from pipeline.wire.seqnum import seq_add, seq_lt, seq_max, seq_sub


class SackScoreboard:
    """Disjoint SACKed ranges above SND.UNA."""

    __slots__ = ("max_ranges", "_starts", "_ends", "_sacked", "_anchor", "_anchor_abs")

    def __init__(self, max_ranges: int = 1024) -> None:
        if max_ranges < 1:
            raise ValueError("max_ranges must be positive")
        self.max_ranges = max_ranges
        self._starts: list[int] = []
        self._ends: list[int] = []  # sorted, parallel to _starts; ranges never touch
        self._sacked = 0
        self._anchor: int | None = None
        self._anchor_abs = 0

    # -- coordinates ---------------------------------------------------------------

    def _sync(self, snd_una: int) -> int:
        if self._anchor is None or not self._starts:
            self._anchor_abs = int(snd_una)  # positions start at the sequence number (any origin works)
        else:
            self._anchor_abs += seq_sub(snd_una, self._anchor)
        self._anchor = snd_una
        return self._anchor_abs

    def _abs(self, seq: int) -> int:
        assert self._anchor is not None
        return self._anchor_abs + seq_sub(seq, self._anchor)

    def _seq(self, pos: int) -> int:
        assert self._anchor is not None
        return seq_add(self._anchor, pos - self._anchor_abs)

    # -- state ---------------------------------------------------------------------

    @property
    def sacked_bytes(self) -> int:
        return self._sacked

    @property
    def highest_sacked(self) -> int | None:
        """Right edge of the highest SACKed range, or None if nothing is SACKed."""
        return self._seq(self._ends[-1]) if self._ends else None

    def __len__(self) -> int:
        return len(self._starts)

    def ranges(self) -> list[tuple[int, int]]:
        """SACKed ranges [left, right) in sequence order."""
        return [(self._seq(a), self._seq(b)) for a, b in zip(self._starts, self._ends)]

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self._sacked = 0
        self._anchor = None

    # -- updates -------------------------------------------------------------------

    def advance(self, snd_una: int) -> None:
        """Forget everything below snd_una (cumulatively acknowledged)."""
        if not self._starts:
            self._anchor = None
            return
        una = self._sync(snd_una)
        starts, ends = self._starts, self._ends
        n = bisect_right(ends, una)  # ranges ending at or below snd_una
        if n:
            self._sacked -= sum(ends[k] - starts[k] for k in range(n))
            del starts[:n]
            del ends[:n]
        if starts and starts[0] < una:
            self._sacked -= una - starts[0]
            starts[0] = una

    def update(self, blocks: Iterable[tuple[int, int]], snd_una: int, snd_nxt: int) -> None:
        """Record the SACK blocks of one ACK; blocks outside (snd_una, snd_nxt] are ignored."""
        self.advance(snd_una)
        una = self._sync(snd_una)
        nxt = una + seq_sub(snd_nxt, snd_una)
        for left, right in blocks:
            lo = self._abs(left)
            hi = self._abs(right)
            # RFC 2018 §3/§8: a block must describe data we sent and that is not
            # yet cumulatively acknowledged.  Empty or inverted blocks, blocks
            # beyond SND.NXT, and D-SACK blocks at or below SND.UNA (RFC 2883 §4)
            # carry nothing for the scoreboard.
            if hi <= lo or hi > nxt or hi <= una:
                continue
            self._insert(max(lo, una), hi)

    def _insert(self, lo: int, hi: int) -> None:
        starts, ends = self._starts, self._ends
        i = bisect_left(ends, lo)  # first range ending at or after lo (touching merges)
        j = bisect_right(starts, hi)  # ranges starting at or before hi
        if i < j:
            removed = sum(ends[k] - starts[k] for k in range(i, j))
            lo = min(lo, starts[i])
            hi = max(hi, ends[j - 1])
            self._sacked += (hi - lo) - removed
            starts[i:j] = [lo]
            ends[i:j] = [hi]
            return
        if len(starts) >= self.max_ranges:
            # Bounded state; forgetting SACK information is safe (RFC 2018 §8).
            if i == len(starts):
                return
            self._sacked -= ends.pop() - starts.pop()
        starts.insert(i, lo)
        ends.insert(i, hi)
        self._sacked += hi - lo

    # -- queries -------------------------------------------------------------------

    def is_sacked(self, seq: int) -> bool:
        """True if the byte at seq has been SACKed."""
        if not self._starts:
            return False
        p = self._abs(seq)
        k = bisect_right(self._starts, p) - 1
        return k >= 0 and p < self._ends[k]

    def covers(self, start: int, end: int) -> bool:
        """True if every byte of [start, end) has been SACKed (one range holds it all)."""
        if not self._starts:
            return False
        a = self._abs(start)
        k = bisect_right(self._starts, a) - 1
        return k >= 0 and self._abs(end) <= self._ends[k] and a < self._ends[k]

    def next_hole(self, start: int, snd_nxt: int) -> tuple[int, int] | None:
        """First un-SACKed range [a, b) at or after start and below the highest SACKed byte."""
        # RFC 6675 §4 NextSeg() rule 1: retransmit the lowest un-SACKed data
        # that has SACKed data above it.
        if not self._starts:
            return None
        starts, ends = self._starts, self._ends
        p = max(self._abs(start), self._anchor_abs)
        limit = min(ends[-1], self._abs(snd_nxt))
        k = bisect_right(starts, p) - 1
        if k >= 0 and p < ends[k]:
            p = ends[k]  # inside a SACKed range: skip to its end
        k += 1  # next SACKed range above p
        if p >= limit or k >= len(starts):
            return None
        return self._seq(p), self._seq(min(starts[k], limit))

    def unsacked_from(self, start: int, snd_nxt: int) -> tuple[int, int]:
        """The first range at or after start not SACKed, up to snd_nxt (RFC 6675 §4 NextSeg())."""
        if self._sacked:
            hole = self.next_hole(start, snd_nxt)
            if hole is not None:
                return seq_max(hole[0], start), hole[1]
            top = self.highest_sacked
            if top is not None and seq_lt(start, top):
                start = top
        return start, snd_nxt

    def sacked_above(self, seq: int) -> int:
        """Bytes SACKed strictly above seq."""
        if not self._starts:
            return 0
        p = self._abs(seq)
        starts, ends = self._starts, self._ends
        k = bisect_right(ends, p)
        total = sum(ends[m] - starts[m] for m in range(k, len(starts)))
        if k < len(starts) and starts[k] <= p:
            total -= p + 1 - starts[k]
        return total

    def sacked_below(self, seq: int) -> int:
        """Bytes SACKed strictly below seq."""
        if not self._starts:
            return 0
        p = self._abs(seq)
        starts, ends = self._starts, self._ends
        k = bisect_left(starts, p)  # ranges starting below p
        if not k:
            return 0
        total = sum(ends[m] - starts[m] for m in range(k))
        if ends[k - 1] > p:
            total -= ends[k - 1] - p
        return total

    def __repr__(self) -> str:
        spans = ", ".join(f"[{int(a)},{int(b)})" for a, b in self.ranges())
        return f"SackScoreboard(sacked={self._sacked}, ranges=[{spans}])"
