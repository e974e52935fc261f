"""One TCP connection as a record for ``stackctl conns`` (what ``ss -tin`` shows).

Contract: reads a :class:`~workers.tcp.connection.Connection` through its
public attributes and properties, and changes nothing.
"""

from __future__ import annotations

from typing import Any

from pipeline.flow import Flow
from pipeline.wire.addr import fmt_endpoint

COUNTERS = ("bytes_sent", "bytes_received", "bytes_acked", "segments_in", "segments_out", "retransmissions",
            "timeouts", "fast_retransmits", "loss_probes", "lost_retransmissions", "dup_acks", "ooo_segments",
            "zero_window_probes", "challenge_acks", "ce_received", "ece_received")


def connection_record(conn: Any, local: bytes, flow: Flow, born: float, now: float) -> dict:
    """The record of one connection (``local``: the stack's address)."""
    remote, rport, lport = flow.remote, flow.rport, flow.lport
    cfg = conn.config
    record: dict[str, Any] = {
        "local": fmt_endpoint(local, lport),
        "remote": fmt_endpoint(remote, rport),
        "state": conn.state.value,
        "snd_una": int(conn.snd_una),
        "snd_nxt": int(conn.snd_nxt),
        "rcv_nxt": int(conn.rcv_nxt),
        "snd_wnd": conn.snd_wnd,
        "cwnd": conn.cwnd,
        "ssthresh": conn.ssthresh,
        "srtt": conn.srtt,
        "rttvar": conn.rttvar,
        "rto": conn.rto,
        "mss": conn.send_mss,
        "in_recovery": conn.in_recovery,
        "sack": conn.sack_ok,
        "wscale": [conn.snd_wscale, conn.rcv_wscale] if conn.ws_ok else None,  # theirs, ours (RFC 7323 §2)
        "timestamps": conn.ts_ok,
        "ecn": conn.ecn_ok,
        "send_buffer": [conn.send_queued, cfg.send_buffer],  # used, size
        "recv_buffer": [conn.readable, conn.receiver.rcv_buff],  # used, size now (autotuned up to TCP_RECV_BUFFER)
        "age": round(now - born, 3),
    }
    for name in COUNTERS:
        record[name] = getattr(conn, name, None)
    return record
