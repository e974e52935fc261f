"""IP reassembly and fragmentation for both families (RFC 791, RFC 8200 §4.5, RFC 5722).

Contract: sans-IO (bytes and ``now`` in, bytes and deadlines out).
``Reassembler(limits)`` takes fragments of packets that already passed the
checked parse (``add_ipv4``, ``add_ipv6``) and returns the whole datagram
once its last missing piece arrives, as a normal packet that shows no trace
of fragmentation: IPv4 with MF and offset cleared, Total Length and the
header checksum rewritten; IPv6 without its Fragment header, with Payload
Length and the Next Header that named the Fragment header rewritten. What
comes after reassembly never needs to know.

Fragments may arrive in any order; exact duplicates are accepted (and
ignored); a fragment that overlaps another discards the whole datagram,
including fragments still to come (RFC 5722, applied to IPv4 too).
``expire(now)`` gives up datagrams whose timer ran out (IPv4 30 s, IPv6
60 s after the first fragment arrived) and says, per datagram, whether an
ICMP Time Exceeded (fragment reassembly) is owed: only when the first
fragment had arrived, which the error quotes (RFC 792, RFC 1122 §3.3.2,
RFC 8200 §4.5). ``next_deadline()`` says when to call it. Every refusal is
counted in ``drops`` by reason; nothing raises on untrusted bytes.

Bounds (``Limits``): bytes held in total (each fragment is charged its bytes
plus a fixed overhead, so a flood of tiny fragments is bounded too),
datagrams in total (the oldest is given up to make room), datagrams per
source (new ones from that source are refused), fragments per datagram (the
datagram is given up), and 65,535 octets per reassembled packet.

``fragment_ipv4`` and ``fragment_ipv6`` cut an outgoing packet for a link
MTU; the caller chooses the IPv6 Identification (no randomness here).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.wire import ipv4, ipv6
from pipeline.wire.ipv4 import Ipv4Packet
from pipeline.wire.checksum import internet_checksum

# IPv4 header fields this module rewrites are named in pipeline.wire.ipv4 (RFC 791 §3.1).
_V4_MIN_MTU = 68  # RFC 791 §3.2: every module forwards a 68-octet datagram
_V4_OPTION_COPIED = 0x80  # RFC 791 §3.1: options with this bit go in every fragment
_V4_OPTION_EOL = 0
_V4_OPTION_NOP = 1
MAX_PACKET = 0xFFFF

# Makes the reassembled packet's header from the first fragment, with room for the data; None if too big.
_Build = Callable[[bytes, int], "bytearray | None"]

FRAGMENT_OVERHEAD = 128  # bytes charged per held fragment on top of its data (Python objects)


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int = 4 * 1024 * 1024
    max_datagrams: int = 1024
    max_datagrams_per_source: int = 64
    max_fragments_per_datagram: int = 64
    timeout_ipv4: float = 30.0  # RFC 791 suggests 15 s as a lower bound; Linux uses 30
    timeout_ipv6: float = 60.0  # RFC 8200 §4.5


@dataclass(frozen=True, slots=True)
class Expired:
    """A datagram whose reassembly timer ran out."""

    family: int  # 4 or 6
    src: bytes
    dst: bytes
    first_fragment: bytes | None  # the fragment with offset 0 if it arrived: the error quotes it

    @property
    def icmp_owed(self) -> bool:
        """Time Exceeded code 1 is owed only if the first fragment arrived (RFC 1122 §3.3.2, RFC 8200 §4.5)."""
        return self.first_fragment is not None


class _Datagram:
    """One datagram being reassembled; ``pieces`` are (start, stop, data), sorted, never overlapping."""

    __slots__ = ("key", "family", "src", "dst", "source", "created", "deadline", "pieces", "received", "end",
                 "first", "build", "held", "dead")

    def __init__(self, key: tuple, family: int, src: bytes, dst: bytes, now: float, deadline: float) -> None:
        self.key = key
        self.family = family
        self.src = src
        self.dst = dst
        self.source = (family, src)
        self.created = now
        self.deadline = deadline
        self.pieces: list[tuple[int, int, bytes]] = []
        self.received = 0  # data bytes held; equals end exactly when complete (no overlaps)
        self.end: int | None = None  # length of the reassembled data, known from the last fragment
        self.first: bytes | None = None  # the whole offset-0 fragment
        self.build: _Build | None = None  # the first fragment's
        self.held = 0  # bytes charged against Limits.max_bytes
        self.dead = False  # discarded (RFC 5722): later fragments are dropped until the deadline


class Reassembler:
    """Reassembly state for every datagram in progress, within Limits."""

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self.drops: Counter[str] = Counter()
        self.duplicates = 0
        # Per family, in order of creation, which is also deadline order (one timeout per family).
        self._queues: dict[int, dict[tuple, _Datagram]] = {4: {}, 6: {}}
        self._per_source: Counter[tuple[int, bytes]] = Counter()
        self._held = 0

    @property
    def bytes_held(self) -> int:
        return self._held

    @property
    def datagrams(self) -> int:
        return len(self._queues[4]) + len(self._queues[6])

    def add_ipv4(self, packet: bytes | memoryview, now: float) -> bytes | None:
        """One checked IPv4 fragment (cut to Total Length); the whole datagram when complete (RFC 791 §3.2)."""
        ip = Ipv4Packet.trusted(packet)
        more = ip.more_fragments
        start = ip.fragment_offset
        if not more and start == 0:
            raise ValueError("not a fragment")
        src, dst = ip.src, ip.dst
        # RFC 791 §3.2: a datagram is named by source, destination, protocol and identification.
        key = (4, src, dst, ip.protocol, ip.ident)
        data = ip.payload
        # Even with the smallest header the datagram could not exceed 65,535 octets.
        if start + len(data) + ipv4.HEADER_LEN > MAX_PACKET:
            self.drops["oversize"] += 1
            return None
        return self._add(key, 4, src, dst, start, more, data, packet, _build_ipv4, now)

    def add_ipv6(self, packet: bytes | memoryview, parsed: ipv6.Ipv6Packet, now: float) -> bytes | None:
        """One IPv6 fragment as ipv6.parse returned it (no error); the whole packet when complete."""
        frag = parsed.fragment
        if frag is None or parsed.error is not None:
            raise ValueError("not an acceptable fragment")
        src, dst = parsed.header.src, parsed.header.dst
        data = packet[parsed.payload_offset:parsed.payload_end]
        # RFC 8200 §4.5: source, destination and Fragment Identification name the packet.
        key = (6, src, dst, frag.ident)
        if frag.offset + len(data) > ipv6.MAX_PAYLOAD_LEN:
            self.drops["oversize"] += 1
            return None
        first = packet[:parsed.payload_end]

        def build(first_packet: bytes, data_len: int) -> bytearray | None:
            return _build_ipv6(first_packet, frag, data_len)

        # Each fragment brings its own view of where its Fragment header is; only the first's is used.
        return self._add(key, 6, src, dst, frag.offset, frag.more, data, first, build, now)

    def _add(self, key: tuple, family: int, src: bytes, dst: bytes, start: int, more: bool,
             data: bytes | memoryview, packet: bytes | memoryview, build: _Build, now: float) -> bytes | None:
        length = len(data)
        stop = start + length
        if start == 0 and not more:
            # RFC 6946 §4: an atomic fragment is processed in isolation.
            return self._assemble(build, bytes(packet), [(0, length, bytes(data))], length)
        if length == 0:
            self.drops["empty_fragment"] += 1
            return None
        # RFC 791 §3.2, RFC 8200 §4.5: every fragment but the last holds a multiple of 8 octets.
        if more and length % 8:
            self.drops["odd_length"] += 1
            return None
        queue = self._queues[family]
        dg = queue.get(key)
        if dg is None:
            dg = self._new(key, family, src, dst, now)
            if dg is None:
                return None
        if dg.dead:
            self.drops["discarded_datagram"] += 1
            return None
        # Where the piece goes, and whether it touches its neighbours.
        pieces = dg.pieces
        i = bisect.bisect_left(pieces, (start, stop))
        if i < len(pieces) and pieces[i][0] == start and pieces[i][1] == stop:
            self.duplicates += 1  # an exact duplicate: accepted, nothing new
            return None
        # RFC 5722 §4: any overlap discards the datagram and all its fragments.
        if (i > 0 and pieces[i - 1][1] > start) or (i < len(pieces) and pieces[i][0] < stop):
            self._kill(dg, "overlap")
            return None
        if len(pieces) >= self.limits.max_fragments_per_datagram:
            self._kill(dg, "too_many_fragments")
            return None
        # The last fragment fixes the length; nothing may disagree with it.
        if not more:
            if (dg.end is not None and dg.end != stop) or (pieces and pieces[-1][1] > stop):
                self._kill(dg, "inconsistent_length")
                return None
            dg.end = stop
        elif dg.end is not None and stop >= dg.end:
            self._kill(dg, "inconsistent_length")
            return None
        piece = bytes(data)
        pieces.insert(i, (start, stop, piece))
        dg.received += length
        charge = length + FRAGMENT_OVERHEAD
        if start == 0:
            dg.first = bytes(packet)
            dg.build = build
            charge += len(dg.first)
        dg.held += charge
        self._held += charge
        self._enforce_byte_limit()
        if key not in queue:
            return None  # given up to make room
        if dg.first is None or dg.end is None or dg.received != dg.end:
            return None
        self._remove(dg)
        assert dg.build is not None  # set with dg.first, from the same fragment
        return self._assemble(dg.build, dg.first, pieces, dg.end)

    def _assemble(self, build: _Build, first: bytes, pieces: list[tuple[int, int, bytes]], end: int) -> bytes | None:
        """The reassembled packet: the header build() makes from the first fragment, then the pieces."""
        whole = build(first, end)
        if whole is None:
            self.drops["oversize"] += 1
            return None
        data_off = len(whole) - end
        for piece_start, piece_stop, piece_data in pieces:
            whole[data_off + piece_start:data_off + piece_stop] = piece_data
        return bytes(whole)

    def _new(self, key: tuple, family: int, src: bytes, dst: bytes, now: float) -> _Datagram | None:
        limits = self.limits
        source = (family, src)
        if self._per_source[source] >= limits.max_datagrams_per_source:
            self.drops["source_limit"] += 1
            return None
        while self.datagrams >= limits.max_datagrams and self._evict_oldest():
            pass
        timeout = limits.timeout_ipv4 if family == 4 else limits.timeout_ipv6
        dg = _Datagram(key, family, src, dst, now, now + timeout)
        self._queues[family][key] = dg
        self._per_source[source] += 1
        return dg

    def _release(self, dg: _Datagram) -> None:
        """Free what dg holds (it stays in its queue)."""
        self._held -= dg.held
        dg.held = 0
        dg.pieces = []
        dg.first = None
        dg.build = None

    def _remove(self, dg: _Datagram) -> None:
        self._held -= dg.held
        dg.held = 0
        del self._queues[dg.family][dg.key]
        self._per_source[dg.source] -= 1
        if not self._per_source[dg.source]:
            del self._per_source[dg.source]

    def _kill(self, dg: _Datagram, reason: str) -> None:
        """Discard dg and, until its deadline, every fragment of it that still comes (RFC 5722 §4)."""
        self.drops[reason] += 1
        self._release(dg)
        dg.dead = True

    def _oldest(self) -> _Datagram | None:
        heads = [next(iter(q.values())) for q in self._queues.values() if q]
        return min(heads, key=lambda d: d.created) if heads else None

    def _evict_oldest(self) -> bool:
        dg = self._oldest()
        if dg is None:
            return False
        self.drops["evicted"] += 1
        self._remove(dg)
        return True

    def _enforce_byte_limit(self) -> None:
        while self._held > self.limits.max_bytes and self._evict_oldest():
            pass

    def expire(self, now: float) -> list[Expired]:
        """Give up datagrams whose timer ran out; those with a first fragment are owed an ICMP error."""
        expired: list[Expired] = []
        for queue in self._queues.values():
            while queue:
                dg = next(iter(queue.values()))
                if dg.deadline > now:
                    break
                self._remove(dg)
                if dg.dead:
                    continue  # RFC 5722: discarded silently
                self.drops["timeout"] += 1
                expired.append(Expired(dg.family, dg.src, dg.dst, dg.first))
        return expired

    def next_deadline(self) -> float | None:
        deadlines = [next(iter(q.values())).deadline for q in self._queues.values() if q]
        return min(deadlines) if deadlines else None


def _build_ipv4(first: bytes, data_len: int) -> bytearray | None:
    """The first fragment's header for the whole datagram (RFC 791 §3.2 reassembly), data not yet filled."""
    header_len = ipv4.header_len_of(first)
    total = header_len + data_len
    if total > MAX_PACKET:
        return None
    header = bytearray(first[:header_len])
    flags = (header[ipv4.FLAGS_FRAG_OFFSET] << 8 | header[ipv4.FLAGS_FRAG_OFFSET + 1]) & ipv4.FLAG_DF
    _set_ipv4_fields(header, total, flags)
    return header + bytes(data_len)


def _set_ipv4_fields(header: bytearray, total: int, flags_offset: int) -> None:
    """Write Total Length and flags/offset, then the header checksum (RFC 791 §3.1)."""
    header[ipv4.TOTAL_LEN_OFFSET:ipv4.TOTAL_LEN_OFFSET + 2] = total.to_bytes(2, "big")
    header[ipv4.FLAGS_FRAG_OFFSET:ipv4.FLAGS_FRAG_OFFSET + 2] = flags_offset.to_bytes(2, "big")
    header[ipv4.CHECKSUM_OFFSET:ipv4.CHECKSUM_OFFSET + 2] = b"\x00\x00"
    header[ipv4.CHECKSUM_OFFSET:ipv4.CHECKSUM_OFFSET + 2] = internet_checksum(header).to_bytes(2, "big")


def _build_ipv6(first: bytes, frag: ipv6.Fragment, data_len: int) -> bytearray | None:
    """The first fragment's unfragmentable part without the Fragment header (RFC 8200 §4.5 reassembly)."""
    unfragmentable = bytearray(first[:frag.header_offset])
    payload_len = len(unfragmentable) - ipv6.HEADER_LEN + data_len
    if payload_len > ipv6.MAX_PAYLOAD_LEN:
        return None
    # "The Next Header field of the last header of the Per-Fragment headers is
    # obtained from the Next Header field of the first fragment's Fragment header."
    unfragmentable[frag.next_header_at] = frag.next_header
    unfragmentable[ipv6.PAYLOAD_LEN_OFFSET:ipv6.PAYLOAD_LEN_OFFSET + 2] = payload_len.to_bytes(2, "big")
    return unfragmentable + bytes(data_len)


def _copied_ipv4_options(options: bytes) -> bytes:
    """The options that go in every fragment (copied flag set, RFC 791 §3.1), padded to 32 bits."""
    kept = bytearray()
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == _V4_OPTION_EOL:
            break
        if kind == _V4_OPTION_NOP:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2:
            raise ValueError("malformed IPv4 options")
        length = options[i + 1]
        if kind & _V4_OPTION_COPIED:
            kept += options[i:i + length]
        i += length
    return bytes(kept) + bytes(-len(kept) % 4)


def fragment_ipv4(packet: bytes, mtu: int) -> list[bytes]:
    """Cut an IPv4 packet into fragments of at most mtu octets (RFC 791 §3.2); refuses if DF is set."""
    if len(packet) <= mtu:
        return [bytes(packet)]
    field = (packet[ipv4.FLAGS_FRAG_OFFSET] << 8) | packet[ipv4.FLAGS_FRAG_OFFSET + 1]
    if field & ipv4.FLAG_DF:
        raise ValueError("Don't Fragment is set")
    if mtu < _V4_MIN_MTU:
        raise ValueError(f"MTU {mtu} below the IPv4 minimum of 68")
    header_len = ipv4.header_len_of(packet)
    first_header = packet[:header_len]
    later_header = first_header[:ipv4.HEADER_LEN] + _copied_ipv4_options(first_header[ipv4.HEADER_LEN:])
    later_header = bytes([0x40 | len(later_header) // 4]) + later_header[1:]
    # A packet that is itself a fragment keeps its place and its MF on the last piece.
    base = (field & ipv4.FRAG_OFFSET_MASK) * 8
    last_more = field & ipv4.FLAG_MF
    data = packet[header_len:]
    fragments = []
    pos = 0
    header = first_header
    while pos < len(data):
        size = (mtu - len(header)) // 8 * 8
        piece = data[pos:pos + size]
        more = ipv4.FLAG_MF if pos + len(piece) < len(data) else last_more
        out = bytearray(header)
        _set_ipv4_fields(out, len(header) + len(piece), more | (base + pos) // 8)
        fragments.append(bytes(out) + piece)
        pos += len(piece)
        header = later_header
    return fragments


def fragment_ipv6(packet: bytes, mtu: int, ident: int) -> list[bytes]:
    """Cut an IPv6 packet into fragments of at most mtu octets with Fragment headers (RFC 8200 §4.5).

    The unfragmentable part (the IPv6 header and any Hop-by-Hop, Routing, and
    Destination Options before a Routing header) leads every fragment.
    Callers pass the link MTU, at least 1280 (RFC 8200 §5).
    """
    if len(packet) <= mtu:
        return [bytes(packet)]
    next_header, next_header_at, off = packet[ipv6.NEXT_HEADER_OFFSET], ipv6.NEXT_HEADER_OFFSET, ipv6.HEADER_LEN
    unfragmentable_end, last_next_header_at = off, next_header_at
    while next_header in (ipv6.HOP_BY_HOP, ipv6.DEST_OPTIONS, ipv6.ROUTING):
        length = (packet[off + ipv6.EXT_LEN_OFFSET] + 1) * 8
        if next_header != ipv6.DEST_OPTIONS:
            unfragmentable_end, last_next_header_at = off + length, off
        next_header, off = packet[off], off + length
    if next_header == ipv6.FRAGMENT:
        raise ValueError("packet is already a fragment")
    first_fragmentable = packet[last_next_header_at]
    size = (mtu - unfragmentable_end - ipv6.FRAGMENT_HEADER_LEN) // 8 * 8
    if size < 8:
        raise ValueError(f"MTU {mtu} leaves no room for fragment data")
    unfragmentable = bytearray(packet[:unfragmentable_end])
    unfragmentable[last_next_header_at] = ipv6.FRAGMENT
    fragmentable = packet[unfragmentable_end:]
    fragments = []
    for pos in range(0, len(fragmentable), size):
        piece = fragmentable[pos:pos + size]
        out = bytearray(unfragmentable_end + ipv6.FRAGMENT_HEADER_LEN + len(piece))
        out[:unfragmentable_end] = unfragmentable
        payload_len = len(out) - ipv6.HEADER_LEN
        out[ipv6.PAYLOAD_LEN_OFFSET:ipv6.PAYLOAD_LEN_OFFSET + 2] = payload_len.to_bytes(2, "big")
        more = pos + size < len(fragmentable)
        ipv6.emit_fragment_header(memoryview(out)[unfragmentable_end:], first_fragmentable, pos, more, ident)
        out[unfragmentable_end + ipv6.FRAGMENT_HEADER_LEN:] = piece
        fragments.append(bytes(out))
    return fragments
