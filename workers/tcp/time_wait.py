"""Connections in TIME-WAIT: the table with its cap, and when a new SYN may end one early.

Contract: sans-IO helper of the demux, which owns the connections. A
connection stays in TIME-WAIT for 2 MSL (RFC 9293 §3.6.1, its own timer);
this module only keeps the flows in it, oldest first, and

- caps them: each is a whole connection (~5 kB) for 2 MSL, so a client
  churning connections would grow the worker without bound. Past
  ``limit``, :meth:`TimeWait.hold` names the oldest, which the demux ends
  early, as Linux drops TIME-WAIT sockets past ``tcp_max_tw_buckets``
  (counted as ``time_wait_overflow``);
- says whether a new SYN for the flow may reopen it (RFC 6191,
  :func:`reusable`) and with which ISN (:func:`reopen_isn`).
"""

from __future__ import annotations

from pipeline.flow import Flow
from pipeline.wire.seqnum import seq_add, seq_gt, seq_sub
from pipeline.wire.tcp import TcpSegment
from workers.core import Sink
from workers.tcp.connection import Connection

# Linux (tcp_timewait_state_process): a reopened connection's ISN is the old SND.NXT plus this.
TIME_WAIT_ISN_GAP = 65535 + 2


class TimeWait:
    """The flows whose connection is in TIME-WAIT, oldest first, at most ``limit`` of them."""

    def __init__(self, sink: Sink, limit: int) -> None:
        self.sink = sink
        self.limit = limit
        self.held: dict[Flow, None] = {}  # insertion order: the oldest first

    def __len__(self) -> int:
        return len(self.held)

    def hold(self, key: Flow) -> Flow | None:
        """``key`` entered TIME-WAIT; past the limit, the flow whose TIME-WAIT must end now."""
        held = self.held
        held[key] = None
        if len(held) <= self.limit:
            return None
        self.sink.counters["time_wait_overflow"] += 1
        return next(iter(held))

    def discard(self, key: Flow) -> None:
        self.held.pop(key, None)


def reusable(conn: Connection, syn: TcpSegment, timestamps: bool) -> bool:
    """May this SYN reopen a connection in TIME-WAIT? (RFC 6191 §2)

    ``timestamps``: our configuration allows them for the new incarnation.
    With timestamps on both incarnations the SYN's TSval must be newer than
    TS.Recent (or equal, with a sequence number above RCV.NXT); otherwise its
    sequence number must be above RCV.NXT (RFC 1122 §4.2.2.13). A SYN that
    fails is an old duplicate, left to the TIME-WAIT connection as before.
    """
    ts = syn.options.timestamp
    rcv = conn.receiver
    if conn.options.timestamps and timestamps and ts is not None:
        newer = seq_sub(ts[0], rcv.ts_recent)  # RFC 7323 §5.3: timestamps compare modulo 2**32
        if newer != 0:
            return newer > 0
    return seq_gt(syn.seq, rcv.rcv_nxt)


def reopen_isn(old: Connection) -> int:
    """The next incarnation's ISN: above every sequence number the old one used (RFC 9293 §3.6.1 (1)).

    Like Linux we take its SND.NXT + 65535 + 2.
    """
    return seq_add(old.sender.snd_nxt, TIME_WAIT_ISN_GAP)
