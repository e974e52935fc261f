"""IPv4 headers (RFC 791 §3.1): a checked view over the bytes, and a value to emit.

``Ipv4Packet.checked`` checks a packet once (version, IHL, Total Length,
header checksum, fragments) and raises only ``Malformed(reason)``; after it
every accessor is infallible and reads the buffer in place (a memoryview,
no copy). ``Ipv4Packet.trusted`` wraps bytes that ingress already checked,
reading only IHL and Total Length: workers use it and re-verify nothing.
Fragments raise ``Malformed("fragment")`` unless the caller takes them
(``fragments=True``: ingress hands them to ``pipeline.fragments``). Options
are skipped (``header_len`` says how many bytes). ``Ipv4Header`` is the
value form; ``emit_into`` writes a plain 20-byte header into a caller's
buffer, ``emit`` returns one. The accessors a worker needs (``src``,
``dst``, ``protocol``, ``payload``) are named so an IPv6 view can offer the
same ones. The field offsets and flag bits are named once, here, and are
public: code that reads raw IPv4 header bytes elsewhere (reassembly, pcap
filters, the kernel SYN filter, ICMP quotes) uses these names.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from pipeline.wire import Malformed, as_view
from pipeline.wire.checksum import internet_checksum, verify

PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17

# RFC 791 §3.1: version/IHL, TOS, total length, identification,
# flags/fragment offset, TTL, protocol, header checksum, source, destination.
_HEADER = struct.Struct("!BBHHHBBH4s4s")
HEADER_LEN: Final = 20
MAX_TOTAL_LEN = 0xFFFF

# Field offsets (RFC 791 §3.1), named once: every other module reads an IPv4 header through
# these (or the view below). Final: mypyc inlines them as constants.
VER_IHL_OFFSET: Final = 0
TOS_OFFSET: Final = 1
TOTAL_LEN_OFFSET: Final = 2
IDENT_OFFSET: Final = 4
FLAGS_FRAG_OFFSET: Final = 6  # flags (3 bits) and fragment offset (13 bits, in 8-octet units)
TTL_OFFSET: Final = 8
PROTOCOL_OFFSET: Final = 9
CHECKSUM_OFFSET: Final = 10
SRC_OFFSET: Final = 12
DST_OFFSET: Final = 16
ADDRESS_LEN: Final = 4
_U16 = struct.Struct("!H")
# What checked() reads, in one call: version/IHL, Total Length, flags/fragment offset.
_CHECKED_FIELDS = struct.Struct("!BxHxxH")

# The flags/fragment offset field (RFC 791 §3.1, §3.2).
FLAG_DF: Final = 0x4000
FLAG_MF: Final = 0x2000
FRAG_OFFSET_MASK: Final = 0x1FFF


def header_len_of(packet: bytes | bytearray | memoryview) -> int:
    """The header length IHL gives, in bytes (RFC 791 §3.1: in 32-bit words); unchecked."""
    return (packet[VER_IHL_OFFSET] & 0x0F) << 2


@dataclass(frozen=True, slots=True)
class Ipv4Header:
    src: bytes
    dst: bytes
    protocol: int
    ttl: int = 64
    ident: int = 0
    dont_fragment: bool = True
    tos: int = 0
    header_len: int = HEADER_LEN  # from IHL on parse; emit always writes 20 bytes

    def emit_into(self, buf: bytearray | memoryview, offset: int, payload_len: int) -> None:
        """Write the 20-byte header for a payload of payload_len bytes at buf[offset:], checksum filled."""
        total_len = HEADER_LEN + payload_len
        if total_len > MAX_TOTAL_LEN:
            raise ValueError(f"IPv4 total length {total_len} exceeds 65535")
        # RFC 791 §3.1: checksum over the header with the field taken as zero.
        _HEADER.pack_into(buf, offset, 0x45, self.tos, total_len, self.ident,
                          FLAG_DF if self.dont_fragment else 0, self.ttl, self.protocol, 0, self.src, self.dst)
        _U16.pack_into(buf, offset + CHECKSUM_OFFSET,
                       internet_checksum(memoryview(buf)[offset:offset + HEADER_LEN]))

    def emit(self, payload_len: int) -> bytes:
        """The 20-byte header for a payload of payload_len bytes, checksum filled."""
        buf = bytearray(HEADER_LEN)
        self.emit_into(buf, 0, payload_len)
        return bytes(buf)


class Ipv4Packet:
    """A view over one IPv4 packet; construct with ``checked`` or ``trusted``."""

    __slots__ = ("buf", "header_len", "total_len")

    def __init__(self, buf: memoryview, header_len: int, total_len: int) -> None:
        self.buf = buf
        self.header_len = header_len
        self.total_len = total_len

    @classmethod
    def checked(cls, packet: bytes | bytearray | memoryview, verify_checksum: bool = True,
                fragments: bool = False) -> Ipv4Packet:
        """The one check of untrusted bytes; Malformed(reason) if they are no IPv4 packet we take."""
        n = len(packet)
        if n < HEADER_LEN:
            raise Malformed("truncated")
        ver_ihl, total_len, frag = _CHECKED_FIELDS.unpack_from(packet, VER_IHL_OFFSET)
        if ver_ihl >> 4 != 4:
            raise Malformed("bad_version")
        header_len = (ver_ihl & 0x0F) << 2
        # RFC 791 §3.1: IHL is in 32-bit words, minimum 5.
        if header_len < HEADER_LEN or header_len > n:
            raise Malformed("bad_ihl")
        # Trailing bytes past Total Length (link padding) are ignored.
        if total_len < header_len or total_len > n:
            raise Malformed("bad_total_length")
        view = as_view(packet)
        if verify_checksum and not verify(view[:header_len]):
            raise Malformed("bad_checksum")
        # RFC 791 §3.2: MF set or a non-zero offset means a fragment; only a reassembler takes it.
        if not fragments and frag & (FLAG_MF | FRAG_OFFSET_MASK):
            raise Malformed("fragment")
        return cls(view, header_len, total_len)

    @classmethod
    def trusted(cls, packet: bytes | bytearray | memoryview) -> Ipv4Packet:
        """A view over a packet ``checked`` already accepted (ingress did): nothing is re-verified."""
        view = as_view(packet)
        return cls(view, header_len_of(packet), _U16.unpack_from(packet, TOTAL_LEN_OFFSET)[0])

    @property
    def tos(self) -> int:
        return self.buf[TOS_OFFSET]

    @property
    def ident(self) -> int:
        return _U16.unpack_from(self.buf, IDENT_OFFSET)[0]

    @property
    def dont_fragment(self) -> bool:
        return self.buf[FLAGS_FRAG_OFFSET] & (FLAG_DF >> 8) != 0

    @property
    def is_fragment(self) -> bool:
        """MF set or a non-zero offset (RFC 791 §3.2)."""
        return _U16.unpack_from(self.buf, FLAGS_FRAG_OFFSET)[0] & (FLAG_MF | FRAG_OFFSET_MASK) != 0

    @property
    def more_fragments(self) -> bool:
        return self.buf[FLAGS_FRAG_OFFSET] & (FLAG_MF >> 8) != 0

    @property
    def fragment_offset(self) -> int:
        """Where this fragment's data goes in the datagram, in bytes (RFC 791 §3.1: in 8-octet units)."""
        return (_U16.unpack_from(self.buf, FLAGS_FRAG_OFFSET)[0] & FRAG_OFFSET_MASK) * 8

    @property
    def ttl(self) -> int:
        return self.buf[TTL_OFFSET]

    @property
    def protocol(self) -> int:
        return self.buf[PROTOCOL_OFFSET]

    @property
    def src(self) -> bytes:
        return bytes(self.buf[SRC_OFFSET:SRC_OFFSET + ADDRESS_LEN])

    @property
    def dst(self) -> bytes:
        return bytes(self.buf[DST_OFFSET:DST_OFFSET + ADDRESS_LEN])

    @property
    def payload(self) -> memoryview:
        """The transport bytes, cut to Total Length (a view: no copy)."""
        return self.buf[self.header_len:self.total_len]

    def header(self) -> Ipv4Header:
        """The value form of this header."""
        _, tos, _, ident, frag, ttl, protocol, _, src, dst = _HEADER.unpack_from(self.buf)
        return Ipv4Header(src, dst, protocol, ttl, ident, bool(frag & FLAG_DF), tos, self.header_len)


def build_ipv4(header: Ipv4Header, payload: bytes) -> bytes:
    """header.emit(len(payload)) + payload."""
    return header.emit(len(payload)) + payload


def parse_ipv4(packet: bytes | memoryview, verify_checksum: bool = True) -> tuple[Ipv4Header, memoryview]:
    """Check one IPv4 packet; return its header and payload (a view, cut to Total Length)."""
    view = Ipv4Packet.checked(packet, verify_checksum)
    return view.header(), view.payload
