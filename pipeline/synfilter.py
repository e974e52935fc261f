"""Shedding a SYN flood in the kernel, before the TUN device's queue (pure: no sockets, no clock).

Why: ingress reads the device with one Python process. Under a flood of
random-source SYNs faster than it reads (``hping3 --flood``: ~110,000/s
here, ingress reads ~30,000 packets/s on the core hping3 leaves), the
kernel drops packets at the device's queue (``txqueuelen``), blindly: real
clients' SYNs and retransmissions and established flows' segments alike,
before ``pipeline.admission`` can prefer any of them. A filter on the
device runs in the sender's context, before the queue: what it drops costs
ingress nothing, and what it lets through fits in the queue.

What it drops: only SYN segments that open a connection (SYN without ACK,
RFC 9293 §3.10.7.2), only from sources it does not know to be real, and
only a random fraction of those. Everything else passes untouched:
established flows, every other protocol, IPv4 fragments after the first,
IPv6 packets with extension headers (the filter does not walk them; ingress
does). A packet too short for a field the filter reads is dropped there:
it is malformed, and ingress would drop it too (but not count it while the
filter is on). The real sources are ``pipeline.admission``'s (a source that holds
an established flow here completed a handshake, so it is not spoofed, RFC
4987 §3.2), at most ``MAX_REAL4`` IPv4 and ``MAX_REAL6`` IPv6 addresses,
newest first. A new, unknown client under a flood gets the same odds per
SYN as a spoofed one.

The program is eBPF of type ``BPF_PROG_TYPE_SOCKET_FILTER``, attached with
``TUNSETFILTEREBPF`` (classic BPF, ``TUNATTACHFILTER``, is refused by TUN
devices: the kernel allows it only on TAP). It sees the IP header at offset
0, as ingress does. Its return value is the length to keep: 0 drops.
``program`` assembles it; ``pipeline.bpf`` loads it and ``pipeline.tun``
attaches it.

``SynShedder`` decides when and how much: every ``INTERVAL`` seconds ingress
reports what it read. The filter goes on only when ingress cannot keep up
(most of its wake-ups end with packets still in the device, so the kernel
is about to drop blindly) and opening SYNs are more than ``TARGET_RATE``:
below that, all SYNs reach ``pipeline.admission``, which sees every
retransmission. While on, dividing the SYNs read by the fraction passed
estimates how many were offered, and the fraction passes ``HEADROOM`` of
what ingress read when it fell behind (at least ``TARGET_RATE``): as many
as it reads with room to spare, because each SYN read is a draw for a new
client that the filter cannot tell from a spoofer, and ``pipeline.admission``
prefers a retransmission only if it read the first SYN too (while ingress
is behind, what it read understates the flood: the fraction then at least
halves each interval). It comes off as
soon as the estimate falls to ``TARGET_RATE`` or ingress could read all
that is offered (under ``HEADROOM`` + 10 % of that rate), so the stack
answers everyone normally within one interval of the flood's end.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# <linux/bpf.h> instruction classes, sizes, modes, operations.
_LD = 0x00
_JMP = 0x05
_JMP32 = 0x06
_ALU64 = 0x07
_W, _H, _B = 0x00, 0x08, 0x10
_ABS, _IND = 0x20, 0x40
_K, _X = 0x00, 0x08
_AND, _LSH, _MOV = 0x50, 0x60, 0xB0
_JA, _JEQ, _JGE, _JSET, _JNE = 0x00, 0x10, 0x30, 0x40, 0x50
_CALL, _EXIT = 0x80, 0x90
_FUNC_GET_PRANDOM_U32 = 7
_R0, _R1, _R6, _R7 = 0, 1, 6, 7

_INSN = struct.Struct("<BBhi")  # struct bpf_insn: code, dst_reg | src_reg << 4, off, imm
INSN_SIZE = _INSN.size

MAX_REAL4 = 64
MAX_REAL6 = 16
KEEP = 0x7FFFFFFF  # return value: keep the whole packet (any length up to this)

_SYN, _ACK = 0x02, 0x10
_TCP = 6
_IPV4_FRAGMENT_OFFSET = 0x1FFF

INTERVAL = 0.25       # s between decisions
TARGET_RATE = 6000.0  # opening SYNs/s from unknown sources that ingress reads under a flood, at least
HEADROOM = 0.7        # or this share of what ingress reads when it falls behind, if more
MIN_FRACTION = 1 / 4096
ONE = 1 << 32         # fractions are thresholds on a random u32


def _s32(value: int) -> int:
    """A u32 immediate as the s32 the instruction holds (JMP32 compares the low 32 bits)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


class _Assembler:
    """Instructions with forward jumps to named labels, resolved at the end."""

    def __init__(self) -> None:
        self.insns: list[tuple[int, int, int | str, int]] = []  # code, regs, offset or label, imm
        self.labels: dict[str, int] = {}

    def emit(self, code: int, dst: int = 0, src: int = 0, off: int | str = 0, imm: int = 0) -> None:
        self.insns.append((code, dst | src << 4, off, _s32(imm)))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def load(self, size: int, offset: int) -> None:
        """r0 = the packet's big-endian value at ``offset`` (a short packet ends the program: dropped)."""
        self.emit(_LD | _ABS | size, imm=offset)

    def jump(self, op: int, value: int, target: str) -> None:
        self.emit(_JMP32 | op | _K, _R0, off=target, imm=value)

    def assemble(self) -> bytes:
        out = bytearray()
        for at, (code, regs, off, imm) in enumerate(self.insns):
            if isinstance(off, str):
                off = self.labels[off] - at - 1
            out += _INSN.pack(code, regs, off, imm)
        return bytes(out)


def program(fraction: int, real4: list[bytes], real6: list[bytes]) -> bytes:
    """The filter: keep all but opening SYNs from unknown sources, of which ``fraction``/2**32 pass."""
    if not 0 <= fraction < ONE:
        raise ValueError("fraction must be in [0, 2**32): at 2**32 no filter is needed")
    a = _Assembler()
    a.emit(_ALU64 | _MOV | _X, _R6, _R1)  # r6 = the skb, as the packet loads require
    a.load(_B, 0)
    a.emit(_ALU64 | _AND | _K, _R0, imm=0xF0)
    a.jump(_JEQ, 0x40, "ipv4")
    a.jump(_JEQ, 0x60, "ipv6")
    a.emit(_JMP | _JA, off="keep")

    a.label("ipv4")
    a.load(_B, 9)
    a.jump(_JNE, _TCP, "keep")
    a.load(_H, 6)
    a.jump(_JSET, _IPV4_FRAGMENT_OFFSET, "keep")  # not a first fragment: no TCP header here
    a.load(_B, 0)
    a.emit(_ALU64 | _AND | _K, _R0, imm=0x0F)
    a.emit(_ALU64 | _LSH | _K, _R0, imm=2)
    a.emit(_ALU64 | _MOV | _X, _R7, _R0)  # r7 = IPv4 header length
    a.emit(_LD | _IND | _B, src=_R7, imm=13)  # TCP flags
    a.emit(_ALU64 | _AND | _K, _R0, imm=_SYN | _ACK)
    a.jump(_JNE, _SYN, "keep")
    a.load(_W, 12)  # source address
    for addr in real4[:MAX_REAL4]:
        a.jump(_JEQ, int.from_bytes(addr, "big"), "keep")
    a.emit(_JMP | _JA, off="sample")

    a.label("ipv6")
    a.load(_B, 6)  # next header: TCP right after the fixed header only
    a.jump(_JNE, _TCP, "keep")
    a.load(_B, 40 + 13)
    a.emit(_ALU64 | _AND | _K, _R0, imm=_SYN | _ACK)
    a.jump(_JNE, _SYN, "keep")
    for n, addr in enumerate(real6[:MAX_REAL6]):
        words = struct.unpack("!4I", addr)
        for i, word in enumerate(words):
            a.load(_W, 8 + 4 * i)
            if i < 3:
                a.jump(_JNE, word, f"next6_{n}")
            else:
                a.jump(_JEQ, word, "keep")
        a.label(f"next6_{n}")

    a.label("sample")
    a.emit(_JMP | _CALL, imm=_FUNC_GET_PRANDOM_U32)
    a.jump(_JGE, fraction, "drop")
    a.label("keep")
    a.emit(_ALU64 | _MOV | _K, _R0, imm=KEEP)
    a.emit(_JMP | _EXIT)
    a.label("drop")
    a.emit(_ALU64 | _MOV | _K, _R0, imm=0)
    a.emit(_JMP | _EXIT)
    return a.assemble()


@dataclass(frozen=True)
class Decision:
    """What the filter on the device should be: None to take it off, else the program's inputs."""

    fraction: int | None
    real4: tuple[bytes, ...]
    real6: tuple[bytes, ...]


OFF = Decision(None, (), ())


@dataclass(frozen=True)
class Reading:
    """Ingress's running counts since it started; ``SynShedder`` works on their differences."""

    packets: int  # packets read from the device
    syns: int     # of which opening SYNs
    drains: int   # wake-ups that read the device
    full: int     # of which ended with the device still holding packets (a full batch)


class SynShedder:
    """Chooses the filter from what ingress reads; ``tick`` says when it should change."""

    def __init__(self, now: float, target_rate: float = TARGET_RATE, interval: float = INTERVAL) -> None:
        self.target_rate = target_rate
        self.interval = interval
        self.fraction = ONE  # what the attached filter lets through (ONE: no filter)
        self.real4: tuple[bytes, ...] = ()
        self.real6: tuple[bytes, ...] = ()
        self.capacity = 0.0  # packets/s ingress read the last time it could not keep up
        self._last = Reading(0, 0, 0, 0)
        self._since = now

    def next_deadline(self) -> float:
        return self._since + self.interval

    def tick(self, now: float, reading: Reading, real_sources: list[bytes]) -> Decision | None:
        """At ``next_deadline``: the filter to attach now, or None to leave it as it is.
        ``real_sources``: ``pipeline.admission``'s, oldest first."""
        elapsed = now - self._since
        if elapsed < self.interval:
            return None
        last, self._last, self._since = self._last, reading, now
        read_rate = (reading.packets - last.packets) / elapsed
        syn_rate = (reading.syns - last.syns) / elapsed
        drains = reading.drains - last.drains
        # Behind: most wake-ups left packets in the device, so its queue fills and the kernel drops blindly.
        behind = drains > 0 and 2 * (reading.full - last.full) >= drains
        if behind:
            self.capacity = read_rate
        offered = syn_rate * ONE / self.fraction  # opening SYNs that reached the filter, per second
        if self.fraction == ONE:
            if not behind or offered <= self.target_rate:
                return None  # ingress keeps up, or it is not SYNs that it cannot keep up with
        elif offered <= self.target_rate or read_rate - syn_rate + offered < (HEADROOM + 0.1) * self.capacity:
            self.fraction = ONE  # the flood ended, or ingress could now read all of it
            return OFF
        # As many SYNs as ingress can read with room to spare: every SYN read is a draw for a client the
        # filter cannot tell from a spoofer, and a retransmission is preferred only if its first was read.
        rate = max(self.target_rate, HEADROOM * self.capacity)
        wanted = int(ONE * rate / offered)
        if behind:
            wanted = min(wanted, self.fraction // 2)  # the count read is only a lower bound: at least halve
        wanted = max(wanted, int(ONE * MIN_FRACTION))
        real4 = tuple(s for s in reversed(real_sources) if len(s) == 4)[:MAX_REAL4]
        real6 = tuple(s for s in reversed(real_sources) if len(s) == 16)[:MAX_REAL6]
        changed = abs(wanted - self.fraction) * 5 > self.fraction  # > 20 % (or on): not every small wobble
        if not changed and (real4, real6) == (self.real4, self.real6):
            return None
        self.fraction, self.real4, self.real6 = wanted, real4, real6
        return Decision(wanted, real4, real6)
