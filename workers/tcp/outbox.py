"""The one place that builds a connection's segments (gVisor ``ep.sendRaw``).

Contract: the connection owns one :class:`Outbox`; the connection and the
sender hand it what they send -- sequence number, flags, payload -- and it
adds what every segment carries from the receiver: the ACK of RCV.NXT, the
window (:meth:`Receiver.acknowledge`), the options (timestamps, SACK blocks)
and ECE while an ECN echo is due (RFC 3168 §6.1.3).  SYNs and resets carry
no acknowledgment part of ours beyond what the RFC prescribes.  Segments wait
in order until the connection takes them (:meth:`take`).
"""

from __future__ import annotations

from pipeline.wire.tcp import Flags, TcpOptions, TcpSegment
from workers.tcp.receiver import Receiver
from workers.tcp.segments import reset_for, syn_ack


class Outbox:
    """Segments built and waiting for the shell."""

    __slots__ = ("local_port", "remote_port", "rcv", "segments")

    def __init__(self, local_port: int, remote_port: int, rcv: Receiver) -> None:
        self.local_port = local_port
        self.remote_port = remote_port
        self.rcv = rcv
        self.segments: list[TcpSegment] = []

    def send(self, seq: int, flags: Flags, payload: bytes, now: float, options: TcpOptions | None = None) -> None:
        """A non-SYN segment at seq; ACK, window and (unless given) options from the receiver."""
        rcv = self.rcv
        if options is None:
            options = rcv.segment_options(now)[0]
        if rcv.ece:
            flags |= Flags.ECE  # RFC 3168 §6.1.3: every ACK until the peer's CWR
        window = rcv.acknowledge(now)
        self.segments.append(TcpSegment(self.local_port, self.remote_port, seq, rcv.rcv_nxt, flags, window, payload,
                                        options))

    def ack(self, seq: int, now: float) -> None:
        """A pure ACK at seq (SND.NXT, or SND.NXT - 1 for a keepalive, RFC 9293 §3.8.4)."""
        self.send(seq, Flags.ACK, b"", now)

    def syn(self, iss: int, flags: Flags, window: int, options: TcpOptions) -> None:
        """Our SYN (RFC 9293 §3.10.1): <SEQ=ISS><CTL=SYN>, the window unscaled (RFC 7323 §2.2)."""
        self.segments.append(TcpSegment(self.local_port, self.remote_port, iss, 0, flags, window, options=options))

    def syn_ack(self, iss: int, window: int, options: TcpOptions, ece: bool) -> None:
        """Our SYN-ACK <SEQ=ISS><ACK=RCV.NXT><CTL=SYN,ACK> (RFC 9293 §3.10.7.2)."""
        rcv = self.rcv
        rcv.syn_advertised(window)
        self.segments.append(syn_ack(self.local_port, self.remote_port, iss, rcv.rcv_nxt, window, options, ece=ece))

    def rst(self, seq: int) -> None:
        """<SEQ=seq><CTL=RST>."""
        self.segments.append(TcpSegment(self.local_port, self.remote_port, seq, 0, Flags.RST, 0))

    def reset_for(self, seg: TcpSegment) -> None:
        """RFC 9293 §3.10.7.1: the reset answering seg in CLOSED (none for a reset)."""
        rst = reset_for(seg)
        if rst is not None:
            self.segments.append(rst)

    def take(self) -> list[TcpSegment]:
        """Everything built since the last call, in order."""
        out = self.segments
        self.segments = []
        return out
