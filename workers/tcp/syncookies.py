"""SYN cookies (RFC 4987 §3.6), in a Linux-like layout.

Under a SYN flood the listener keeps no state for a SYN: it answers with a
SYN-ACK whose ISN *is* the state, and rebuilds the connection from the final
ACK (``client_isn = seg.seq - 1``, ``cookie = seg.ack - 1``).

Layout (after Linux's ``secure_tcp_syn_cookie``; our own code)::

    cookie = H1(4-tuple) + client_isn
             + (count << 24 | mss_index << 21 | H2(4-tuple, client_isn, count, mss_index) mod 2**21)
             (mod 2**32)

``count`` is a coarse clock (one tick per 64 s; 8 bits on the wire, all of it
in H2).  :meth:`SynCookies.check` subtracts H1 and the client ISN, reads
``count`` from the top byte, rejects it if it is more than ``MAX_AGE`` ticks
old (or from the future), and recomputes the 21-bit H2.  Unlike Linux, which
adds the MSS index to H2 (so the holder of a cookie can shift it to another
table entry), the index is covered by the hash: any altered bit fails, and a
blind guess passes with probability about 3 / 2**21.  H1 and H2 are keyed
blake2s, so the cookie is unpredictable without the secret and bound to the
4-tuple and the client's ISN.

What plain cookies lose (RFC 4987 §3.6): only the MSS survives, coarsely
(rounded down to :data:`MSS_TABLE`).  When the peer's SYN carries timestamps
we keep the rest as Linux does (``cookie_init_timestamp``): the low 6 bits of
our SYN-ACK's TSval carry the peer's window scale (4 bits, 0xF for none) and
SACK-permitted (bit 4; bit 5, ECN, is never set), see
:func:`encode_ts_options`.  The final ACK echoes that TSval in TSecr and
:func:`decode_cookie_options` gives the options back as one plain value.
Without timestamps only the MSS survives, as before.
"""

from __future__ import annotations

from _blake2 import blake2s  # hashlib's blake2s, without the OpenSSL hashlib loads (~3 MB a process)
from dataclasses import dataclass

from pipeline.wire.seqnum import MASK

from .isn import MIN_SECRET, pack_tuple

# Peer MSS is rounded down to one of these (the index has three bits on the wire).
# RFC 9293 §3.7.1: 536 is the default MSS; smaller advertisements get 536 too.
MSS_TABLE = (536, 1220, 1440, 1460, 8960)
PERIOD = 64.0  # seconds per time-counter tick
MAX_AGE = 2  # ticks: a cookie is valid for 2-3 periods (~128-192 s)
_MASK21 = (1 << 21) - 1
assert len(MSS_TABLE) <= 8  # three bits on the wire


def mss_index(mss: int) -> int:
    """Index of the largest table entry <= mss (0 if mss is below them all)."""
    idx = 0
    for k, v in enumerate(MSS_TABLE):
        if v <= mss:
            idx = k
    return idx


class SynCookies:
    """Makes and checks SYN-cookie ISNs with one secret (RFC 4987 §3.6)."""

    __slots__ = ("_key",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET:
            raise ValueError("secret must be at least 16 bytes")
        self._key = secret if len(secret) <= 32 else blake2s(secret).digest()

    def _h(self, tag: bytes, data: bytes) -> int:
        h = blake2s(data, key=self._key, digest_size=4, person=tag)
        return int.from_bytes(h.digest(), "big")

    def _h2(self, t: bytes, client_isn: int, count: int, idx: int) -> int:
        data = t + int(client_isn).to_bytes(4, "big") + count.to_bytes(8, "big") + bytes((idx,))
        return self._h(b"cookie2", data) & _MASK21

    @staticmethod
    def _count(now: float) -> int:
        # The full counter goes into H2, so a cookie cannot come back to life
        # when the 8 bits on the wire wrap (every 256 * 64 s).
        return max(0, int(now // PERIOD))

    def make(
        self, local: tuple[bytes, int], remote: tuple[bytes, int], client_isn: int, mss: int, now: float
    ) -> int:
        """Our ISN for the SYN-ACK, encoding the time counter and the rounded-down MSS."""
        t = pack_tuple(local, remote)
        count = self._count(now)
        idx = mss_index(mss)
        low = (count & 0xFF) << 24 | idx << 21 | self._h2(t, client_isn, count, idx)
        return (self._h(b"cookie1", t) + int(client_isn) + low) & MASK  # hash arithmetic, not sequence order

    def check(
        self, local: tuple[bytes, int], remote: tuple[bytes, int], client_isn: int, cookie: int, now: float
    ) -> int | None:
        """The MSS encoded in ``cookie`` if it is authentic and fresh, else None."""
        t = pack_tuple(local, remote)
        h1 = self._h(b"cookie1", t)
        v = (int(cookie) - h1 - int(client_isn)) & MASK  # hash arithmetic, not sequence order
        now_count = self._count(now)
        # RFC 4987 §3.6: the counter bounds how long a cookie stays valid;
        # a counter from the future shows up as a huge age and fails too.
        age = (now_count - (v >> 24)) & 0xFF
        if age > MAX_AGE:
            return None
        count = now_count - age
        idx = (v >> 21) & 0x7
        if idx >= len(MSS_TABLE) or v & _MASK21 != self._h2(t, client_isn, count, idx):
            return None
        return MSS_TABLE[idx]


# --- options in the timestamp (Linux cookie_init_timestamp layout, our own code) ---

_TS_WSCALE_NONE = 0xF


def encode_ts_options(tsval: int, wscale: int | None, sack_ok: bool) -> int:
    """Our SYN-ACK TSval with the peer's window scale and SACK-permitted in its low 5 bits.

    The result is never above ``tsval`` (it only moves back, at most 63
    ticks), so our timestamp clock stays monotonic for the peer (RFC 7323 §5.4).
    """
    if wscale is not None and not 0 <= wscale <= 14:
        raise ValueError("window scale must be 0..14 (RFC 7323 §2.3)")
    opts = (_TS_WSCALE_NONE if wscale is None else wscale) | (0x10 if sack_ok else 0)
    ts = (tsval & ~0x3F & 0xFFFFFFFF) | opts
    if ts > (tsval & 0xFFFFFFFF):
        ts = (ts - 0x40) & 0xFFFFFFFF
    return ts


def decode_ts_options(tsecr: int) -> tuple[int | None, bool] | None:
    """(window scale or None, SACK-permitted) from the final ACK's TSecr; None if invalid."""
    wscale = tsecr & 0xF
    sack_ok = bool(tsecr & 0x10)
    if tsecr & 0x20:
        return None  # bit we never set
    if wscale == _TS_WSCALE_NONE:
        return None, sack_ok
    if wscale > 14:
        return None
    return wscale, sack_ok


@dataclass(frozen=True, slots=True)
class CookieOptions:
    """What a cookie handshake negotiated, rebuilt from the final ACK."""

    mss: int                   # the peer's MSS, rounded down to MSS_TABLE
    window_scale: int | None   # the peer's shift count; None: no window scaling
    sack_permitted: bool
    timestamps: bool           # False: the peer sent none, so nothing but the MSS survived


def decode_cookie_options(ack_timestamp: tuple[int, int] | None, mss: int) -> CookieOptions | None:
    """The options of a cookie connection from the final ACK's timestamp option and the cookie's MSS.

    ``ack_timestamp`` is the ACK's (TSval, TSecr) or None. None back means
    the TSecr cannot be one of our cookie TSvals (a bit we never set): the
    ACK is refused, as Linux's ``cookie_timestamp_decode`` does.
    """
    if ack_timestamp is None:
        return CookieOptions(mss, None, False, False)
    decoded = decode_ts_options(ack_timestamp[1])
    if decoded is None:
        return None
    window_scale, sack_permitted = decoded
    return CookieOptions(mss, window_scale, sack_permitted, True)
