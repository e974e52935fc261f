"""The UDP worker process: ``python -m workers.udp``."""

import os

from pipeline.process import Process
from workers import registry, shell
from workers.udp.core import UdpCore

if __name__ == "__main__":
    proc = Process("udp")
    cfg = proc.config
    # Identifications of fragmented replies start at random (RFC 7739 §5: not predictable).
    shell.run(proc, UdpCore(shell.sink(proc), cfg.stack_addr_bytes, registry.services_or_exit("udp"),
                            address6=cfg.stack_addr6_bytes, mtu=cfg.mtu,
                            ident_seed=int.from_bytes(os.urandom(4), "big")))
