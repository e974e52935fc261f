"""One TCP connection as a record for ``stackctl conns`` (what ``ss -tin`` shows).

Contract: reads a :class:`~workers.tcp.connection.Connection` and changes
nothing. It uses the connection's public attributes and properties; the two
details it has no property for are read from its roles through ``_ROLES``
only, each with a fallback, so a refactored connection degrades a field to
None instead of breaking the command.
"""

from __future__ import annotations

from typing import Any

from pipeline.flow import Flow
from pipeline.wire.addr import fmt_addr

# Details without a property on the connection: field -> how to read it from its roles.
_ROLES = {
    "rttvar": lambda conn: conn.sender.rtt.rttvar,       # RFC 6298 RTTVAR
    "send_queued": lambda conn: len(conn.sender.sndbuf),  # bytes unacknowledged or unsent
}
COUNTERS = ("bytes_sent", "bytes_received", "bytes_acked", "segments_in", "segments_out", "retransmissions",
            "timeouts", "fast_retransmits", "loss_probes", "lost_retransmissions", "dup_acks", "ooo_segments",
            "zero_window_probes", "challenge_acks", "ce_received", "ece_received")


def _role(conn: object, name: str) -> Any:
    try:
        return _ROLES[name](conn)
    except (AttributeError, TypeError):
        return None


def connection_record(conn: Any, local: bytes, flow: Flow, born: float, now: float) -> dict:
    """The record of one connection (``local``: the stack's address)."""
    remote, rport, lport = flow.remote, flow.rport, flow.lport
    cfg = conn.config
    record: dict[str, Any] = {
        "local": f"{fmt_addr(local)}:{lport}",
        "remote": f"{fmt_addr(remote)}:{rport}",
        "state": conn.state.value,
        "snd_una": int(conn.snd_una),
        "snd_nxt": int(conn.snd_nxt),
        "rcv_nxt": int(conn.rcv_nxt),
        "snd_wnd": conn.snd_wnd,
        "cwnd": conn.cwnd,
        "ssthresh": conn.ssthresh,
        "srtt": conn.srtt,
        "rttvar": _role(conn, "rttvar"),
        "rto": conn.rto,
        "mss": conn.send_mss,
        "in_recovery": conn.in_recovery,
        "sack": conn.sack_ok,
        "wscale": [conn.snd_wscale, conn.rcv_wscale] if conn.ws_ok else None,  # theirs, ours (RFC 7323 §2)
        "timestamps": conn.ts_ok,
        "ecn": conn.ecn_ok,
        "send_buffer": [_role(conn, "send_queued"), cfg.send_buffer],  # used, size
        "recv_buffer": [conn.readable, cfg.recv_buffer],
        "age": round(now - born, 3),
    }
    for name in COUNTERS:
        record[name] = getattr(conn, name, None)
    return record
