"""Initial sequence numbers (RFC 6528).

ISN = M + F(localip, localport, remoteip, remoteport, secretkey), where M is
a timer ticking every 4 microseconds and F a keyed pseudorandom function
(RFC 6528 §3).  For a fixed 4-tuple successive ISNs grow with time, so old
duplicates of a previous incarnation are unlikely to fall into the new
connection's window (RFC 9293 §3.4.1); across 4-tuples they are unrelated, so
an off-path attacker cannot predict them from its own connections.

``now`` is passed in (seconds, from any monotonic clock); the secret is the
caller's: random, at least 128 bits (RFC 6528 §3), kept for the life of the
process.  Addresses are packed IPv4 (4 bytes) or IPv6 (16 bytes).
"""

from __future__ import annotations

from _blake2 import blake2s  # hashlib's blake2s, without the OpenSSL hashlib loads (~3 MB a process)

from pipeline.wire.seqnum import MASK

MIN_SECRET = 16  # bytes; RFC 6528 §3: "at least 128 bits"
TICKS_PER_SECOND = 250_000  # RFC 6528 §3 / RFC 9293 §3.4.1: M ticks every 4 µs


def _key(secret: bytes) -> bytes:
    if len(secret) < MIN_SECRET:
        raise ValueError("secret must be at least 16 bytes")
    # blake2s keys are at most 32 bytes; longer secrets are condensed first.
    return secret if len(secret) <= 32 else blake2s(secret).digest()


def pack_tuple(local: tuple[bytes, int], remote: tuple[bytes, int]) -> bytes:
    """Unambiguous encoding of a 4-tuple for hashing."""
    lip, lport = local
    rip, rport = remote
    if len(lip) not in (4, 16) or len(rip) not in (4, 16):
        raise ValueError("addresses must be packed IPv4 or IPv6")
    return bytes((len(lip),)) + lip + lport.to_bytes(2, "big") + bytes((len(rip),)) + rip + rport.to_bytes(2, "big")


def isn_offset(secret: bytes, local: tuple[bytes, int], remote: tuple[bytes, int]) -> int:
    """F(localip, localport, remoteip, remoteport, secretkey) as a 32-bit int (RFC 6528 §3)."""
    h = blake2s(pack_tuple(local, remote), key=_key(secret), digest_size=4, person=b"tcp-isn")
    return int.from_bytes(h.digest(), "big")


def initial_sequence_number(
    secret: bytes, local: tuple[bytes, int], remote: tuple[bytes, int], now: float
) -> int:
    """ISN for a new connection on this 4-tuple at time ``now`` (RFC 6528 §3)."""
    m = int(now * TICKS_PER_SECOND)  # RFC 6528 §3: M, a 4-microsecond timer
    return (m + isn_offset(secret, local, remote)) & MASK
