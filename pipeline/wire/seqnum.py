"""TCP sequence numbers: 32-bit values compared modulo 2**32 (RFC 9293 §3.4).

``SeqNum`` is an ``int`` subclass kept in [0, 2**32); arithmetic with an int
wraps, subtraction of two SeqNums gives the signed distance, and comparisons
are the RFC's circular ones: ``a < b`` iff ``(a - b) mod 2**32 >= 2**31``.
Never compare sequence numbers as bare ints.
"""

from __future__ import annotations

_MOD = 1 << 32
_MASK = _MOD - 1
_HALF = 1 << 31


class SeqNum(int):
    """A sequence number; ``SeqNum(x)`` reduces x modulo 2**32."""

    __slots__ = ()

    def __new__(cls, value: int) -> SeqNum:
        return int.__new__(cls, value & _MASK)

    def __add__(self, n: int) -> SeqNum:  # type: ignore[override]
        return SeqNum(int(self) + int(n))

    __radd__ = __add__

    def __sub__(self, other: int) -> SeqNum | int:  # type: ignore[override]
        """SeqNum - SeqNum is the signed distance; SeqNum - int is a SeqNum."""
        if isinstance(other, SeqNum):
            d = (int(self) - int(other)) & _MASK
            return d - _MOD if d >= _HALF else d
        return SeqNum(int(self) - int(other))

    def __lt__(self, other: int) -> bool:  # type: ignore[override]
        return ((int(self) - int(other)) & _MASK) >= _HALF

    def __le__(self, other: int) -> bool:  # type: ignore[override]
        return int(self) == int(other) or self.__lt__(other)

    def __gt__(self, other: int) -> bool:  # type: ignore[override]
        return SeqNum(other).__lt__(self)

    def __ge__(self, other: int) -> bool:  # type: ignore[override]
        return int(self) == int(other) or self.__gt__(other)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, int) and (int(self) - int(other)) & _MASK == 0

    def __hash__(self) -> int:
        return int.__hash__(self)

    def __repr__(self) -> str:
        return f"SeqNum({int(self)})"

    def in_window(self, start: SeqNum, length: int) -> bool:
        """start <= self < start + length, modulo 2**32."""
        return 0 <= (int(self) - int(start)) & _MASK < length


def seq_max(a: SeqNum, b: SeqNum) -> SeqNum:
    return b if a < b else a
