"""IPv4 headers (RFC 791 §3.1).

``parse_ipv4`` checks a packet once and raises only ``Malformed(reason)``;
it returns a frozen ``Ipv4Header`` and the payload as a memoryview cut to
Total Length (no copy). Fragments are dropped with reason "fragment": we do
not reassemble. Options are skipped (``header_len`` says how many bytes);
``emit`` always writes a plain 20-byte header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pipeline.wire import Malformed
from pipeline.wire.checksum import internet_checksum, verify

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

# RFC 791 §3.1: version/IHL, TOS, total length, identification,
# flags/fragment offset, TTL, protocol, header checksum, source, destination.
_HEADER = struct.Struct("!BBHHHBBH4s4s")
HEADER_LEN = 20
MAX_TOTAL_LEN = 0xFFFF

_FLAG_DF = 0x4000
_FLAG_MF = 0x2000
_FRAG_OFFSET_MASK = 0x1FFF


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

    def emit(self, payload_len: int) -> bytes:
        """The 20-byte header for a payload of payload_len bytes, checksum filled."""
        total_len = HEADER_LEN + payload_len
        if total_len > MAX_TOTAL_LEN:
            raise ValueError(f"IPv4 total length {total_len} exceeds 65535")
        fields = (
            0x45, self.tos, total_len, self.ident, _FLAG_DF if self.dont_fragment else 0,
            self.ttl, self.protocol,
        )
        # RFC 791 §3.1: checksum over the header with the field taken as zero.
        csum = internet_checksum(_HEADER.pack(*fields, 0, self.src, self.dst))
        return _HEADER.pack(*fields, csum, self.src, self.dst)


def build_ipv4(header: Ipv4Header, payload: bytes) -> bytes:
    """header.emit(len(payload)) + payload."""
    return header.emit(len(payload)) + payload


def parse_ipv4(packet: bytes | memoryview, verify_checksum: bool = True) -> tuple[Ipv4Header, memoryview]:
    """Check one IPv4 packet; return its header and payload (a view, cut to Total Length)."""
    n = len(packet)
    if n < HEADER_LEN:
        raise Malformed("truncated")
    ver_ihl, tos, total_len, ident, frag, ttl, protocol, _csum, src, dst = _HEADER.unpack_from(packet)
    if ver_ihl >> 4 != 4:
        raise Malformed("bad_version")
    header_len = (ver_ihl & 0x0F) << 2
    # RFC 791 §3.1: IHL is in 32-bit words, minimum 5.
    if header_len < HEADER_LEN or header_len > n:
        raise Malformed("bad_ihl")
    # Trailing bytes past Total Length (link padding) are ignored.
    if total_len < header_len or total_len > n:
        raise Malformed("bad_total_length")
    view = packet if isinstance(packet, memoryview) else memoryview(packet)
    if verify_checksum and not verify(view[:header_len]):
        raise Malformed("bad_checksum")
    # RFC 791 §3.2: MF set or a non-zero offset means a fragment; no reassembly here.
    if frag & (_FLAG_MF | _FRAG_OFFSET_MASK):
        raise Malformed("fragment")
    header = Ipv4Header(src, dst, protocol, ttl, ident, bool(frag & _FLAG_DF), tos, header_len)
    return header, view[header_len:total_len]
