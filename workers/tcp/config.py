"""Per-connection TCP tunables (one frozen value shared by every connection of a worker).

The defaults here are the core's, for whoever builds connections directly (the
unit and simulation tests, the micro-benchmark): they follow the RFCs. They are
not the operator's: the TCP worker passes every field that is a setting from
``pipeline.config.tcp_settings()``, where each setting's default and check live
(its buffers default to 1 MiB, the core's to 256 KiB). ``max_send_segment`` exists for a later TSO path where the
shell splits large segments, so the connection core never assumes one MSS per segment.

``recv_buffer`` is the *largest* receive buffer a connection may grow to: the window
scale is chosen from it at SYN time (RFC 7323 §2.3: the scale cannot change later).
Each connection starts with :meth:`TcpConfig.initial_recv_buffer` and grows toward
``recv_buffer`` as its application reads (``receiver.py``, Linux's receive-buffer
autotuning); ``recv_buffer_initial=recv_buffer`` gives a fixed buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

INITIAL_RECV_BUFFER = 64 * 1024  # see TcpConfig.initial_recv_buffer
INITIAL_RECV_SEGMENTS = 4


@dataclass(frozen=True, slots=True)
class TcpConfig:
    mss: int = 1460                 # our receive MSS advertised (device MTU - 40)
    recv_buffer: int = 256 * 1024   # largest receive buffer (bytes); the window scale is chosen from it
    recv_buffer_initial: int | None = None  # buffer a connection starts with (None: see initial_recv_buffer)
    send_buffer: int = 256 * 1024   # bytes the app may queue before send() accepts no more
    congestion: str = "newreno"     # or "cubic"
    msl: float = 30.0               # TIME_WAIT lasts 2*MSL (RFC 9293 §3.4.2)
    delayed_ack: float = 0.04       # seconds; RFC 9293 §3.8.6.3 (ACK at least every 2 full segments)
    nagle: bool = True              # RFC 9293 §3.7.4
    keepalive: float | None = None  # idle seconds before probes (off by default), RFC 9293 §3.8.4
    keepalive_interval: float = 75.0
    keepalive_probes: int = 9
    initial_rto: float = 1.0        # RFC 6298 §2.1
    min_rto: float = 0.2
    max_rto: float = 60.0
    max_retries: int = 8            # data/FIN retransmissions before abort (R2, RFC 9293 §3.8.3)
    max_syn_retries: int = 5        # SYN / SYN-ACK retransmissions before abort
    window_scaling: bool = True     # RFC 7323 §2
    timestamps: bool = True         # RFC 7323 §3
    sack: bool = True               # RFC 2018
    max_send_segment: int | None = None  # largest payload per emitted segment; None = peer MSS
    fin_wait2_timeout: float = 60.0  # seconds in FIN-WAIT-2 after close() (Linux tcp_fin_timeout)
    ecn: bool = True                # RFC 3168: accept ECN when the peer's SYN asks for it

    def __post_init__(self) -> None:
        if self.mss < 64 or self.mss > 65495:
            raise ValueError(f"mss out of range: {self.mss}")
        if self.recv_buffer < self.mss or self.send_buffer < 1:
            raise ValueError("buffers must hold at least one segment")
        # A SYN (ours, or a SYN-cookie SYN-ACK) offers min(recv_buffer, 65535) unscaled, and an
        # offered window is never withdrawn (RFC 7323 §2.4): the initial buffer must cover it.
        if self.recv_buffer_initial is not None and not (
                min(self.recv_buffer, 0xFFFF) <= self.recv_buffer_initial <= self.recv_buffer):
            raise ValueError("recv_buffer_initial must be in min(recv_buffer, 65535)..recv_buffer")
        if self.max_send_segment is not None and self.max_send_segment < 1:
            raise ValueError("max_send_segment must be positive")
        if not self.fin_wait2_timeout > 0:  # also rejects NaN
            raise ValueError("fin_wait2_timeout must be positive")

    def initial_recv_buffer(self) -> int:
        """The receive buffer (RCV.BUFF) a connection starts with, before autotuning grows it.

        By default 64 KiB -- the most a SYN can offer unscaled (RFC 7323 §2.2), so the
        window of our SYN is always covered -- or four full segments if that is more,
        so that with an ACK every second full segment (RFC 5681 §4.2) a sender at a
        large MSS always has a segment to send.  Linux starts near 64 KiB too
        (``tcp_rmem[1]`` of 128 KiB, half of it window).  Never above ``recv_buffer``.
        """
        if self.recv_buffer_initial is not None:
            return self.recv_buffer_initial
        return min(self.recv_buffer, max(INITIAL_RECV_BUFFER, INITIAL_RECV_SEGMENTS * self.mss))
