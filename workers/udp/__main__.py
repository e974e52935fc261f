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
    services = registry.services_or_exit("udp", config.service_settings())
    # Attach mode: datagrams to other addresses are relayed to real sockets opened from here.
    learned = wiring.names(relays, cfg.run_dir, proc.name)
    policy = wiring.policy(relays, learned)
    # Published ports: ingress sends the table (USTACK_PUBLISH, then what stackctl publish changes)
    # once this worker has joined; listening starts then. Attached, a relay is there to take them.
    relayed = cfg.forward or relays.publish or cfg.attach
    if relayed:  # the relay's modules (~1 MB) only then
        from workers.attach import inbound
        from workers.attach.udp import UdpRelay
        inside = inbound.inside(cfg, relays)

    def core(index: int, ns: str) -> UdpCore:
        """The UDP of one attached namespace (every one sees the same addresses: its own flows)."""
        sink = shell.sink(proc, ns)
        relay = UdpRelay(sink, cfg.stack_addr_bytes, policy, cfg.mtu, relays.udp_idle, relays.udp_idle_dns,
                         inside=inside) if relayed else None
        # Identifications of fragmented replies start at random (RFC 7739 §5: not predictable).
        return UdpCore(sink, cfg.stack_addr_bytes, services, address6=cfg.stack_addr6_bytes, mtu=cfg.mtu,
                       ident_seed=int.from_bytes(os.urandom(4), "big"), relay_=relay,
                       dns=wiring.dns_forwarder(relays, sink, learned, cfg.mtu))

    shell.run(proc, core, outbound=wiring.outbound(relays), names=learned)
