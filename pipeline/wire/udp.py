"""UDP datagrams (RFC 768): a checked view over the bytes, and a value to emit.

``UdpPacket.checked`` checks the length field once and raises only
``Malformed(reason)``; ``verify_checksum`` checks the checksum over the
pseudo header (a zero field means none was sent). ``parse_udp`` is both
steps. ``UdpDatagram`` is the frozen value form; ``emit``/``emit_into``
always compute the checksum.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from pipeline.wire import Malformed, as_view
from pipeline.wire.checksum import internet_checksum, pseudo_header_sum, verify
from pipeline.wire.ports import PortsView

PROTO_UDP: Final = 17

_HEADER = struct.Struct("!HHHH")
HEADER_LEN: Final = 8
MAX_LEN = 0xFFFF
# Field offsets (RFC 768), named once; the ports before them: pipeline.wire.ports.
_LENGTH: Final = 4
CHECKSUM_OFFSET: Final = 6
_U16 = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    src_port: int
    dst_port: int
    payload: bytes

    def emit(self, src: bytes, dst: bytes) -> bytes:
        """Header and payload with the checksum over the pseudo header (RFC 768)."""
        return self.header(src, dst) + self.payload

    def emit_into(self, buf: bytearray | memoryview, offset: int, src: bytes, dst: bytes) -> int:
        """Write the datagram at buf[offset:]; return its length (header and payload)."""
        end = offset + HEADER_LEN + len(self.payload)
        buf[offset:offset + HEADER_LEN] = self.header(src, dst)
        buf[offset + HEADER_LEN:end] = self.payload
        return end - offset

    def header(self, src: bytes, dst: bytes) -> bytes:
        """The 8-byte header alone (its checksum covers the payload), for a caller that places
        the payload after it itself: the payload is then not copied here."""
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
        return _HEADER.pack(self.src_port, self.dst_port, length, csum)


_IPV6_ADDRESS_LEN = 16


class UdpPacket(PortsView):
    """A view over one UDP datagram, cut to its Length field; construct with ``checked``."""

    __slots__ = ()

    @classmethod
    def checked(cls, data: bytes | bytearray | memoryview) -> UdpPacket:
        """The one length check of untrusted bytes (data is the whole IP payload)."""
        n = len(data)
        if n < HEADER_LEN:
            raise Malformed("truncated")
        length = _U16.unpack_from(data, _LENGTH)[0]
        # RFC 768: Length covers header and data; bytes past it are ignored.
        if length < HEADER_LEN or length > n:
            raise Malformed("bad_length")
        view = as_view(data)
        return cls(view if length == n else view[:length])

    @property
    def payload(self) -> memoryview:
        return self.buf[HEADER_LEN:]

    def verify_checksum(self, src: bytes, dst: bytes) -> bool:
        """True if there is no checksum (a zero field, RFC 768) or it is right; over IPv6 zero is wrong.

        RFC 8200 §8.1: the checksum is mandatory over IPv6 (16-byte addresses);
        the pseudo-header sum is the same formula for both families.
        """
        if _U16.unpack_from(self.buf, CHECKSUM_OFFSET)[0] == 0:
            return len(src) != _IPV6_ADDRESS_LEN
        return verify(self.buf, pseudo_header_sum(src, dst, PROTO_UDP, len(self.buf)))

    def datagram(self) -> UdpDatagram:
        return UdpDatagram(*self.ports, bytes(self.buf[HEADER_LEN:]))


def parse_udp(data: bytes | memoryview, src: bytes, dst: bytes, verify_checksum: bool = True) -> UdpDatagram:
    """Check and decode one UDP datagram (data is the whole IP payload).

    ``verify_checksum=False`` is for datagrams whose checksum the device
    vouched for or left partial (checksum offload); lengths are still checked.
    """
    view = UdpPacket.checked(data)
    if len(src) == _IPV6_ADDRESS_LEN and _U16.unpack_from(view.buf, CHECKSUM_OFFSET)[0] == 0:
        raise Malformed("zero_checksum")  # RFC 8200 §8.1, whatever the device says
    if verify_checksum and not view.verify_checksum(src, dst):
        raise Malformed("bad_checksum")
    return view.datagram()
