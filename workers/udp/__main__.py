"""The UDP worker process: ``python -m workers.udp``."""

import os

from pipeline.config import env_float, forward_policy, published
from pipeline.process import Process
from workers import shell
from workers.services import registry
from workers.udp.core import UdpCore
from workers.attach.udp import IDLE, IDLE_DNS, UdpRelay

if __name__ == "__main__":
    proc = Process("udp")
    cfg = proc.config
    sink = shell.sink(proc)
    # Attach mode: datagrams to other addresses are relayed to real sockets opened from here.
    relay = UdpRelay(sink, cfg.stack_addr_bytes, forward_policy(), cfg.mtu, env_float("USTACK_UDP_IDLE", IDLE),
                     env_float("USTACK_UDP_IDLE_DNS", IDLE_DNS), publish=published("udp"),
                     namespace_address=cfg.host_interface.ip.packed) if cfg.forward or published("udp") else None
    # Identifications of fragmented replies start at random (RFC 7739 §5: not predictable).
    shell.run(proc, UdpCore(sink, cfg.stack_addr_bytes, registry.services_or_exit("udp"),
                            address6=cfg.stack_addr6_bytes, mtu=cfg.mtu,
                            ident_seed=int.from_bytes(os.urandom(4), "big"), relay_=relay))
