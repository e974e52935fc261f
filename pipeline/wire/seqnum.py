"""TCP sequence numbers: plain ints in [0, 2**32) compared modulo 2**32.

RFC 9293 §3.4 (serial number arithmetic as in RFC 1982 §3.2): ``a < b`` iff
``(a - b) mod 2**32 >= 2**31``.  Sequence numbers are plain ``int`` values,
always reduced, so ``==`` is plain equality; every other comparison, every
addition of a length and every distance goes through the functions here,
never through the bare operators.  Plain ints (not an ``int`` subclass) let
mypyc compile these helpers and their callers to machine integers.
"""

from __future__ import annotations

from typing import Final

MOD: Final = 1 << 32
MASK: Final = MOD - 1
HALF: Final = 1 << 31


def seq_add(a: int, n: int) -> int:
    """a + n modulo 2**32 (n may be negative)."""
    return (a + n) & MASK


def seq_sub(a: int, b: int) -> int:
    """The signed distance a - b, in [-2**31, 2**31)."""
    d = (a - b) & MASK
    return d - MOD if d >= HALF else d


def seq_lt(a: int, b: int) -> bool:
    return ((a - b) & MASK) >= HALF


def seq_le(a: int, b: int) -> bool:
    return a == b or ((a - b) & MASK) >= HALF


def seq_gt(a: int, b: int) -> bool:
    return ((b - a) & MASK) >= HALF


def seq_ge(a: int, b: int) -> bool:
    return a == b or ((b - a) & MASK) >= HALF


def seq_in_window(seq: int, start: int, length: int) -> bool:
    """start <= seq < start + length, modulo 2**32."""
    return ((seq - start) & MASK) < length


def seq_max(a: int, b: int) -> int:
    return b if ((a - b) & MASK) >= HALF else a


def seq_min(a: int, b: int) -> int:
    return a if ((a - b) & MASK) >= HALF else b
