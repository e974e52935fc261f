"""What the sender owns, as recovery reads it: the send sequence variables and the flight.

Contract: :class:`SendState` holds the sender's state -- the RFC 9293 §3.3.1
send sequence variables (``iss``, ``snd_una``, ``snd_nxt``, ``snd_wnd``,
``snd_wl1``, ``snd_wl2``, and ``max_snd_wnd``, the largest window the peer
offered), the effective send MSS, the send buffer and our FIN's place after it,
the RTT estimator and the congestion controller -- and the queries on it.  The
sender (:mod:`sender`) is its subclass and its only writer; the recovery
modules receive it typed as this class, read it and call only its queries, so
they depend on no module that depends on them.  The congestion controller is
the sender's, lent to recovery, which applies the loss responses of RFC 5681,
6582 and 6937 to it.
"""

from __future__ import annotations

from pipeline.wire.seqnum import seq_add, seq_gt, seq_le, seq_sub
from workers.tcp.config import TcpConfig
from workers.tcp.congestion import CongestionControl, make_congestion_control
from workers.tcp.counters import Counters
from workers.tcp.options import DEFAULT, Negotiated
from workers.tcp.outbox import Outbox
from workers.tcp.rtt import RttEstimator
from workers.tcp.sendbuf import SendBuffer
from workers.tcp.timers import TimerTable


class SendState:
    """The sender's variables (RFC 9293 §3.3.1) and read-only questions about them."""

    __slots__ = ("config", "timers", "stats", "out", "options", "iss", "snd_una", "snd_nxt", "snd_wnd", "snd_wl1",
                 "snd_wl2", "max_snd_wnd", "send_mss", "sndbuf", "buf_seq", "fin_queued", "fin_seq", "rtt", "cc",
                 "path_mss")

    def __init__(self, config: TcpConfig, iss: int, timers: TimerTable, stats: Counters, out: Outbox,
                 rtt: RttEstimator) -> None:
        self.config = config
        self.timers = timers
        self.stats = stats
        self.out = out
        self.options = DEFAULT
        self.iss = self.snd_una = self.snd_nxt = self.snd_wl2 = iss
        self.snd_wnd = self.max_snd_wnd = self.snd_wl1 = 0
        self.send_mss = DEFAULT.send_mss(config)  # RFC 9293 §3.7.1 Eff.snd.MSS
        self.sndbuf = SendBuffer()  # unacknowledged and unsent data; byte 0 has sequence buf_seq
        self.buf_seq = seq_add(iss, 1)
        self.fin_queued = False
        self.fin_seq = iss  # sequence number of our FIN once close() was called
        self.rtt = rtt
        self.cc: CongestionControl = make_congestion_control(config.congestion, self.send_mss)
        self.path_mss: int | None = None  # segment size the path takes (PMTUD), if it said less than the MSS

    def negotiated(self, options: Negotiated) -> None:
        """The SYNs agreed: the MSS is known, the congestion controller starts with it."""
        self.options = options
        self.send_mss = options.send_mss(self.config)
        self.cc = make_congestion_control(self.config.congestion, self.send_mss)

    def data_end(self) -> int:
        """Sequence number after the last byte the application queued."""
        return seq_add(self.buf_seq, len(self.sndbuf))

    def fin_pending(self) -> bool:
        """Our FIN is queued and not yet sent."""
        return self.fin_queued and seq_le(self.snd_nxt, self.fin_seq)

    def has_unsent(self) -> bool:
        """Data or our FIN waits to be sent for the first time."""
        return seq_gt(self.data_end(), self.snd_nxt) or self.fin_pending()

    def max_segment(self) -> int:
        """Payload of a full segment without options: the MSS, or less if the path said so (PMTUD)."""
        mss = min(self.options.peer_mss, self.config.mss)
        return mss if self.path_mss is None or self.path_mss >= mss else self.path_mss

    def max_payload(self, option_len: int) -> int:
        """Largest payload of one emitted segment (RFC 9293 §3.7.1, or the TSO limit)."""
        if self.config.max_send_segment is not None:
            return self.config.max_send_segment
        return self.max_segment() - option_len

    def room(self) -> int:
        """Largest payload of a segment sent now, with the options it would carry."""
        return self.max_payload(self.out.rcv.option_len())

    def cut(self, seq: int, limit: int, room: int) -> int:
        """Sequence space one segment at seq of at most limit octets takes (data, then our FIN),
        ``room`` being :meth:`room`: what the sender's transmission of it will use."""
        n = max(0, min(limit, seq_sub(self.data_end(), seq), room))
        fin = self.fin_queued and limit > n and seq_add(seq, n) == self.fin_seq
        return n + 1 if fin else n
