"""ICMP messages (RFC 792): echo and the error messages a host sends.

``IcmpPacket.checked`` checks the length once and raises only
``Malformed(reason)``; ``verify_checksum`` checks the sum over the whole
message; ``parse_icmp`` is both steps. ``IcmpMessage`` is a frozen value
with ``emit`` and ``emit_into``.
The 32-bit word after the checksum is kept whole as ``rest``
(identifier << 16 | sequence for echo, unused/zero for unreachable).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pipeline.flow import outbound_key
from pipeline.wire import Malformed, as_view, ipv4, tcp
from pipeline.wire.checksum import internet_checksum, ones_sum, verify

ECHO_REPLY = 0
DEST_UNREACHABLE = 3
ECHO_REQUEST = 8
TIME_EXCEEDED = 11
PARAM_PROBLEM = 12
# The errors that quote a packet of ours and so belong to the flow that sent it (RFC 792).
QUOTING_ERRORS = frozenset({DEST_UNREACHABLE, TIME_EXCEEDED, PARAM_PROBLEM})

# Destination Unreachable codes (RFC 792, RFC 1191 §4; 13 from RFC 1812 §5.2.7.1).
NET_UNREACHABLE = 0
HOST_UNREACHABLE = 1
PROTOCOL_UNREACHABLE = 2
PORT_UNREACHABLE = 3
FRAGMENTATION_NEEDED = 4
ADMIN_PROHIBITED = 13
# RFC 1122 §4.2.3.9: codes 2-4 are hard errors; 4 is path MTU discovery's (RFC 1191), not fatal.
HARD_UNREACHABLE = frozenset({PROTOCOL_UNREACHABLE, PORT_UNREACHABLE})
# Time Exceeded codes (RFC 792).
REASSEMBLY_TIME_EXCEEDED = 1

_HEADER = struct.Struct("!BBHI")
HEADER_LEN = 8
# Field offsets (RFC 792), named once.
_TYPE = 0
_CODE = 1
_REST = 4
_U32 = struct.Struct("!I")

_QUOTED_TRANSPORT = 8  # bytes of the quoted transport header every error carries (RFC 792)

# RFC 1812 §4.3.2.3 / RFC 1122 §3.2.2: quote as much of the offending
# datagram as keeps the ICMP error within 576 octets (576 - 20 IP - 8 ICMP).
MAX_QUOTE = 548


class EchoFields:
    """identifier and sequence: the halves of the word after the checksum (RFC 792, RFC 4443 §4).

    For the message classes below, which have a ``rest`` field. The mixin
    declares no ``rest`` of its own: compiled by mypyc, a declared attribute
    looks like a field with a default to a dataclass built on it, which then
    refuses the fields after it that have none.
    """

    __slots__ = ()

    @property
    def identifier(self) -> int:
        rest: int = getattr(self, "rest")
        return rest >> 16

    @property
    def sequence(self) -> int:
        rest: int = getattr(self, "rest")
        return rest & 0xFFFF


@dataclass(frozen=True, slots=True)
class IcmpMessage(EchoFields):
    type: int
    code: int
    rest: int  # the 32-bit "rest of header" word
    payload: bytes

    @property
    def next_hop_mtu(self) -> int:
        """Fragmentation Needed: the next hop's MTU, zero from old routers (RFC 1191 §4)."""
        return self.rest & 0xFFFF

    def emit(self) -> bytes:
        """Header and payload with the checksum filled (RFC 792: over the whole message)."""
        return self.header() + self.payload

    def emit_into(self, buf: bytearray | memoryview, offset: int) -> int:
        """Write the message at buf[offset:]; return its length."""
        end = offset + HEADER_LEN + len(self.payload)
        buf[offset:offset + HEADER_LEN] = self.header()
        buf[offset + HEADER_LEN:end] = self.payload
        return end - offset

    def header(self) -> bytes:
        """The 8-byte header alone, its checksum covering the payload too (for ``workers.core.ip_reply``)."""
        csum = internet_checksum(self.payload, ones_sum(_HEADER.pack(self.type, self.code, 0, self.rest)))
        return _HEADER.pack(self.type, self.code, csum, self.rest)


class IcmpPacket:
    """A view over one ICMP message (the whole IP payload); construct with ``checked``."""

    __slots__ = ("buf",)

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf

    @classmethod
    def checked(cls, data: bytes | bytearray | memoryview) -> IcmpPacket:
        if len(data) < HEADER_LEN:
            raise Malformed("truncated")
        return cls(as_view(data))

    @property
    def type(self) -> int:
        return self.buf[_TYPE]

    @property
    def code(self) -> int:
        return self.buf[_CODE]

    @property
    def rest(self) -> int:
        return _U32.unpack_from(self.buf, _REST)[0]

    @property
    def payload(self) -> memoryview:
        return self.buf[HEADER_LEN:]

    def verify_checksum(self) -> bool:
        """RFC 792: the checksum covers the whole message."""
        return verify(self.buf)

    def message(self) -> IcmpMessage:
        type_, code, _csum, rest = _HEADER.unpack_from(self.buf)
        return IcmpMessage(type_, code, rest, bytes(self.buf[HEADER_LEN:]))


def parse_icmp(data: bytes | memoryview) -> IcmpMessage:
    """Check and decode one ICMP message (data is the whole IP payload)."""
    view = IcmpPacket.checked(data)
    if not view.verify_checksum():
        raise Malformed("bad_checksum")
    return view.message()


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


def time_exceeded(code: int, original_ip_packet: bytes | memoryview) -> IcmpMessage:
    """Time Exceeded quoting the original (RFC 792); code 1 for fragment reassembly (RFC 1122 §3.3.2)."""
    return IcmpMessage(TIME_EXCEEDED, code, 0, bytes(original_ip_packet[:MAX_QUOTE]))


@dataclass(frozen=True, slots=True)
class Quote:
    """The start of a packet an ICMP error quotes: one we sent, so src is ours and dst the peer."""

    protocol: int
    src: bytes
    dst: bytes
    transport: bytes  # the first 8 bytes of its transport header (all RFC 792 guarantees)

    @property
    def flow_key(self) -> bytes:
        """``Flow.key`` of the flow the quoted packet belongs to, seen from us (remote, rport, lport)."""
        return outbound_key(self.dst, self.transport)

    @property
    def tcp_seq(self) -> int:
        """The quoted TCP segment's sequence number (RFC 5927 §4.1 checks it)."""
        return _U32.unpack_from(self.transport, tcp.SEQ_OFFSET)[0]


def quoted_ipv4(quote: bytes | memoryview) -> Quote | None:
    """What an ICMP error's payload says about the IPv4 packet it quotes; None if too little is quoted."""
    if len(quote) < ipv4.HEADER_LEN or quote[ipv4.VER_IHL_OFFSET] >> 4 != 4:
        return None
    header_len = ipv4.header_len_of(quote)
    if header_len < ipv4.HEADER_LEN or len(quote) < header_len + _QUOTED_TRANSPORT:
        return None
    return Quote(quote[ipv4.PROTOCOL_OFFSET], bytes(quote[ipv4.SRC_OFFSET:ipv4.SRC_OFFSET + ipv4.ADDRESS_LEN]),
                 bytes(quote[ipv4.DST_OFFSET:ipv4.DST_OFFSET + ipv4.ADDRESS_LEN]),
                 bytes(quote[header_len:header_len + _QUOTED_TRANSPORT]))
