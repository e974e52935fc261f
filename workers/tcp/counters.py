"""The counters of one connection: plain ints, the one thing every role of it writes.

Contract: each role is handed the connection's :class:`Counters` and
increments the counters of its own events (gVisor's ``ep.stats``): the
connection counts segments and drops, the sender retransmissions, timeouts and
probes, the receiver out-of-order segments and challenge ACKs.  One is read
to decide: whether our SYN timed out (RFC 6298 §5.7, the sender).
:class:`~workers.tcp.connection.Connection` inherits them, so the shell
and ``stackctl`` read ``conn.retransmissions`` by name.
"""

from __future__ import annotations


class Counters:
    """Per-connection counters (RFC-neutral; what the shell logs when the connection closes)."""

    __slots__ = (
        "segments_in", "segments_out", "retransmissions", "timeouts", "fast_retransmits", "dup_acks",
        "challenge_acks", "challenge_acks_suppressed", "invalid_segments", "paws_rejected", "ooo_segments",
        "zero_window_probes", "keepalive_probes_sent", "bytes_sent", "bytes_received", "bytes_acked",
        "loss_probes", "lost_retransmissions", "ce_received", "ece_received",
    )

    def __init__(self) -> None:
        # Spelled out so that the compiled class has them as typed fields.
        self.segments_in = self.segments_out = self.retransmissions = self.timeouts = self.fast_retransmits = 0
        self.dup_acks = self.challenge_acks = self.challenge_acks_suppressed = self.invalid_segments = 0
        self.paws_rejected = self.ooo_segments = self.zero_window_probes = self.keepalive_probes_sent = 0
        self.bytes_sent = self.bytes_received = self.bytes_acked = self.loss_probes = 0
        self.lost_retransmissions = self.ce_received = self.ece_received = 0
