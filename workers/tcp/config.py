"""Per-connection TCP tunables (one frozen value shared by every connection of a worker).

Defaults follow the RFCs; ``max_send_segment`` exists for a later TSO path where the
shell splits large segments, so the connection core never assumes one MSS per segment.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TcpConfig:
    mss: int = 1460                 # our receive MSS advertised (device MTU - 40)
    recv_buffer: int = 256 * 1024   # receive buffer bytes: honest rcv_wnd, window scale chosen from it
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
        if self.max_send_segment is not None and self.max_send_segment < 1:
            raise ValueError("max_send_segment must be positive")
        if not self.fin_wait2_timeout > 0:  # also rejects NaN
            raise ValueError("fin_wait2_timeout must be positive")
