"""The TCP worker process: ``python -m workers.tcp`` (scale with ``honcho start -c tcp=N``)."""

from __future__ import annotations

import os

from pipeline.config import env_bool, env_float, env_int, env_str, forward_policy, published
from pipeline.process import Process
from workers import shell
from workers.services import registry
from workers.attach.relay import Keepalive
from workers.tcp.config import TcpConfig
from workers.tcp.demux import MAX_TIME_WAIT, SYN_QUEUE_LIMIT, TcpDemux
from workers.attach.tcp import CONNECT_TIMEOUT, TcpRelay


# With TSO the kernel cuts our segments to the MSS: emit up to this much payload
# at once (an IPv4 packet is at most 65535 bytes, headers and options included).
TSO_MAX_SEGMENT = 65535 - 20 - 60


def tcp_config(mtu: int, offload: bool) -> TcpConfig:
    """TcpConfig from the environment (each variable is in the README's table)."""
    congestion = env_str("TCP_CONGESTION", "newreno").lower()
    if congestion not in ("newreno", "cubic"):
        raise SystemExit(f"TCP_CONGESTION={congestion!r}: expected newreno or cubic")
    keepalive = env_float("TCP_KEEPALIVE", 0.0)
    fin_wait2_timeout = env_float("TCP_FIN_WAIT2_TIMEOUT", 60.0)
    if not fin_wait2_timeout > 0:
        raise SystemExit(f"TCP_FIN_WAIT2_TIMEOUT={fin_wait2_timeout}: expected seconds > 0")
    return TcpConfig(
        mss=mtu - 40,  # RFC 9293 §3.7.1: MTU minus fixed IPv4 and TCP headers
        # 1 MiB each: the pipeline's round trip is long next to a kernel's, so in-flight data
        # (not CPU) limits bulk throughput; bench: +15-20 % over 256 KiB, no gain beyond.
        # Buffers fill only as data arrives, so idle connections cost nothing for it.
        recv_buffer=env_int("TCP_RECV_BUFFER", 1 << 20),
        send_buffer=env_int("TCP_SEND_BUFFER", 1 << 20),
        congestion=congestion,
        msl=env_float("TCP_MSL", 30.0),
        delayed_ack=env_float("TCP_DELAYED_ACK", 0.04),
        nagle=env_bool("TCP_NAGLE", True),
        keepalive=keepalive if keepalive > 0 else None,
        max_send_segment=TSO_MAX_SEGMENT if offload else None,
        fin_wait2_timeout=fin_wait2_timeout,
        ecn=env_bool("TCP_ECN", True),
    )


if __name__ == "__main__":
    proc = Process("tcp")
    # RFC 6528 ISNs and SYN cookies need a secret the peer cannot guess; a fresh one per
    # process is enough (a restarted worker holds none of the old connections).
    cfg = proc.config
    syn_queue = env_int("TCP_SYN_QUEUE", SYN_QUEUE_LIMIT)
    if syn_queue < 1:
        raise SystemExit(f"TCP_SYN_QUEUE={syn_queue}: expected at least 1")
    max_time_wait = env_int("TCP_MAX_TIME_WAIT", MAX_TIME_WAIT)
    sink = shell.sink(proc)
    services = registry.services_or_exit("tcp")
    # Attach mode: flows to other addresses are relayed to real sockets opened from here.
    tcp = tcp_config(cfg.mtu, cfg.offload)
    keepalive = None if tcp.keepalive is None else Keepalive(tcp.keepalive, tcp.keepalive_interval,
                                                             tcp.keepalive_probes)
    relay = TcpRelay(sink, forward_policy(), env_float("USTACK_RELAY_CONNECT_TIMEOUT", CONNECT_TIMEOUT),
                     publish=published("tcp"), namespace_address=cfg.host_interface.ip.packed,
                     keepalive=keepalive) if cfg.forward or published("tcp") else None
    shell.run(proc, TcpDemux(sink, cfg.stack_addr_bytes, tcp,
                             secret=os.urandom(32), services=services, offload=cfg.offload,
                             syn_queue_limit=syn_queue, address6=cfg.stack_addr6_bytes, relay_=relay,
                             max_time_wait=max_time_wait))
