"""ICMPv6 messages (RFC 4443): echo, the errors a host sends, and the kernel's own chatter.

Contract: ``parse(data, src, dst)`` checks length and the checksum over the
IPv6 pseudo header (RFC 4443 §2.3, RFC 8200 §8.1) and raises only
``Malformed(reason)``; ``Icmpv6Message`` is a frozen value whose ``emit``
writes it, checksum filled, into a caller's buffer of ``buffer_len()``
bytes. The 32-bit word after the checksum is kept whole as ``rest``
(identifier << 16 | sequence for echo, the MTU of Packet Too Big, the
pointer of Parameter Problem, zero otherwise).

The error builders quote as much of the offending packet as keeps the error
within the minimum IPv6 MTU (RFC 4443 §2.4 (c)). Whether an error may be
sent at all (RFC 4443 §2.4 (e)) is ``error_allowed``; rate limiting
(§2.4 (f)) is the caller's. ``chatter`` names the messages the local
kernel sends on its own when an interface comes up (router solicitation,
MLD reports, duplicate address detection) so callers count and drop them
without answering.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pipeline.wire import Malformed
from pipeline.wire import ipv6
from pipeline.wire.checksum import internet_checksum, pseudo_header_sum6, verify
from pipeline.wire.icmp import EchoFields, Quote

# Types (RFC 4443 §2.1, RFC 4861 §4, RFC 2710 §3, RFC 3810 §5). Below 128: errors.
DEST_UNREACHABLE = 1
PACKET_TOO_BIG = 2
TIME_EXCEEDED = 3
PARAM_PROBLEM = 4
ECHO_REQUEST = 128
ECHO_REPLY = 129
MLD_QUERY = 130
MLD_REPORT = 131
MLD_DONE = 132
ROUTER_SOLICITATION = 133
ROUTER_ADVERTISEMENT = 134
NEIGHBOR_SOLICITATION = 135
NEIGHBOR_ADVERTISEMENT = 136
REDIRECT = 137
MLDV2_REPORT = 143
_FIRST_INFORMATIONAL = 128

# Destination Unreachable codes (RFC 4443 §3.1).
NO_ROUTE = 0
ADMIN_PROHIBITED = 1
BEYOND_SCOPE = 2
ADDRESS_UNREACHABLE = 3
PORT_UNREACHABLE = 4
SOURCE_POLICY_FAILED = 5
REJECT_ROUTE = 6
# RFC 4443 §3.1 / RFC 5461 §4: the codes that end a connection attempt (hard errors).
HARD_UNREACHABLE = frozenset({ADMIN_PROHIBITED, PORT_UNREACHABLE})
# Time Exceeded codes (RFC 4443 §3.3).
HOP_LIMIT_EXCEEDED = 0
FRAGMENT_REASSEMBLY_TIME_EXCEEDED = 1
# Parameter Problem codes (RFC 4443 §3.4, RFC 7112 §5): named once, in ipv6.py, whose walk produces them.
ERRONEOUS_HEADER = ipv6.ERRONEOUS_HEADER
UNRECOGNIZED_NEXT_HEADER = ipv6.UNRECOGNIZED_NEXT_HEADER
UNRECOGNIZED_OPTION = ipv6.UNRECOGNIZED_OPTION
INCOMPLETE_HEADER_CHAIN = ipv6.INCOMPLETE_HEADER_CHAIN

# RFC 4443 §2.1: type, code, checksum, then (for every message we handle) a 32-bit word.
_HEADER = struct.Struct("!BBHI")
HEADER_LEN = 8
CHECKSUM_OFFSET = 2

# RFC 4443 §2.4 (c): the error must not exceed the minimum IPv6 MTU (1280).
MAX_QUOTE = ipv6.MIN_MTU - ipv6.HEADER_LEN - HEADER_LEN

_UNSPECIFIED = bytes(16)


@dataclass(frozen=True, slots=True)
class Icmpv6Message(EchoFields):
    type: int
    code: int
    rest: int  # the 32-bit word after the checksum
    payload: bytes

    @property
    def mtu(self) -> int:
        """Packet Too Big: the MTU of the next-hop link (RFC 4443 §3.2)."""
        return self.rest

    @property
    def pointer(self) -> int:
        """Parameter Problem: offset of the offending octet (RFC 4443 §3.4)."""
        return self.rest

    @property
    def is_error(self) -> bool:
        """RFC 4443 §2.1: types 0-127 are errors, 128-255 informational."""
        return self.type < _FIRST_INFORMATIONAL

    def buffer_len(self) -> int:
        return HEADER_LEN + len(self.payload)

    def emit(self, buf: bytearray | memoryview, src: bytes, dst: bytes) -> None:
        """Write the message into buf[:buffer_len()], checksum over the pseudo header (RFC 4443 §2.3)."""
        n = self.buffer_len()
        view = buf if isinstance(buf, memoryview) else memoryview(buf)
        _HEADER.pack_into(view, 0, self.type, self.code, 0, self.rest)
        view[HEADER_LEN:n] = self.payload
        csum = internet_checksum(view[:n], pseudo_header_sum6(src, dst, ipv6.ICMPV6, n))
        struct.pack_into("!H", view, CHECKSUM_OFFSET, csum)

    def to_bytes(self, src: bytes, dst: bytes) -> bytes:
        buf = bytearray(self.buffer_len())
        self.emit(buf, src, dst)
        return bytes(buf)


def parse(data: bytes | memoryview, src: bytes, dst: bytes, verify_checksum: bool = True) -> Icmpv6Message:
    """Check and decode one ICMPv6 message; data is the whole upper-layer payload."""
    if len(data) < HEADER_LEN:
        raise Malformed("truncated")
    if verify_checksum and not verify(data, pseudo_header_sum6(src, dst, ipv6.ICMPV6, len(data))):
        raise Malformed("bad_checksum")
    type_, code, _csum, rest = _HEADER.unpack_from(data)
    return Icmpv6Message(type_, code, rest, bytes(data[HEADER_LEN:]))


def echo_reply(request: Icmpv6Message) -> Icmpv6Message:
    """The reply to an echo request: same identifier, sequence and data (RFC 4443 §4.2)."""
    return Icmpv6Message(ECHO_REPLY, 0, request.rest, request.payload)


def _quote(offending: bytes | memoryview) -> bytes:
    """RFC 4443 §2.4 (c): as much of the offending packet as fits in 1280 octets."""
    return bytes(offending[:MAX_QUOTE])


def dest_unreachable(code: int, offending: bytes | memoryview) -> Icmpv6Message:
    """Destination Unreachable (RFC 4443 §3.1), e.g. PORT_UNREACHABLE or ADMIN_PROHIBITED."""
    return Icmpv6Message(DEST_UNREACHABLE, code, 0, _quote(offending))


def packet_too_big(mtu: int, offending: bytes | memoryview) -> Icmpv6Message:
    """Packet Too Big carrying the next-hop MTU (RFC 4443 §3.2)."""
    return Icmpv6Message(PACKET_TOO_BIG, 0, mtu, _quote(offending))


def time_exceeded(code: int, offending: bytes | memoryview) -> Icmpv6Message:
    """Time Exceeded (RFC 4443 §3.3); code 1 for fragment reassembly (RFC 8200 §4.5)."""
    return Icmpv6Message(TIME_EXCEEDED, code, 0, _quote(offending))


def param_problem(problem: ipv6.ParamProblem, offending: bytes | memoryview) -> Icmpv6Message:
    """Parameter Problem with the code and pointer ipv6.parse found (RFC 4443 §3.4)."""
    return Icmpv6Message(PARAM_PROBLEM, problem.code, problem.pointer, _quote(offending))


def error_allowed(offending: bytes | memoryview, type_: int, code: int) -> bool:
    """Whether RFC 4443 §2.4 (e) lets us send an error of type_/code about offending."""
    try:
        view = ipv6.Ipv6View.checked(offending)
    except Malformed:
        return False
    src, dst = view.src, view.dst
    # (e.6): not to a source that does not identify a single node.
    if src == _UNSPECIFIED or ipv6.is_multicast(src):
        return False
    # (e.3): not about a packet sent to multicast, except Packet Too Big and
    # Parameter Problem code 2 for an option whose action bits are 10.
    if ipv6.is_multicast(dst) and not (
        type_ == PACKET_TOO_BIG or (type_ == PARAM_PROBLEM and code == UNRECOGNIZED_OPTION)
    ):
        return False
    # (e.1), (e.2): never about an ICMPv6 error message or a Redirect.
    buf = view.buf
    found = ipv6.skip_extension_headers(buf, view.next_header, ipv6.HEADER_LEN, len(buf))
    if found is not None:
        upper, off = found
        if upper == ipv6.ICMPV6 and off < len(buf) and (buf[off] < _FIRST_INFORMATIONAL or buf[off] == REDIRECT):
            return False
    return True


def chatter(message: Icmpv6Message, src: bytes) -> str | None:
    """The counter name if message is the local kernel's own interface chatter, else None.

    Linux sends these on its own when the device comes up: router
    solicitations (RFC 4861 §6.3.7), MLD reports and done messages (RFC 2710,
    RFC 3810) and duplicate address detection, a neighbour solicitation from
    the unspecified address (RFC 4862 §5.4.2). None of them asks us for an
    answer, and none may draw an ICMPv6 error.
    """
    t = message.type
    if t == ROUTER_SOLICITATION:
        return "router_solicitation"
    if t in (MLD_REPORT, MLD_DONE, MLDV2_REPORT):
        return "mld_report"
    if t == NEIGHBOR_SOLICITATION and src == _UNSPECIFIED:
        return "duplicate_address_detection"
    return None


def quoted_ipv6(quote: bytes | memoryview) -> Quote | None:
    """What an ICMPv6 error's payload says about the IPv6 packet it quotes; None if too little is quoted."""
    if len(quote) < ipv6.HEADER_LEN or quote[0] >> 4 != 6:
        return None
    buf = quote if isinstance(quote, memoryview) else memoryview(quote)
    found = ipv6.skip_extension_headers(buf, buf[ipv6.NEXT_HEADER_OFFSET], ipv6.HEADER_LEN, len(buf))
    if found is None or len(buf) < found[1] + 8:
        return None
    upper, off = found
    return Quote(upper, bytes(buf[ipv6.SRC_OFFSET:ipv6.DST_OFFSET]), bytes(buf[ipv6.DST_OFFSET:ipv6.HEADER_LEN]),
                 bytes(buf[off:off + 8]))
