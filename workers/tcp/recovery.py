"""Loss recovery, the interface the sender calls (gVisor's ``recovery``): decide, never send.

Contract: the sender owns one recovery object, chosen when the SYNs agree on
SACK or not -- :class:`~workers.tcp.reno_recovery.RenoRecovery` (RFC 6582
NewReno) or :class:`~workers.tcp.sack_recovery.SackRecovery` (RFC 6675 with
RFC 6937 PRR and RFC 8985 RACK and tail loss probes) -- and reports to it:
every acceptable ACK (:meth:`Recovery.on_ack`, after SND.UNA and the window
moved), the retransmission timeout (:meth:`on_rto`), a path MTU drop
(:meth:`on_path_mtu`), a zero-window probe (:meth:`probe_sent`), its own
transmissions (:meth:`on_send`) and the recovery timers (:meth:`on_loss_probe`,
:meth:`on_reorder_timer`).  Before new data goes out it asks :meth:`output` for
the right edge up to which new data may go.  Each of these calls that may
repair a loss leaves in ``due`` what to retransmit, in order: ``(seq, limit)``
pairs, each one segment of at most ``limit`` sequence octets, which the sender
transmits right after the call.  Recovery reads the sender's state
(:class:`~workers.tcp.sendstate.SendState`) and never writes it; it predicts
the size of each segment with ``SendState.cut`` where its next decision depends
on it.  It applies the loss responses to the sender's congestion controller.

What is common lives here: the recovery point, the duplicate-ACK count and the
response to a timeout (RFC 6298 §5.4, RFC 5681 §3.1: resend the first
unacknowledged segment, then go-back-N from ``rtx_nxt``, the BSD ``snd_nxt``
rewind without breaking the RFC's ACK acceptability test; also after a probe
into a zero window).  SACK connections skip SACKed data on the way.
"""

from __future__ import annotations

import enum
from typing import Final

from pipeline.wire.seqnum import seq_add, seq_ge, seq_lt, seq_sub
from pipeline.wire.tcp import TcpSegment
from workers.tcp.sendstate import SendState
from workers.tcp.timers import Timer

DUP_ACK_THRESHOLD: Final = 3        # RFC 5681 §3.2


class RecoveryState(enum.Enum):
    OPEN = "open"                    # no loss being repaired (go-back-N after an RTO without SACK too)
    NEWRENO_RECOVERY = "newreno"     # RFC 6582 fast recovery (no SACK)
    SACK_RECOVERY = "sack"           # RFC 6675 §5 fast recovery
    RTO_RECOVERY = "rto"             # RFC 6675 §5.1: after a timeout, with SACK

    __hash__ = object.__hash__


OPEN: Final = RecoveryState.OPEN
NEWRENO: Final = RecoveryState.NEWRENO_RECOVERY
SACK: Final = RecoveryState.SACK_RECOVERY
RTO: Final = RecoveryState.RTO_RECOVERY


class Recovery:
    """What every recovery algorithm answers, and the response to a timeout."""

    __slots__ = ("snd", "state", "recover", "dupacks", "rtx_nxt", "due")

    def __init__(self, snd: SendState) -> None:
        self.snd = snd
        self.state = OPEN
        self.recover = snd.iss  # RFC 6582 recover / RFC 6675 RecoveryPoint
        self.dupacks = 0
        self.rtx_nxt: int | None = None  # go-back-N point after a timeout or a zero-window probe
        self.due: list[tuple[int, int]] = []  # what the last call decided to retransmit: (seq, limit)

    @property
    def in_fast_recovery(self) -> bool:
        """In fast recovery (RFC 6582 or RFC 6675 §5), not after a timeout."""
        return self.state is SACK or self.state is NEWRENO

    @property
    def in_loss_recovery(self) -> bool:
        return self.state is not OPEN

    def _resend(self, seq: int, limit: int) -> int:
        """Decide to retransmit one segment of at most limit octets at seq; the sequence space it takes."""
        snd = self.snd
        used = snd.cut(seq, limit, snd.room())
        if used:
            self.due.append((seq, limit))
            self.on_resend(used)
        return used

    # == the interface (NewReno's answers where SACK adds nothing) =====================

    def on_send(self, seq: int, end: int, now: float, rtx: bool) -> None:
        """The sender transmitted [seq, end) (a retransmission if rtx)."""

    def on_resend(self, used: int) -> None:
        """A retransmission of used octets was just decided."""

    def advance(self, ack: int) -> None:
        """SND.UNA moved to ack."""
        if self.rtx_nxt is not None and seq_lt(self.rtx_nxt, ack):
            self.rtx_nxt = ack

    def on_ack(self, seg: TcpSegment, old_una: int, acked: int, dup: bool, now: float) -> None:
        """An acceptable ACK after SND.UNA and the window were updated."""
        raise NotImplementedError

    def output(self, now: float) -> int | None:
        """Decide retransmissions (``due``); return the right edge for new data (None: send none)."""
        raise NotImplementedError

    def on_loss_probe(self, now: float, sends: bool) -> int:
        """The loss-probe timer (RFC 8985 §7.3): octets of new data to send as the probe, else 0
        (a retransmitted probe is in ``due``)."""
        if self.due:
            self.due.clear()
        return 0

    def on_reorder_timer(self, now: float, sends: bool) -> None:
        """The RACK reorder timer (RFC 8985 §6.2 step 5)."""
        if self.due:
            self.due.clear()

    def arm_loss_probe(self, now: float, sends: bool) -> None:
        """New data was sent or acknowledged, or a loss repaired: (re)start the PTO (RFC 8985 §7.2)."""
        self.snd.timers.cancel(Timer.LOSS_PROBE)

    def end(self) -> None:
        """Recovery is over."""
        self.state = OPEN
        self.dupacks = 0

    # == timeouts ====================================================================

    def on_rto(self, now: float, retries: int) -> None:
        """RFC 6298 §5.4 for data: resend the first segment; the rest by pipe or go-back-N.

        ``retries``: timeouts of this segment so far, this one included.
        """
        snd = self.snd
        if self.due:
            self.due.clear()
        una, nxt = snd.snd_una, snd.snd_nxt
        if snd.snd_wnd > 0:
            # RFC 5681 §3.1: loss window; RFC 6582 §4: recover = highest sent, leave recovery.
            snd.cc.on_rto(seq_sub(nxt, una), now)
            self.recover = nxt
            self.end()
        # §5.4: retransmit the earliest unacknowledged segment now (even into a zero
        # window: then it is the probe of RFC 9293 §3.8.6.1), the rest goes back-N.
        limit = min(seq_sub(nxt, una), snd.send_mss) if snd.snd_wnd > 0 else 1
        self.before_rto_resend(now)
        used = self._resend(una, limit)
        self.after_rto_resend(seq_add(una, used), retries)

    def before_rto_resend(self, now: float) -> None:
        """What a timeout ends before its retransmission (a probe's verdict, the PTO)."""
        self.snd.timers.cancel(Timer.LOSS_PROBE)

    def after_rto_resend(self, end: int, retries: int) -> None:
        """The timeout's retransmission ends at end: go back N from there (no SACK)."""
        if self.snd.snd_wnd == 0:
            self.probe_sent()
        else:
            self.rtx_nxt = end

    def probe_sent(self) -> None:
        """A probe went into a zero window (RFC 9293 §3.8.6.1): resend from SND.UNA when it opens.

        The closed window drops the probe's octet; sending on from after it would
        open the reopened window with a hole, and the duplicate ACKs would end in a
        needless fast recovery.  BSD pulls snd_nxt back to snd_una for this reason.
        """
        self.snd.stats.zero_window_probes += 1
        self.rtx_nxt = self.snd.snd_una

    def on_path_mtu(self) -> None:
        """Segments in flight were cut too large (RFC 1191 §6.3, RFC 8201 §5): resend the first
        at the new size now, as Linux's tcp_simple_retransmit does, without a congestion response."""
        snd = self.snd
        if self.due:
            self.due.clear()
        self._resend(snd.snd_una, min(seq_sub(snd.snd_nxt, snd.snd_una), snd.send_mss))

    def _unsacked_from(self, start: int) -> tuple[int, int]:
        """The first range at or after start not SACKed by the peer, up to snd_nxt."""
        return start, self.snd.snd_nxt

    def _sacked_below(self, start: int) -> int:
        """SACKed octets below start."""
        return 0

    def _go_back_n(self, edge: int | None) -> int | None:
        """After a timeout (or a zero-window probe), resend from rtx_nxt by cwnd, skipping SACKed data."""
        snd = self.snd
        una = snd.snd_una
        cwnd = snd.cc.cwnd
        wnd_edge = seq_add(una, snd.snd_wnd)
        while self.rtx_nxt is not None:
            start = self.rtx_nxt
            if seq_ge(start, snd.snd_nxt):
                self.rtx_nxt = None
                break
            start, end = self._unsacked_from(start)
            if seq_ge(start, end):
                self.rtx_nxt = None
                break
            # In flight: what lies below start and was not SACKed (RFC 6675 §2 "pipe").
            room = min(cwnd - (seq_sub(start, una) - self._sacked_below(start)), seq_sub(wnd_edge, start))
            if room <= 0:
                self.rtx_nxt = start
                return None
            used = self._resend(start, min(seq_sub(end, start), room))
            if used == 0:
                self.rtx_nxt = None
                break
            self.rtx_nxt = seq_add(start, used)
        return edge
