"""IPv6 headers (RFC 8200 §3) and the extension-header walk (RFC 8200 §4).

Contract: ``Ipv6View.checked(buf)`` verifies the fixed header once (length,
version, Payload Length within the buffer); its accessors then cannot fail.
``parse(buf)`` is the one checked parse of ingress: it walks the extension
headers and returns an ``Ipv6Packet`` saying which upper-layer protocol
follows, where its bytes start and end, the Fragment header if there is one,
and, when RFC 8200 says the packet is to be answered with an ICMPv6
Parameter Problem, a ``ParamProblem`` (code and pointer) for the caller to
turn into a message; ``pipeline.wire.icmpv6.error_allowed`` still decides
whether one may be sent at all (RFC 4443 §2.4 (e)). A packet whose result
carries an error must be discarded. Bytes that are to be dropped without an
answer raise ``Malformed(reason)``. ``Ipv6Header`` is the parsed value;
``emit`` writes the 40-byte header into a caller's buffer.

The walk stops at a Fragment header: the headers after it belong to the
reassembled packet (RFC 8200 §4.5), which the caller parses again. The
field offsets are named once, here, and are public: code that reads raw
IPv6 header bytes elsewhere (fragmentation, pcap filters, the kernel SYN
filter, ICMPv6 quotes) uses these names.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from pipeline.wire import Malformed, udp
from pipeline.wire.checksum import pseudo_header_sum6, verify

# Next Header values (IANA "Assigned Internet Protocol Numbers"; RFC 8200 §4).
HOP_BY_HOP: Final = 0
TCP: Final = 6
UDP: Final = 17
ROUTING: Final = 43
FRAGMENT: Final = 44
ICMPV6: Final = 58
NO_NEXT_HEADER: Final = 59
DEST_OPTIONS: Final = 60
UPPER_LAYERS = frozenset({TCP, UDP, ICMPV6})

# RFC 8200 §3: version(4) traffic class(8) flow label(20), payload length,
# next header, hop limit, source, destination.
_FIXED = struct.Struct("!IHBB16s16s")
# Field offsets (RFC 8200 §3), named once: every other module reads an IPv6 header through these.
# Final: mypyc inlines them as constants.
HEADER_LEN: Final = 40
PAYLOAD_LEN_OFFSET: Final = 4
NEXT_HEADER_OFFSET: Final = 6
HOP_LIMIT_OFFSET: Final = 7
SRC_OFFSET: Final = 8
DST_OFFSET: Final = 24
ADDRESS_LEN: Final = 16
MAX_PAYLOAD_LEN = 0xFFFF
MIN_MTU = 1280  # RFC 8200 §5: every link carries 1280-octet packets

# Extension headers (RFC 8200 §4.3-4.6): next header, length in 8-octet units
# not counting the first 8; the routing header adds routing type and segments left.
EXT_LEN_OFFSET: Final = 1
_ROUTING_TYPE_OFFSET = 2
_SEGMENTS_LEFT_OFFSET = 3
# RFC 8200 §4.5 Fragment header: next header, reserved, offset(13) res(2) M(1), identification.
_FRAG = struct.Struct("!BBHI")
FRAGMENT_HEADER_LEN = 8
_FRAG_OFFSET_FIELD = 2
_FRAG_OFFSET_MASK = 0xFFF8  # the 13-bit offset in 8-octet units, already multiplied by 8
_FRAG_MORE = 0x0001

# Options (RFC 8200 §4.2): type, data length, data; the type's two high bits
# say what a node that does not recognise the option must do.
PAD1 = 0
PADN = 1
_ACTION_SKIP = 0
_ACTION_DISCARD = 1
_ACTION_DISCARD_ICMP = 2
_ACTION_DISCARD_ICMP_UNLESS_MULTICAST = 3

# ICMPv6 Parameter Problem codes (RFC 4443 §3.4, RFC 7112 §5).
ERRONEOUS_HEADER = 0
UNRECOGNIZED_NEXT_HEADER = 1
UNRECOGNIZED_OPTION = 2
INCOMPLETE_HEADER_CHAIN = 3

# Bytes of the upper-layer header a first fragment must hold (RFC 7112 §5;
# the sizes Linux checks): TCP header, UDP header, ICMPv6 header.
_UPPER_HEADER_LEN = {TCP: 20, UDP: 8, ICMPV6: 8, NO_NEXT_HEADER: 0}


def is_multicast(addr: bytes) -> bool:
    """ff00::/8 (RFC 4291 §2.7)."""
    return addr[0] == 0xFF


class Ipv6View:
    """The fixed header of a checked packet; ``buf`` is cut to 40 + Payload Length."""

    __slots__ = ("buf",)

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf  # unchecked: use Ipv6View.checked

    @classmethod
    def checked(cls, packet: bytes | bytearray | memoryview) -> Ipv6View:
        n = len(packet)
        if n < HEADER_LEN:
            raise Malformed("truncated")
        buf = packet if isinstance(packet, memoryview) else memoryview(packet)
        if buf[0] >> 4 != 6:
            raise Malformed("bad_version")
        end = HEADER_LEN + ((buf[PAYLOAD_LEN_OFFSET] << 8) | buf[PAYLOAD_LEN_OFFSET + 1])
        # Bytes past Payload Length (link padding) are ignored.
        if end > n:
            raise Malformed("bad_payload_length")
        return cls(buf[:end])

    @property
    def traffic_class(self) -> int:
        return ((self.buf[0] & 0x0F) << 4) | (self.buf[1] >> 4)

    @property
    def flow_label(self) -> int:
        return ((self.buf[1] & 0x0F) << 16) | (self.buf[2] << 8) | self.buf[3]

    @property
    def payload_len(self) -> int:
        return len(self.buf) - HEADER_LEN

    @property
    def next_header(self) -> int:
        return self.buf[NEXT_HEADER_OFFSET]

    @property
    def hop_limit(self) -> int:
        return self.buf[HOP_LIMIT_OFFSET]

    @property
    def src(self) -> bytes:
        return bytes(self.buf[SRC_OFFSET:DST_OFFSET])

    @property
    def dst(self) -> bytes:
        return bytes(self.buf[DST_OFFSET:HEADER_LEN])

    @property
    def payload(self) -> memoryview:
        return self.buf[HEADER_LEN:]


@dataclass(frozen=True, slots=True)
class Ipv6Header:
    src: bytes
    dst: bytes
    next_header: int
    hop_limit: int = 64
    traffic_class: int = 0  # DSCP << 2 | ECN (RFC 8200 §7, RFC 3168 §5)
    flow_label: int = 0

    @property
    def ecn(self) -> int:
        return self.traffic_class & 0x03

    @classmethod
    def from_view(cls, view: Ipv6View) -> Ipv6Header:
        return cls(view.src, view.dst, view.next_header, view.hop_limit, view.traffic_class, view.flow_label)

    def buffer_len(self) -> int:
        return HEADER_LEN

    def emit(self, buf: bytearray | memoryview, payload_len: int) -> None:
        """Write the 40-byte header for payload_len bytes (extension headers included) into buf."""
        if not 0 <= payload_len <= MAX_PAYLOAD_LEN:
            raise ValueError(f"IPv6 payload length {payload_len} outside 0..65535")
        if not (0 <= self.traffic_class <= 0xFF and 0 <= self.flow_label <= 0xFFFFF):
            raise ValueError("traffic class or flow label out of range")
        if len(self.src) != 16 or len(self.dst) != 16:
            raise ValueError("IPv6 addresses are 16 bytes")  # struct would pad or cut them silently
        first = (6 << 28) | (self.traffic_class << 20) | self.flow_label
        _FIXED.pack_into(buf, 0, first, payload_len, self.next_header, self.hop_limit, self.src, self.dst)

    def to_bytes(self, payload_len: int) -> bytes:
        buf = bytearray(HEADER_LEN)
        self.emit(buf, payload_len)
        return bytes(buf)


def emit_fragment_header(buf: bytearray | memoryview, next_header: int, offset: int, more: bool, ident: int) -> None:
    """Write an 8-byte Fragment header (RFC 8200 §4.5); offset in bytes, a multiple of 8."""
    if offset & ~_FRAG_OFFSET_MASK:
        raise ValueError(f"fragment offset {offset} is not a multiple of 8 below 65536")
    _FRAG.pack_into(buf, 0, next_header, 0, offset | (_FRAG_MORE if more else 0), ident)


@dataclass(frozen=True, slots=True)
class Fragment:
    """A Fragment header as parsed (RFC 8200 §4.5)."""

    ident: int
    offset: int  # bytes of the fragmentable part that precede this fragment's data
    more: bool  # the M flag: more fragments follow
    next_header: int  # first header of the fragmentable part
    header_offset: int  # where the Fragment header starts in the packet
    next_header_at: int  # offset of the Next Header field that names the Fragment header


@dataclass(frozen=True, slots=True)
class ParamProblem:
    """The ICMPv6 Parameter Problem RFC 8200 asks for (RFC 4443 §3.4); the packet is discarded."""

    code: int
    pointer: int  # offset of the offending octet in the packet
    reason: str  # counter name for the drop


@dataclass(frozen=True, slots=True)
class Ipv6Packet:
    header: Ipv6Header
    protocol: int  # upper layer; for a fragment its first fragmentable header; on error where the walk stopped
    payload_offset: int
    payload_end: int  # 40 + Payload Length
    fragment: Fragment | None = None
    error: ParamProblem | None = None


def _ext_len(buf: memoryview, off: int, end: int) -> int:
    """Length of the Hop-by-Hop, Destination Options or Routing header at off (RFC 8200 §4.3-4.6)."""
    if off + 2 > end:
        raise Malformed("truncated")
    length = (buf[off + EXT_LEN_OFFSET] + 1) * 8
    if off + length > end:
        raise Malformed("truncated")
    return length


def _options(buf: memoryview, off: int, end: int, dst_multicast: bool) -> ParamProblem | None:
    """Walk the TLV options in buf[off:end] (RFC 8200 §4.2); we recognise only Pad1 and PadN."""
    while off < end:
        opt_type = buf[off]
        if opt_type == PAD1:
            off += 1
            continue
        if off + 2 > end:
            raise Malformed("bad_option")
        opt_end = off + 2 + buf[off + 1]
        if opt_end > end:
            raise Malformed("bad_option")
        if opt_type != PADN:
            # RFC 8200 §4.2: the two high-order bits of an unrecognised type choose the action.
            action = opt_type >> 6
            if action == _ACTION_DISCARD or (action == _ACTION_DISCARD_ICMP_UNLESS_MULTICAST and dst_multicast):
                raise Malformed("unrecognized_option")
            if action != _ACTION_SKIP:
                return ParamProblem(UNRECOGNIZED_OPTION, off, "unrecognized_option")
        off = opt_end
    return None


def skip_extension_headers(buf: memoryview, next_header: int, off: int, end: int) -> tuple[int, int] | None:
    """The first header after any Hop-by-Hop, Destination Options, Routing and first-fragment headers.

    Lenient (no option or routing rules): for looking into packets already
    accepted or quoted. Returns (next header, offset), or None when the chain
    runs past end. A non-first fragment stops the walk at its Fragment header.
    """
    while True:
        if next_header in (HOP_BY_HOP, DEST_OPTIONS, ROUTING):
            if off + 2 > end:
                return None
            length = (buf[off + EXT_LEN_OFFSET] + 1) * 8
        elif next_header == FRAGMENT:
            if off + FRAGMENT_HEADER_LEN > end:
                return None
            fragment_field = (buf[off + _FRAG_OFFSET_FIELD] << 8) | buf[off + _FRAG_OFFSET_FIELD + 1]
            if fragment_field & _FRAG_OFFSET_MASK:
                return next_header, off
            length = FRAGMENT_HEADER_LEN
        else:
            return next_header, off
        next_header = buf[off]
        off += length


def _header_chain_complete(buf: memoryview, next_header: int, off: int, end: int) -> bool:
    """RFC 7112 §5: the first fragment holds every header up to and including the upper-layer header."""
    found = skip_extension_headers(buf, next_header, off, end)
    if found is None:
        return False
    upper, upper_off = found
    return upper_off + _UPPER_HEADER_LEN.get(upper, 1) <= end


def parse(packet: bytes | bytearray | memoryview, upper_layers: frozenset[int] = UPPER_LAYERS) -> Ipv6Packet:
    """Check one IPv6 packet and walk its extension headers (RFC 8200 §4.1 order rules)."""
    view = Ipv6View.checked(packet)
    buf = view.buf
    header = Ipv6Header.from_view(view)
    # RFC 4291 §2.7: multicast addresses must not be used as source addresses.
    if is_multicast(header.src):
        raise Malformed("multicast_source")
    dst_multicast = is_multicast(header.dst)
    end = len(buf)
    next_header = header.next_header
    next_header_at = NEXT_HEADER_OFFSET
    off = HEADER_LEN

    def problem(code: int, pointer: int, reason: str) -> Ipv6Packet:
        return Ipv6Packet(header, next_header, off, end, None, ParamProblem(code, pointer, reason))

    while True:
        if next_header in upper_layers or next_header == NO_NEXT_HEADER:
            return Ipv6Packet(header, next_header, off, end)
        if next_header == HOP_BY_HOP:
            # RFC 8200 §4.1: Hop-by-Hop only immediately after the IPv6 header;
            # elsewhere it is treated like an unrecognised Next Header (as Linux does).
            if off != HEADER_LEN:
                return problem(UNRECOGNIZED_NEXT_HEADER, next_header_at, "hop_by_hop_not_first")
            length = _ext_len(buf, off, end)
            error = _options(buf, off + 2, off + length, dst_multicast)
            if error is not None:
                return problem(error.code, error.pointer, error.reason)
        elif next_header == DEST_OPTIONS:
            length = _ext_len(buf, off, end)
            error = _options(buf, off + 2, off + length, dst_multicast)
            if error is not None:
                return problem(error.code, error.pointer, error.reason)
        elif next_header == ROUTING:
            length = _ext_len(buf, off, end)
            # RFC 8200 §4.4: Segments Left 0 -> ignore the header; otherwise, for a
            # Routing Type we do not recognise (we are a host and recognise none),
            # Parameter Problem code 0 pointing at the Routing Type.
            if buf[off + _SEGMENTS_LEFT_OFFSET]:
                return problem(ERRONEOUS_HEADER, off + _ROUTING_TYPE_OFFSET, "routing_segments_left")
        elif next_header == FRAGMENT:
            return _fragment(buf, header, off, end, next_header_at)
        else:
            # RFC 8200 §4 / RFC 4443 §3.4: code 1, pointer at the unrecognised value.
            return problem(UNRECOGNIZED_NEXT_HEADER, next_header_at, "unknown_next_header")
        next_header_at = off
        next_header = buf[off]
        off += length


def _fragment(buf: memoryview, header: Ipv6Header, off: int, end: int, next_header_at: int) -> Ipv6Packet:
    """The Fragment header at off: per-fragment checks of RFC 8200 §4.5; the walk ends here."""
    if off + FRAGMENT_HEADER_LEN > end:
        raise Malformed("truncated")
    next_header, _reserved, field, ident = _FRAG.unpack_from(buf, off)
    data_off = off + FRAGMENT_HEADER_LEN
    data_len = end - data_off
    offset = field & _FRAG_OFFSET_MASK
    more = bool(field & _FRAG_MORE)

    def problem(code: int, pointer: int, reason: str) -> Ipv6Packet:
        return Ipv6Packet(header, FRAGMENT, off, end, None, ParamProblem(code, pointer, reason))

    # RFC 8200 §4.5: a fragment that is not the last must hold a multiple of 8
    # octets: Parameter Problem code 0 pointing at the Payload Length.
    if more and data_len % 8:
        return problem(ERRONEOUS_HEADER, PAYLOAD_LEN_OFFSET, "fragment_not_multiple_of_8")
    # RFC 8200 §4.5: the Payload Length of the packet reassembled from this
    # fragment (its unfragmentable extension headers, then the data up to this
    # fragment's end) would exceed 65,535: code 0 pointing at the Fragment Offset.
    if off - HEADER_LEN + offset + data_len > MAX_PAYLOAD_LEN:
        return problem(ERRONEOUS_HEADER, off + _FRAG_OFFSET_FIELD, "fragment_too_far")
    # RFC 8200 §4.5 / RFC 7112 §5: the first fragment carries the whole header chain.
    if offset == 0 and not _header_chain_complete(buf, next_header, data_off, end):
        return problem(INCOMPLETE_HEADER_CHAIN, 0, "incomplete_header_chain")
    fragment = Fragment(ident, offset, more, next_header, off, next_header_at)
    return Ipv6Packet(header, next_header, data_off, end, fragment)


def upper_layer_checksum_ok(src: bytes, dst: bytes, protocol: int, data: bytes | memoryview) -> bool:
    """Verify a UDP, TCP or ICMPv6 checksum over the IPv6 pseudo header (RFC 8200 §8.1).

    data is the upper-layer packet; for UDP cut it to the UDP Length first
    (that length goes in the pseudo header). Unlike IPv4, a zero UDP checksum
    means no valid checksum and the datagram is dropped (RFC 8200 §8.1).
    """
    if protocol == UDP and len(data) >= udp.HEADER_LEN and data[udp.CHECKSUM_OFFSET] == 0 \
            and data[udp.CHECKSUM_OFFSET + 1] == 0:
        return False
    return verify(data, pseudo_header_sum6(src, dst, protocol, len(data)))


class Ipv6Datagram(Ipv6View):
    """A whole IPv6 packet ingress already accepted, read as a worker reads an ``Ipv4Packet``.

    ``trusted`` re-verifies nothing: it finds the upper-layer header after
    any extension headers (the lenient walk) so ``protocol`` and ``payload``
    mean what they mean for IPv4, and ``tos``/``ttl`` name the traffic class
    and hop limit so cores read both families through the same accessors.
    """

    __slots__ = ("protocol", "header_len")

    def __init__(self, buf: memoryview, protocol: int, header_len: int) -> None:
        super().__init__(buf)
        self.protocol = protocol
        self.header_len = header_len  # the IPv6 header and every extension header before the upper layer

    @classmethod
    def trusted(cls, packet: bytes | bytearray | memoryview) -> Ipv6Datagram:
        buf = packet if isinstance(packet, memoryview) else memoryview(packet)
        end = HEADER_LEN + ((buf[PAYLOAD_LEN_OFFSET] << 8) | buf[PAYLOAD_LEN_OFFSET + 1])
        buf = buf[:end]
        found = skip_extension_headers(buf, buf[NEXT_HEADER_OFFSET], HEADER_LEN, end)
        protocol, off = found if found is not None else (NO_NEXT_HEADER, end)
        return cls(buf, protocol, off)

    # Properties, not aliases of Ipv6View's (tos = Ipv6View.traffic_class): compiled by mypyc,
    # such an alias is a plain class attribute holding the descriptor.
    @property
    def tos(self) -> int:
        return self.traffic_class

    @property
    def ttl(self) -> int:
        return self.hop_limit

    @property
    def dont_fragment(self) -> bool:
        return False  # RFC 8200 §4.5: any IPv6 source may fragment what it sends

    @property
    def payload(self) -> memoryview:
        """The upper-layer bytes (after every extension header)."""
        return self.buf[self.header_len:]
