"""The one builder of each TCP control segment that more than one place sends.

Contract: pure functions from what the RFC says the segment depends on to a
``TcpSegment``; no state, no clock. The demultiplexer uses them for
segments of no connection and for cookie SYN-ACKs, a connection's outbox
(``outbox.py``) for the reset it answers in CLOSED and for its SYN-ACK.
"""

from __future__ import annotations

from pipeline.wire.seqnum import seq_add
from pipeline.wire.tcp import Flags, TcpOptions, TcpSegment

# Built once: each IntFlag | is a Python-level call.
_RST_ACK = Flags.RST | Flags.ACK
_SYN_ACK = Flags.SYN | Flags.ACK
_SYN_ACK_ECE = _SYN_ACK | Flags.ECE


def reset_for(seg: TcpSegment) -> TcpSegment | None:
    """The reset answering seg when no connection takes it (RFC 9293 §3.10.7.1); None for a RST.

    "If the ACK bit is off, sequence number zero is used, <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>;
    if the ACK bit is on, <SEQ=SEG.ACK><CTL=RST>." A reset is never answered.
    """
    if seg.rst:
        return None
    if seg.ack_flag:
        return TcpSegment(seg.dst_port, seg.src_port, seg.ack, 0, Flags.RST, 0)
    return TcpSegment(seg.dst_port, seg.src_port, 0, seq_add(seg.seq, seg.seg_len), _RST_ACK, 0)


def syn_ack(local_port: int, remote_port: int, iss: int, rcv_nxt: int, window: int, options: TcpOptions,
            ece: bool = False) -> TcpSegment:
    """<SEQ=ISS><ACK=RCV.NXT><CTL=SYN,ACK> (RFC 9293 §3.10.7.2) with our options.

    Only options the peer's SYN offered may be passed (RFC 7323 §2.2, §3.2;
    RFC 2018 §2); the window of a SYN is never scaled (RFC 7323 §2.2). ``ece``:
    the ECN-setup SYN-ACK (RFC 3168 §6.1.1).
    """
    return TcpSegment(local_port, remote_port, iss, rcv_nxt, _SYN_ACK_ECE if ece else _SYN_ACK, min(window, 0xFFFF),
                      options=options)
