"""The UDP worker process: ``python -m workers.udp``."""

import os

from pipeline import config, relay_config
from pipeline.process import Process
from workers import shell
from workers.services import registry
from workers.udp.core import UdpCore
from workers.attach import wiring

if __name__ == "__main__":
    proc = Process("udp")  # checks every setting: the groups read below cannot fail
    cfg = proc.config
    relays = relay_config.relay_settings()
    sink = shell.sink(proc)
    # Attach mode: datagrams to other addresses are relayed to real sockets opened from here.
    publish = relays.published("udp")
    learned = wiring.names(relays, cfg.run_dir, proc.name)
    policy = wiring.policy(relays, learned)
    # Published ports: ingress sends the table (USTACK_PUBLISH, then what stackctl publish changes)
    # once this worker has joined; listening starts then. Attached, a relay is there to take them.
    relay = None
    if cfg.forward or publish or cfg.attach:  # the relay's modules (~1 MB) only then
        from workers.attach import inbound
        from workers.attach.udp import UdpRelay
        relay = UdpRelay(sink, cfg.stack_addr_bytes, policy, cfg.mtu, relays.udp_idle, relays.udp_idle_dns,
                         inside=inbound.inside(cfg, relays))
    # Identifications of fragmented replies start at random (RFC 7739 §5: not predictable).
    shell.run(proc, UdpCore(sink, cfg.stack_addr_bytes, registry.services_or_exit("udp", config.service_settings()),
                            address6=cfg.stack_addr6_bytes, mtu=cfg.mtu,
                            ident_seed=int.from_bytes(os.urandom(4), "big"), relay_=relay,
                            dns=wiring.dns_forwarder(relays, sink, learned, cfg.mtu)),
              outbound=wiring.outbound(relays), names=learned)
