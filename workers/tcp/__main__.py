"""The TCP worker process: ``python -m workers.tcp`` (scale with ``honcho start -c tcp=N``)."""

from __future__ import annotations

import os

from pipeline import config, relay_config
from pipeline.process import Process
from workers import shell
from workers.services import registry
from workers.attach import wiring
from workers.tcp.config import TcpConfig
from workers.tcp.demux import TcpDemux


# With TSO the kernel cuts our segments to the MSS: emit up to this much payload
# at once (an IPv4 packet is at most 65535 bytes, headers and options included).
TSO_MAX_SEGMENT = 65535 - 20 - 60


def tcp_config(mtu: int, offload: bool, tcp: config.TcpSettings) -> TcpConfig:
    """The connections' TcpConfig from the checked TCP_* settings."""
    return TcpConfig(
        mss=mtu - 40,  # RFC 9293 §3.7.1: MTU minus fixed IPv4 and TCP headers
        recv_buffer=tcp.recv_buffer,
        send_buffer=tcp.send_buffer,
        congestion=tcp.congestion,
        msl=tcp.msl,
        delayed_ack=tcp.delayed_ack,
        nagle=tcp.nagle,
        keepalive=tcp.keepalive,
        max_send_segment=TSO_MAX_SEGMENT if offload else None,
        fin_wait2_timeout=tcp.fin_wait2_timeout,
        ecn=tcp.ecn,
    )


if __name__ == "__main__":
    proc = Process("tcp")  # checks every setting: the groups read below cannot fail
    cfg = proc.config
    settings, relays = config.tcp_settings(), relay_config.relay_settings()
    services = registry.services_or_exit("tcp", config.service_settings())
    tcp = tcp_config(cfg.mtu, cfg.offload, settings)
    # Attach mode: flows to other addresses are relayed to real sockets opened from here.
    learned = wiring.names(relays, cfg.run_dir, proc.name)
    policy = wiring.policy(relays, learned)
    # Published ports: ingress sends the table (USTACK_PUBLISH, then what stackctl publish changes)
    # once this worker has joined; listening starts then. Attached, a relay is there to take them.
    relayed = cfg.forward or relays.publish or relays.dns or cfg.attach
    if relayed:  # the relay's modules (~1 MB) only then
        from workers.attach import inbound
        from workers.attach.relay import Keepalive
        from workers.attach.tcp import TcpRelay
        keepalive = None if tcp.keepalive is None else Keepalive(tcp.keepalive, tcp.keepalive_interval,
                                                                 tcp.keepalive_probes)
        inside = inbound.inside(cfg, relays)
    # RFC 6528 ISNs and SYN cookies need a secret the peer cannot guess; a fresh one per
    # process is enough (a restarted worker holds none of the old connections).
    secret = os.urandom(32)

    def core(index: int, ns: str) -> TcpDemux:
        """The TCP of one attached namespace (every one sees the same addresses: its own flows)."""
        sink = shell.sink(proc, ns)
        relay = TcpRelay(sink, policy, relays.connect_timeout, keepalive=keepalive, inside=inside) if relayed else None
        served = dict(services)
        if relays.dns and relay is not None:  # the stack's resolver, over TCP (RFC 7766)
            served[wiring.DNS_PORT] = wiring.dns_service(relays, sink, learned, relay)
        return TcpDemux(sink, cfg.stack_addr_bytes, tcp, secret=secret, services=served, offload=cfg.offload,
                        syn_queue_limit=settings.syn_queue, address6=cfg.stack_addr6_bytes, relay_=relay,
                        max_time_wait=settings.max_time_wait)

    shell.run(proc, core, steered=registry.steered_ports(services), outbound=wiring.outbound(relays), names=learned)
