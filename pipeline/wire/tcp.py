"""TCP segments (RFC 9293 §3.1) with MSS, window scale, SACK and timestamps.

``TcpPacket.checked`` checks a buffer's lengths once (header, Data Offset)
and raises only ``Malformed(reason)``; its accessors then read the header
in place (ingress routes by its ports and flags without decoding more).
``TcpPacket.segment`` decodes the options into a frozen ``TcpSegment``, whose
``emit`` writes it back; ``parse_tcp`` is both steps plus the checksum. Options
(RFC 9293 §3.2, RFC 7323, RFC 2018) are parsed strictly: unknown kinds are
skipped by their length, anything that cannot be walked is "bad_option".
Segments may be up to 64 KB (TSO/GRO); nothing here assumes one MSS. The
control bits are written down once, here: ``FIN`` ... ``CWR`` as plain ints
(what code that tests bits uses) and ``Flags``, the same bits as an IntFlag
(the type of ``TcpSegment.flags``); so are the field offsets.

Checksum offload: ``emit(..., checksum=False)`` leaves the folded (not
complemented) pseudo-header sum in the checksum field, as Linux expects for
``VIRTIO_NET_HDR_F_NEEDS_CSUM`` with csum_start = start of the TCP header and
csum_offset = 16.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from pipeline.wire import Malformed, as_view
from pipeline.wire.checksum import internet_checksum, ones_sum, pseudo_header_sum, verify
from pipeline.wire.ports import PortsView

PROTO_TCP: Final = 6

# RFC 9293 §3.1 header layout and field offsets, named once (Final: mypyc inlines them).
_HEADER = struct.Struct("!HHIIBBHHH")
HEADER_LEN: Final = 20
SEQ_OFFSET: Final = 4  # the ports before it: pipeline.wire.ports
ACK_OFFSET: Final = 8
_DATA_OFFSET: Final = 12  # Data Offset (4 bits) and reserved bits
FLAGS_OFFSET: Final = 13
WINDOW_OFFSET: Final = 14
CHECKSUM_OFFSET: Final = 16
MAX_OPTIONS_LEN = 40

# Option kinds (RFC 9293 §3.2, RFC 7323 §2-3, RFC 2018 §2-3).
OPT_EOL = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WS = 3
OPT_SACK_PERMITTED = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U32X2 = struct.Struct("!II")
_TS_ALIGNED = b"\x01\x01\x08\x0a"  # NOP NOP TS: the common data-segment layout


# The control bits (RFC 9293 §3.1; ECE and CWR: RFC 3168 §6.1), written down once. As plain
# ints for code that tests bits (``int(seg.flags) & SYN``): mypyc folds a Final int into a
# constant, while every IntFlag operator is a Python-level call, even compiled.
FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
PSH: Final = 0x08
ACK: Final = 0x10
URG: Final = 0x20
ECE: Final = 0x40
CWR: Final = 0x80


class Flags(enum.IntFlag):
    """The same bits as an IntFlag: the type of ``TcpSegment.flags`` (readable in reprs and logs)."""

    FIN = FIN
    SYN = SYN
    RST = RST
    PSH = PSH
    ACK = ACK
    URG = URG
    ECE = ECE
    CWR = CWR


# Flag values built once: constructing an IntFlag per packet is slow.
_FLAGS = tuple(Flags(i) for i in range(256))


@dataclass(frozen=True, slots=True)
class TcpOptions:
    mss: int | None = None
    window_scale: int | None = None  # shift count as sent (RFC 7323 §2.3); parse keeps the raw value
    sack_permitted: bool = False
    sack_blocks: tuple[tuple[int, int], ...] = ()  # (left edge, right edge), at most 4 (3 with timestamps)
    timestamp: tuple[int, int] | None = None  # (TSval, TSecr)


NO_OPTIONS = TcpOptions()


def _options_len(o: TcpOptions) -> int:
    """Bytes emit() writes for o (always a multiple of 4), SACK blocks cut to what fits."""
    if o is NO_OPTIONS:
        return 0
    n = 0
    if o.mss is not None:
        n += 4
    if o.timestamp is not None:
        n += 12  # NOP NOP TS, or SACK-permitted TS
    elif o.sack_permitted:
        n += 4  # NOP NOP SACK-permitted
    if o.window_scale is not None:
        n += 4  # NOP WS
    if o.sack_blocks:
        count = min(len(o.sack_blocks), (MAX_OPTIONS_LEN - n - 4) // 8)
        if count > 0:
            n += 4 + 8 * count
    return n


def _emit_options(o: TcpOptions) -> bytes:
    """Options laid out as Linux does: every option 4-byte aligned with NOPs, so no EOL padding."""
    parts: list[bytes] = []
    n = 0
    if o.mss is not None:
        parts.append(struct.pack("!BBH", OPT_MSS, 4, o.mss))  # RFC 9293 §3.7.1
        n += 4
    if o.timestamp is not None:
        # RFC 7323 Appendix A: NOP NOP TS; Linux puts SACK-permitted in the NOPs' place on SYNs.
        lead = b"\x04\x02" if o.sack_permitted else b"\x01\x01"
        parts.append(lead + struct.pack("!BBII", OPT_TIMESTAMP, 10, o.timestamp[0], o.timestamp[1]))
        n += 12
    elif o.sack_permitted:
        parts.append(b"\x01\x01\x04\x02")  # RFC 2018 §2
        n += 4
    if o.window_scale is not None:
        parts.append(struct.pack("!BBBB", OPT_NOP, OPT_WS, 3, o.window_scale))  # RFC 7323 §2.2
        n += 4
    if o.sack_blocks:
        # RFC 2018 §3: as many blocks as fit, the first (most recent) ones kept.
        count = min(len(o.sack_blocks), (MAX_OPTIONS_LEN - n - 4) // 8)
        if count > 0:
            blocks = o.sack_blocks[:count]
            parts.append(
                struct.pack(f"!BBBB{2 * count}I", OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * count,
                            *(int(e) for block in blocks for e in block))
            )
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class TcpSegment:
    src_port: int
    dst_port: int
    seq: int  # sequence numbers: plain ints in [0, 2**32), compared with pipeline.wire.seqnum
    ack: int
    flags: Flags
    window: int  # the raw 16-bit field (unscaled)
    payload: bytes = b""
    options: TcpOptions = NO_OPTIONS
    urgent: int = 0

    @property
    def seg_len(self) -> int:
        """SEG.LEN: payload octets plus one each for SYN and FIN (RFC 9293 §3.4)."""
        f = int(self.flags)  # a plain int: IntFlag's & is a Python-level call, even compiled
        return len(self.payload) + (f & SYN != 0) + (f & FIN != 0)

    @property
    def header_len(self) -> int:
        return HEADER_LEN + _options_len(self.options)

    @property
    def syn(self) -> bool:
        return int(self.flags) & SYN != 0

    @property
    def fin(self) -> bool:
        return int(self.flags) & FIN != 0

    @property
    def rst(self) -> bool:
        return int(self.flags) & RST != 0

    @property
    def ack_flag(self) -> bool:
        return int(self.flags) & ACK != 0

    @property
    def psh(self) -> bool:
        return int(self.flags) & PSH != 0

    def emit(self, src: bytes, dst: bytes, checksum: bool = True) -> bytes:
        """Header, options and payload; checksum=False leaves the pseudo-header sum (offload)."""
        return b"".join(self._parts(src, dst, checksum))

    def emit_header(self, src: bytes, dst: bytes, checksum: bool = True) -> bytes:
        """Header and options alone (the checksum still covers the payload), for a caller that
        places the payload after them itself: the payload is then not copied here."""
        header, opts, _ = self._parts(src, dst, checksum)
        return header + opts

    def emit_into(self, buf: bytearray | memoryview, offset: int, src: bytes, dst: bytes,
                  checksum: bool = True) -> int:
        """Write the segment at buf[offset:] (``header_len + len(payload)`` bytes); return that length."""
        end = offset
        for part in self._parts(src, dst, checksum):
            buf[end:end + len(part)] = part
            end += len(part)
        return end - offset

    def _parts(self, src: bytes, dst: bytes, checksum: bool) -> tuple[bytes, bytes, bytes]:
        """Header (checksum or pseudo-header sum filled), options, payload."""
        opts = b"" if self.options is NO_OPTIONS else _emit_options(self.options)
        header_len = HEADER_LEN + len(opts)
        payload = self.payload
        # RFC 9293 §3.1: the pseudo header's TCP length counts header and data.
        partial = pseudo_header_sum(src, dst, PROTO_TCP, header_len + len(payload))
        fields = (
            self.src_port, self.dst_port, self.seq, self.ack,
            (header_len >> 2) << 4, int(self.flags), self.window,
        )
        if not checksum:
            return _HEADER.pack(*fields, partial, self.urgent), opts, payload
        # Header and options are whole 16-bit words, so their sums and the
        # payload's add up without concatenating first.
        partial = ones_sum(opts, ones_sum(_HEADER.pack(*fields, 0, self.urgent), partial))
        return _HEADER.pack(*fields, internet_checksum(payload, partial), self.urgent), opts, payload


def _parse_options(opts: bytes) -> TcpOptions:
    """Walk the option list (RFC 9293 §3.2): kind, or kind + length + value."""
    # Fast path: the NOP NOP TS every Linux data segment carries.
    if len(opts) == 12 and opts[:4] == _TS_ALIGNED:
        return TcpOptions(None, None, False, (), _U32X2.unpack_from(opts, 4))
    mss = ws = ts = None
    sack_permitted = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    i = 0
    end = len(opts)
    while i < end:
        kind = opts[i]
        if kind == OPT_EOL:
            break  # RFC 9293 §3.2: the rest is padding
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise Malformed("bad_option")
        length = opts[i + 1]
        if length < 2 or i + length > end:
            raise Malformed("bad_option")
        if kind == OPT_MSS:
            if length != 4:
                raise Malformed("bad_option")
            mss = _U16.unpack_from(opts, i + 2)[0]
        elif kind == OPT_WS:
            if length != 3:
                raise Malformed("bad_option")
            ws = opts[i + 2]  # RFC 7323 §2.3: the receiver clamps values > 14, not the codec
        elif kind == OPT_SACK_PERMITTED:
            if length != 2:
                raise Malformed("bad_option")
            sack_permitted = True
        elif kind == OPT_SACK:
            # RFC 2018 §3: 8 octets per block, at least one block.
            if length < 10 or (length - 2) % 8:
                raise Malformed("bad_option")
            edges = struct.unpack_from(f"!{(length - 2) // 4}I", opts, i + 2)
            sack_blocks = tuple(
                (edges[k], edges[k + 1]) for k in range(0, len(edges), 2)
            )
        elif kind == OPT_TIMESTAMP:
            if length != 10:
                raise Malformed("bad_option")
            ts = _U32X2.unpack_from(opts, i + 2)
        i += length
    if mss is None and ws is None and ts is None and not sack_permitted and not sack_blocks:
        return NO_OPTIONS
    return TcpOptions(mss, ws, sack_permitted, sack_blocks, ts)


class TcpPacket(PortsView):
    """A view over one TCP segment's bytes; construct with ``checked`` or ``trusted``."""

    __slots__ = ("header_len",)

    def __init__(self, buf: memoryview, header_len: int) -> None:
        self.buf = buf
        self.header_len = header_len

    @classmethod
    def checked(cls, data: bytes | bytearray | memoryview) -> TcpPacket:
        """The one length check of untrusted bytes (data is the whole IP payload)."""
        n = len(data)
        if n < HEADER_LEN:
            raise Malformed("truncated")
        header_len = (data[_DATA_OFFSET] >> 4) << 2
        # RFC 9293 §3.1: Data Offset counts 32-bit words, at least 5.
        if header_len < HEADER_LEN or header_len > n:
            raise Malformed("bad_data_offset")
        return cls(as_view(data), header_len)

    @classmethod
    def trusted(cls, data: bytes | bytearray | memoryview) -> TcpPacket:
        """A view over bytes ``checked`` already accepted."""
        return cls(as_view(data), (data[_DATA_OFFSET] >> 4) << 2)

    @property
    def seq(self) -> int:
        return _U32.unpack_from(self.buf, SEQ_OFFSET)[0]

    @property
    def ack(self) -> int:
        return _U32.unpack_from(self.buf, ACK_OFFSET)[0]

    @property
    def flags(self) -> Flags:
        return _FLAGS[self.buf[FLAGS_OFFSET]]

    @property
    def starts_connection(self) -> bool:
        """SYN without ACK: a segment that may open a connection (RFC 9293 §3.10.7.2)."""
        return self.buf[FLAGS_OFFSET] & (SYN | ACK) == SYN

    @property
    def window(self) -> int:
        return _U16.unpack_from(self.buf, WINDOW_OFFSET)[0]

    @property
    def payload(self) -> memoryview:
        return self.buf[self.header_len:]

    def verify_checksum(self, src: bytes, dst: bytes) -> bool:
        """True if the checksum over the pseudo header, header and data is right (RFC 9293 §3.1)."""
        return verify(self.buf, pseudo_header_sum(src, dst, PROTO_TCP, len(self.buf)))

    def segment(self) -> TcpSegment:
        """The value form; the options are parsed strictly (Malformed("bad_option"))."""
        data = self.buf
        header_len = self.header_len
        src_port, dst_port, seq, ack, _offset, flags, window, _csum, urgent = _HEADER.unpack_from(data)
        options = NO_OPTIONS if header_len == HEADER_LEN else _parse_options(bytes(data[HEADER_LEN:header_len]))
        return TcpSegment(
            src_port, dst_port, seq, ack, _FLAGS[flags], window,
            bytes(data[header_len:]), options, urgent,
        )


def parse_tcp(data: bytes | memoryview, src: bytes, dst: bytes, verify_checksum: bool = True) -> TcpSegment:
    """Check and decode one TCP segment (data is the whole IP payload)."""
    view = TcpPacket.checked(data)
    if verify_checksum and not view.verify_checksum(src, dst):
        raise Malformed("bad_checksum")
    return view.segment()
