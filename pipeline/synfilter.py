"""Shedding a SYN flood in the kernel, before the TUN device's queue (pure: no sockets, no clock).

Why: ingress reads the device with one Python process. Under a flood of
random-source SYNs faster than it reads (``hping3 --flood``: ~110,000/s
here, against 30,000-70,000 packets/s that ingress reads), the kernel drops
packets at the device's queue (``txqueuelen``) blindly: real clients' SYNs
and retransmissions and established flows' segments alike, before
``pipeline.admission`` can prefer any of them. A filter on the device runs
in the sender's context, before the queue: what it drops costs ingress
nothing, and what it lets through fits in the queue.

What it drops: only SYN segments that open a connection (SYN without ACK,
RFC 9293 §3.10.7.2) from sources it does not know to be real, and of those
only first sightings, and only a random fraction of them. Everything else
passes untouched: established flows, every other protocol, IPv4 fragments
after the first, IPv6 packets with extension headers (the filter does not
walk them; ingress does). Kept always:

* SYNs from real sources: ``pipeline.admission``'s (a source that completed
  a handshake here is not spoofed, RFC 4987 §3.2), at most ``MAX_REAL4``
  IPv4 and ``MAX_REAL6`` IPv6 addresses, newest first;
* retransmissions: a SYN with the addresses, ports and ISN of one seen
  ``RETRY_MIN_GAP`` to ``RETRY_MAX_AGE`` before (RFC 6298 §5, RFC 9293
  §3.8.1: a real client retransmits its SYN after 1 s, 3 s, ...; a spoofing
  flood does not see our SYN-ACK and rarely repeats itself). The filter
  remembers recent SYNs in a BPF array map, as admission does in ingress.
  So a new client under a flood loses its first SYN and gets in with its
  first retransmission, a second later.

A packet too short for a field the filter reads is dropped there: it is
malformed, and ingress would drop it too (but cannot count it while the
filter is on).

The program is eBPF of type ``BPF_PROG_TYPE_SOCKET_FILTER``, attached with
``TUNSETFILTEREBPF`` (classic BPF, ``TUNATTACHFILTER``, is refused by TUN
devices: the kernel allows it only on TAP). It sees the IP header at offset
0, as ingress does. Its return value is the length to keep: 0 drops.
``program`` assembles it; ``pipeline.bpf`` creates the map and loads the
program, ``pipeline.tun`` attaches it.

``SynShedder`` decides when and how much: every ``INTERVAL`` seconds ingress
reports what it read. The filter goes on only when ingress cannot keep up
(most of its wake-ups end with packets still in the device, so the kernel
is about to drop blindly) and opening SYNs are more than ``TARGET_RATE``.
While on, dividing the SYNs read by the fraction passed estimates how many
were offered, and the fraction passes ``TARGET_RATE`` of them: half what
admission lets through, so that retransmissions the filter kept find room
there (admission cannot know them as such: it did not see the first SYN).
While ingress is still behind, what it read understates the flood, so the
fraction at least halves each interval. The filter comes off as soon as
the estimate falls to ``TARGET_RATE`` or ingress could read all that is
offered (under ``CAN_READ`` of what it read when it last fell behind), so
the stack answers everyone normally within one interval of the flood's end.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.admission import RETRY_MAX_AGE, RETRY_MIN_GAP  # a retransmission, as admission knows one
from pipeline.wire import ipv4, ipv6, tcp
from pipeline.wire.ports import SRC_PORT_OFFSET

# <linux/bpf.h> instruction classes, sizes, modes, operations.
_LD, _LDX, _STX = 0x00, 0x01, 0x03
_ALU, _JMP, _JMP32, _ALU64 = 0x04, 0x05, 0x06, 0x07
_W, _H, _B, _DW = 0x00, 0x08, 0x10, 0x18
_IMM, _ABS, _IND, _MEM = 0x00, 0x20, 0x40, 0x60
_K, _X = 0x00, 0x08
_ADD, _SUB, _MUL, _OR, _AND, _LSH, _RSH, _XOR, _MOV = 0x00, 0x10, 0x20, 0x40, 0x50, 0x60, 0x70, 0xA0, 0xB0
_JA, _JEQ, _JGT, _JGE, _JSET, _JNE = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50
_CALL, _EXIT = 0x80, 0x90
_PSEUDO_MAP_FD = 1
_FUNC_MAP_LOOKUP_ELEM, _FUNC_KTIME_GET_NS, _FUNC_GET_PRANDOM_U32 = 1, 5, 7
_R0, _R1, _R2, _R3, _R4, _R5, _R6, _R7, _R8, _R9, _R10 = range(11)

_INSN = struct.Struct("<BBhi")  # struct bpf_insn: code, dst_reg | src_reg << 4, off, imm

MAX_REAL4 = 64
MAX_REAL6 = 16
KEEP = 0x7FFFFFFF  # return value: keep the whole packet (any length up to this)

# Recent SYNs, in the kernel: a direct-mapped array of fingerprint << 32 | first sighting (in ticks of
# 2**20 ns, ~1.05 ms: a u32 that wraps after 52 days, compared modulo 2**32). A newer SYN may evict an
# older one: the cost is a missed retransmission. At 110,000 SYNs/s, 2**20 slots keep a slot 1 s with
# probability 0.9, 3 s with 0.73. 8 MB of kernel memory.
RECENT_SLOTS = 1 << 20
RECENT_VALUE_SIZE = 8
TICK_NS_SHIFT = 20
_HASH = 0x2545F491    # odd multiplier for the fingerprint hash (any odd 31-bit constant mixes)


INTERVAL = 0.25       # s between decisions
TARGET_RATE = 1000.0  # first-sighting SYNs/s from unknown sources the filter passes under a flood
CAN_READ = 0.8        # the filter comes off when ingress could read all offered with this share of its pace
MIN_FRACTION = 1 / 65536
ONE = 1 << 32         # fractions are thresholds on a random u32


def ticks(seconds: float) -> int:
    """Seconds in the filter's clock ticks."""
    return int(seconds * 1e9) >> TICK_NS_SHIFT


def _s32(value: int) -> int:
    """A u32 immediate as the s32 the instruction holds (JMP32 compares the low 32 bits)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


class _Assembler:
    """Instructions with jumps to named labels, resolved at the end."""

    def __init__(self) -> None:
        self.insns: list[tuple[int, int, int | str, int]] = []  # code, regs, offset or label, imm
        self.labels: dict[str, int] = {}

    def emit(self, code: int, dst: int = 0, src: int = 0, off: int | str = 0, imm: int = 0) -> None:
        self.insns.append((code, dst | src << 4, off, _s32(imm)))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def load(self, size: int, offset: int) -> None:
        """r0 = the packet's big-endian value at ``offset`` (a short packet ends the program: dropped).
        Like every packet load, it clobbers r1-r5."""
        self.emit(_LD | _ABS | size, imm=offset)

    def jump(self, op: int, value: int, target: str, reg: int = _R0) -> None:
        self.emit(_JMP32 | op | _K, reg, off=target, imm=value)

    def alu(self, op: int, dst: int, imm: int) -> None:
        self.emit(_ALU64 | op | _K, dst, imm=imm)

    def alu_reg(self, op: int, dst: int, src: int) -> None:
        self.emit(_ALU64 | op | _X, dst, src)

    def mix(self) -> None:
        """r9 = (r9 ^ r0) * _HASH: fold the word just loaded into the fingerprint."""
        self.alu_reg(_XOR, _R9, _R0)
        self.alu(_MUL, _R9, _HASH)

    def call(self, func: int) -> None:
        self.emit(_JMP | _CALL, imm=func)

    def assemble(self) -> bytes:
        out = bytearray()
        for at, (code, regs, off, imm) in enumerate(self.insns):
            if isinstance(off, str):
                off = self.labels[off] - at - 1
            out += _INSN.pack(code, regs, off, imm)
        return bytes(out)


def program(fraction: int, real4: Sequence[bytes], real6: Sequence[bytes], recent_fd: int,
            min_gap: int = ticks(RETRY_MIN_GAP), max_age: int = ticks(RETRY_MAX_AGE)) -> bytes:
    """The filter: keep all but opening SYNs from unknown sources; of those, keep retransmissions
    (the same addresses, ports and ISN seen ``min_gap`` to ``max_age`` ticks before, in ``recent_fd``:
    an array map of ``RECENT_SLOTS`` values of ``RECENT_VALUE_SIZE`` bytes) and ``fraction``/2**32 of
    the rest."""
    if not 0 <= fraction < ONE:
        raise ValueError("fraction must be in [0, 2**32): at 2**32 no filter is needed")
    a = _Assembler()
    a.alu_reg(_MOV, _R6, _R1)  # r6 = the skb, as the packet loads require
    a.load(_B, 0)
    a.alu(_AND, _R0, 0xF0)
    a.jump(_JEQ, 0x40, "ipv4")
    a.jump(_JEQ, 0x60, "ipv6")
    a.emit(_JMP | _JA, off="keep")

    a.label("ipv4")
    a.load(_B, ipv4.PROTOCOL_OFFSET)
    a.jump(_JNE, ipv4.PROTO_TCP, "keep")
    a.load(_H, ipv4.FLAGS_FRAG_OFFSET)
    a.jump(_JSET, ipv4.FRAG_OFFSET_MASK, "keep")  # not a first fragment: no TCP header here
    a.load(_B, ipv4.VER_IHL_OFFSET)
    a.alu(_AND, _R0, 0x0F)
    a.alu(_LSH, _R0, 2)
    a.alu_reg(_MOV, _R7, _R0)  # r7 = IPv4 header length (ipv4.header_len_of)
    a.emit(_LD | _IND | _B, src=_R7, imm=tcp.FLAGS_OFFSET)
    a.alu(_AND, _R0, tcp.SYN | tcp.ACK)
    a.jump(_JNE, tcp.SYN, "keep")
    a.load(_W, ipv4.SRC_OFFSET)
    for addr in real4[:MAX_REAL4]:
        a.jump(_JEQ, int.from_bytes(addr, "big"), "keep")
    a.alu(_MOV, _R9, 0)
    a.mix()
    a.emit(_LD | _IND | _W, src=_R7, imm=SRC_PORT_OFFSET)  # both ports
    a.mix()
    a.emit(_LD | _IND | _W, src=_R7, imm=tcp.SEQ_OFFSET)  # the ISN
    a.mix()
    a.emit(_JMP | _JA, off="recent")

    a.label("ipv6")
    a.load(_B, ipv6.NEXT_HEADER_OFFSET)  # TCP right after the fixed header only
    a.jump(_JNE, ipv6.TCP, "keep")
    a.load(_B, ipv6.HEADER_LEN + tcp.FLAGS_OFFSET)
    a.alu(_AND, _R0, tcp.SYN | tcp.ACK)
    a.jump(_JNE, tcp.SYN, "keep")
    for n, addr in enumerate(real6[:MAX_REAL6]):
        words = struct.unpack("!4I", addr)
        for i, word in enumerate(words):
            a.load(_W, ipv6.SRC_OFFSET + 4 * i)
            if i < 3:
                a.jump(_JNE, word, f"next6_{n}")
            else:
                a.jump(_JEQ, word, "keep")
        a.label(f"next6_{n}")
    a.alu(_MOV, _R9, 0)
    source6 = [ipv6.SRC_OFFSET + 4 * i for i in range(ipv6.ADDRESS_LEN // 4)]
    for offset in (*source6, ipv6.HEADER_LEN + SRC_PORT_OFFSET, ipv6.HEADER_LEN + tcp.SEQ_OFFSET):
        a.load(_W, offset)  # the source address, both ports, the ISN
        a.mix()

    # r9: the fingerprint hash. Its low bits pick the slot, its high 32 bits are the mark kept there.
    a.label("recent")
    a.alu_reg(_MOV, _R1, _R9)
    a.alu(_AND, _R1, RECENT_SLOTS - 1)
    a.emit(_STX | _MEM | _W, _R10, _R1, off=-4)  # the key, on the stack
    a.emit(_LD | _IMM | _DW, _R1, _PSEUDO_MAP_FD, imm=recent_fd)
    a.emit(0)  # the second half of the 64-bit immediate
    a.alu_reg(_MOV, _R2, _R10)
    a.alu(_ADD, _R2, -4)
    a.call(_FUNC_MAP_LOOKUP_ELEM)
    a.emit(_JMP | _JEQ | _K, _R0, off="sample", imm=0)  # cannot happen for an array; the verifier asks
    a.alu_reg(_MOV, _R7, _R0)  # r7 = the slot
    a.call(_FUNC_KTIME_GET_NS)
    a.alu(_RSH, _R0, TICK_NS_SHIFT)
    a.alu_reg(_MOV, _R8, _R0)  # r8 = now, in ticks
    a.emit(_LDX | _MEM | _DW, _R3, _R7)
    a.alu_reg(_MOV, _R4, _R3)
    a.alu(_RSH, _R4, 32)  # the mark kept there
    a.alu_reg(_MOV, _R5, _R9)
    a.alu(_RSH, _R5, 32)  # this SYN's mark
    a.emit(_JMP | _JNE | _X, _R4, _R5, off="new")
    a.emit(_ALU | _SUB | _X, _R8, _R3)  # w8 = now - first sighting, modulo 2**32 (the original r8 is not needed)
    a.jump(_JGT, max_age, "renew", reg=_R8)
    a.jump(_JGE, min_gap, "keep", reg=_R8)  # a retransmission: keep, and keep the first sighting's time
    a.emit(_JMP | _JA, off="sample")  # a repeat within the gap: not a client's retransmission
    a.label("renew")
    a.emit(_ALU | _ADD | _X, _R8, _R3)  # w8 = now again
    a.label("new")
    a.alu(_LSH, _R5, 32)
    a.alu(_LSH, _R8, 32)
    a.alu(_RSH, _R8, 32)
    a.alu_reg(_OR, _R5, _R8)
    a.emit(_STX | _MEM | _DW, _R7, _R5)

    a.label("sample")
    a.call(_FUNC_GET_PRANDOM_U32)
    a.jump(_JGE, fraction, "drop")
    a.label("keep")
    a.alu(_MOV, _R0, KEEP)
    a.emit(_JMP | _EXIT)
    a.label("drop")
    a.alu(_MOV, _R0, 0)
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
        elif offered <= self.target_rate or read_rate - syn_rate + offered < CAN_READ * self.capacity:
            self.fraction = ONE  # the flood ended, or ingress could now read all of it
            return OFF
        wanted = int(ONE * self.target_rate / offered)
        if behind:
            wanted = min(wanted, self.fraction // 2)  # the count read is only a lower bound: at least halve
        wanted = max(wanted, int(ONE * MIN_FRACTION))
        real4 = tuple(s for s in reversed(real_sources) if len(s) == ipv4.ADDRESS_LEN)[:MAX_REAL4]
        real6 = tuple(s for s in reversed(real_sources) if len(s) == ipv6.ADDRESS_LEN)[:MAX_REAL6]
        changed = abs(wanted - self.fraction) * 5 > self.fraction  # > 20 % (or on): not every small wobble
        if not changed and (real4, real6) == (self.real4, self.real6):
            return None
        self.fraction, self.real4, self.real6 = wanted, real4, real6
        return Decision(wanted, real4, real6)
