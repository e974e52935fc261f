"""The Internet checksum (RFC 1071) and its incremental update (RFC 1624).

Sums are computed on the whole buffer as one big integer: since
2**16 == 1 (mod 0xFFFF), the big-endian integer value of a buffer is congruent
to the sum of its 16-bit words modulo 0xFFFF, which is exactly the one's
complement sum (RFC 1071 §2 (B), end-around carry) up to the 0 / 0xFFFF
corner. No per-byte or per-word Python loop runs on the data.

Partial sums (``initial``) may be any non-negative int, folded or not.
"""

from __future__ import annotations

_FOLD_MIN = 4096  # bytes; above this, halving folds beat one big % (measured)


def _sum_mod(data: bytes | bytearray | memoryview, initial: int) -> int:
    """A value congruent (mod 0xFFFF) to the word sum plus initial; zero only if both are."""
    n = len(data)
    x = int.from_bytes(data, "big")
    if n & 1:
        x <<= 8  # RFC 1071 §4.1: an odd trailing byte is padded with zero
        n += 1
    if n >= _FOLD_MIN:
        # Halve the integer at a 16-bit boundary until small: shifts and masks
        # are cheaper than a long division over the whole buffer.
        bits = n * 8
        while bits > 64:
            half = (bits >> 5) << 4
            x = (x >> half) + (x & ((1 << half) - 1))
            bits = max(bits - half, half) + 1
    return x + initial


def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The folded 16-bit one's complement sum of data (RFC 1071), not complemented."""
    total = _sum_mod(data, initial)
    folded = total % 0xFFFF
    # One's complement addition only yields +0 when every addend is +0.
    if folded == 0 and total:
        return 0xFFFF
    return folded


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The 16-bit checksum to store: the complement of the one's complement sum (RFC 1071)."""
    return ~ones_sum(data, initial) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """Folded sum of the IPv4 pseudo header (RFC 9293 §3.1, RFC 768)."""
    # The 8 address bytes as one integer are congruent to their 4 words (mod 0xFFFF).
    total = int.from_bytes(src + dst, "big") + protocol + length
    folded = total % 0xFFFF
    if folded == 0 and total:
        return 0xFFFF
    return folded


def verify(data: bytes | bytearray | memoryview, initial: int = 0) -> bool:
    """True if the sum over data, checksum field included, is 0xFFFF (RFC 1071 §1 (3))."""
    total = _sum_mod(data, initial)
    return total % 0xFFFF == 0 and total != 0


def update16(checksum: int, old: int, new: int) -> int:
    """Checksum after a 16-bit field changes from old to new (RFC 1624 §3, eqn. 3)."""
    # HC' = ~(~HC + ~m + m')
    total = (~checksum & 0xFFFF) + (~old & 0xFFFF) + new
    folded = total % 0xFFFF
    if folded == 0 and total:
        folded = 0xFFFF
    return ~folded & 0xFFFF


def pseudo_header_sum6(src: bytes, dst: bytes, next_header: int, upper_len: int) -> int:
    """Folded sum of the IPv6 pseudo header (RFC 8200 §8.1) for UDP, TCP and ICMPv6.

    The 32-bit Upper-Layer Packet Length and the zero-padded Next Header are
    added as plain integers: 2**16 == 1 (mod 0xFFFF) makes that congruent to
    adding their 16-bit words.
    """
    return ones_sum(b"", int.from_bytes(src + dst, "big") + next_header + upper_len)
