"""The ICMP worker process: ``python -m workers.icmp``."""

import os

from pipeline.config import forward_policy
from pipeline.process import Process
from workers import shell
from workers.icmp.core import IcmpCore
from workers.attach.icmp import EchoRelay

if __name__ == "__main__":
    proc = Process("icmp")
    cfg = proc.config
    sink = shell.sink(proc)
    # Attach mode: echo requests to other addresses are relayed to the real hosts.
    relay = EchoRelay(sink, cfg.stack_addr_bytes, forward_policy()) if cfg.forward else None
    # Identifications of fragmented replies start at random (RFC 7739 §5: not predictable).
    shell.run(proc, IcmpCore(sink, cfg.stack_addr_bytes, cfg.stack_addr6_bytes, cfg.mtu,
                             ident_seed=int.from_bytes(os.urandom(4), "big"), relay_=relay))
