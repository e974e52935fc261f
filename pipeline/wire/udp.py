"""UDP datagrams (RFC 768).

``parse_udp`` checks the length field and (if present) the checksum over the
IPv4 pseudo header and raises only ``Malformed(reason)``; ``UdpDatagram`` is
a frozen value whose ``emit`` always computes the checksum.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pipeline.wire import Malformed
from pipeline.wire.checksum import internet_checksum, pseudo_header_sum, verify

PROTO_UDP = 17

_HEADER = struct.Struct("!HHHH")
HEADER_LEN = 8
MAX_LEN = 0xFFFF


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    src_port: int
    dst_port: int
    payload: bytes

    def emit(self, src: bytes, dst: bytes) -> bytes:
        """Header and payload with the checksum over the pseudo header (RFC 768)."""
        length = HEADER_LEN + len(self.payload)
        if length > MAX_LEN:
            raise ValueError(f"UDP length {length} exceeds 65535")
        partial = pseudo_header_sum(src, dst, PROTO_UDP, length)
        # Ports and length are whole 16-bit words: add them to the partial sum directly.
        partial += self.src_port + self.dst_port + length
        csum = internet_checksum(self.payload, partial)
        # RFC 768: a computed zero is sent as all ones; zero means "no checksum".
        if csum == 0:
            csum = 0xFFFF
        return _HEADER.pack(self.src_port, self.dst_port, length, csum) + self.payload


def parse_udp(data: bytes | memoryview, src: bytes, dst: bytes, verify_checksum: bool = True) -> UdpDatagram:
    """Check and decode one UDP datagram (data is the whole IP payload).

    ``verify_checksum=False`` is for datagrams whose checksum the device
    vouched for or left partial (checksum offload); lengths are still checked.
    """
    n = len(data)
    if n < HEADER_LEN:
        raise Malformed("truncated")
    src_port, dst_port, length, csum = _HEADER.unpack_from(data)
    # RFC 768: Length covers header and data; bytes past it are ignored.
    if length < HEADER_LEN or length > n:
        raise Malformed("bad_length")
    if length != n:
        data = data[:length]
    # RFC 768: an all-zero checksum field means the sender computed none.
    if csum and verify_checksum and not verify(data, pseudo_header_sum(src, dst, PROTO_UDP, length)):
        raise Malformed("bad_checksum")
    return UdpDatagram(src_port, dst_port, bytes(data[HEADER_LEN:]))
