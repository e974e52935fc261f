"""The ICMP worker process: ``python -m workers.icmp``."""

import os

from pipeline.process import Process
from workers import shell
from workers.icmp.core import IcmpCore

if __name__ == "__main__":
    proc = Process("icmp")
    cfg = proc.config
    # Identifications of fragmented replies start at random (RFC 7739 §5: not predictable).
    shell.run(proc, IcmpCore(shell.sink(proc), cfg.stack_addr_bytes, cfg.stack_addr6_bytes, cfg.mtu,
                             ident_seed=int.from_bytes(os.urandom(4), "big")))
