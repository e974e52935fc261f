"""The ICMP worker process: ``python -m workers.icmp``."""

from pipeline.config import forward_policy
from pipeline.process import Process
from workers import shell
from workers.icmp.core import IcmpCore
from workers.icmp.relay import EchoRelay

if __name__ == "__main__":
    proc = Process("icmp")
    cfg = proc.config
    sink = shell.sink(proc)
    # Attach mode: echo requests to other addresses are relayed to the real hosts.
    relay = EchoRelay(sink, cfg.stack_addr_bytes, forward_policy()) if cfg.forward else None
    shell.run(proc, IcmpCore(sink, cfg.stack_addr_bytes, relay))
