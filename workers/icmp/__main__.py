"""The ICMP worker process: ``python -m workers.icmp``."""

from pipeline.process import Process
from workers import shell
from workers.icmp.core import IcmpCore

if __name__ == "__main__":
    proc = Process("icmp")
    shell.run(proc, IcmpCore(shell.sink(proc), proc.config.stack_addr_bytes))
