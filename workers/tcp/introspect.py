"""One TCP connection as a record: for ``stackctl conns`` (what ``ss -tin`` shows), and when it ends.

Contract: reads a :class:`~workers.tcp.connection.Connection` and the state
its roles own (``conn.sender``, ``conn.receiver``, ``conn.options``), and
changes nothing. Also a segment's
options as the fields of the ``tcp_in`` debug record.
"""

from __future__ import annotations

from typing import Any

from pipeline.flow import Flow
from pipeline.wire.tcp import TcpOptions
from pipeline.wire.addr import fmt_addr, fmt_endpoint

COUNTERS = ("bytes_sent", "bytes_received", "bytes_acked", "segments_in", "segments_out", "retransmissions",
            "timeouts", "fast_retransmits", "loss_probes", "lost_retransmissions", "dup_acks", "ooo_segments",
            "zero_window_probes", "challenge_acks", "ce_received", "ece_received")
# Connection counters in tcp_closed, the one record of a connection's life (as relay_flow is a relayed flow's).
CLOSE_STATS = ("bytes_sent", "bytes_received", "segments_in", "segments_out", "retransmissions", "timeouts",
               "fast_retransmits", "loss_probes", "lost_retransmissions", "zero_window_probes", "ooo_segments",
               "challenge_acks", "ce_received", "ece_received")


def connection_record(conn: Any, local: bytes, flow: Flow, born: float, now: float) -> dict:
    """The record of one connection (``local``: the stack's address)."""
    remote, rport, lport = flow.remote, flow.rport, flow.lport
    cfg = conn.config
    snd, opts = conn.sender, conn.options
    record: dict[str, Any] = {
        "local": fmt_endpoint(local, lport),
        "remote": fmt_endpoint(remote, rport),
        "state": conn.state.value,
        "snd_una": int(snd.snd_una),
        "snd_nxt": int(snd.snd_nxt),
        "rcv_nxt": int(conn.receiver.rcv_nxt),
        "snd_wnd": snd.snd_wnd,
        "cwnd": snd.cc.cwnd,
        "ssthresh": snd.cc.ssthresh,
        "srtt": snd.rtt.srtt,
        "rttvar": snd.rtt.rttvar,
        "rto": snd.rtt.rto,
        "mss": snd.send_mss,
        "in_recovery": snd.recovery.in_fast_recovery,
        "sack": opts.sack,
        "wscale": [opts.snd_wscale, opts.rcv_wscale] if opts.ws_ok else None,  # theirs, ours (RFC 7323 §2)
        "timestamps": opts.timestamps,
        "ecn": opts.ecn,
        "send_buffer": [len(snd.sndbuf), cfg.send_buffer],  # used, size
        "recv_buffer": [conn.readable, conn.receiver.rcv_buff],  # used, size now (autotuned up to TCP_RECV_BUFFER)
        "age": round(now - born, 3),
    }
    for name in COUNTERS:
        record[name] = getattr(conn, name, None)
    return record


def closed_record(conn: Any, flow: Flow, born: float, now: float, reason: str, established: bool) -> dict[str, object]:
    """The fields of ``tcp_closed``, the one record of a connection's life: who, how long, how much, why.

    ``established``: the handshake completed (false: a SYN that went nowhere).
    """
    fields: dict[str, object] = {"remote": fmt_addr(flow.remote), "rport": flow.rport, "lport": flow.lport}
    if flow.local:
        fields["local"] = fmt_addr(flow.local)
    fields["established"] = established
    fields["duration"] = round(now - born, 3)
    fields["reason"] = reason
    soft = conn.soft_error  # RFC 1122 §4.2.3.9: reported if the connection fails
    if soft:
        fields["soft_error"] = soft
    for name in CLOSE_STATS:
        fields[name] = getattr(conn, name)
    return fields


def options_fields(o: TcpOptions) -> dict[str, object]:
    """A segment's options, those present only, as log fields."""
    shown = {"mss": o.mss, "ws": o.window_scale, "sack_ok": o.sack_permitted or None,
             "ts": list(o.timestamp) if o.timestamp else None,
             "sack": [[a, b] for a, b in o.sack_blocks] or None}
    return {k: v for k, v in shown.items() if v is not None}
