"""ICMP messages (RFC 792): echo and the error messages a host sends.

``parse_icmp`` checks length and checksum and raises only
``Malformed(reason)``; ``IcmpMessage`` is a frozen value with ``emit``.
The 32-bit word after the checksum is kept whole as ``rest``
(identifier << 16 | sequence for echo, unused/zero for unreachable).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pipeline.wire import Malformed
from pipeline.wire.checksum import internet_checksum, ones_sum, verify

ECHO_REPLY = 0
DEST_UNREACHABLE = 3
ECHO_REQUEST = 8
TIME_EXCEEDED = 11

# Destination Unreachable codes (RFC 792).
PROTOCOL_UNREACHABLE = 2
PORT_UNREACHABLE = 3

_HEADER = struct.Struct("!BBHI")
HEADER_LEN = 8

# RFC 1812 §4.3.2.3 / RFC 1122 §3.2.2: quote as much of the offending
# datagram as keeps the ICMP error within 576 octets (576 - 20 IP - 8 ICMP).
MAX_QUOTE = 548


@dataclass(frozen=True, slots=True)
class IcmpMessage:
    type: int
    code: int
    rest: int  # the 32-bit "rest of header" word
    payload: bytes

    @property
    def identifier(self) -> int:
        return self.rest >> 16

    @property
    def sequence(self) -> int:
        return self.rest & 0xFFFF

    def emit(self) -> bytes:
        """Header and payload with the checksum filled (RFC 792: over the whole message)."""
        header = _HEADER.pack(self.type, self.code, 0, self.rest)
        csum = internet_checksum(self.payload, ones_sum(header))
        return _HEADER.pack(self.type, self.code, csum, self.rest) + self.payload


def parse_icmp(data: bytes | memoryview) -> IcmpMessage:
    """Check and decode one ICMP message (data is the whole IP payload)."""
    if len(data) < HEADER_LEN:
        raise Malformed("truncated")
    if not verify(data):
        raise Malformed("bad_checksum")
    type_, code, _csum, rest = _HEADER.unpack_from(data)
    return IcmpMessage(type_, code, rest, bytes(data[HEADER_LEN:]))


def echo_reply(request: IcmpMessage) -> IcmpMessage:
    """The reply to an echo request: same identifier, sequence and data (RFC 792)."""
    return IcmpMessage(ECHO_REPLY, 0, request.rest, request.payload)


def dest_unreachable(code: int, original_ip_packet: bytes | memoryview) -> IcmpMessage:
    """Destination Unreachable quoting the original IP header and the start of its data.

    RFC 792 asks for the header plus 64 bits of data; RFC 1122 §3.2.2 says "at
    least" that, and RFC 1812 §4.3.2.3 suggests as much as fits in 576 octets.
    We quote up to 548 octets, like Linux: the sender then sees the whole TCP
    or UDP header (and more) to match the error to a socket, while the error
    stays no larger than the minimum datagram every host accepts (no
    amplification). Not sending errors about errors, broadcasts or fragments
    (RFC 1122 §3.2.2) is the caller's job.
    """
    return IcmpMessage(DEST_UNREACHABLE, code, 0, bytes(original_ip_packet[:MAX_QUOTE]))
