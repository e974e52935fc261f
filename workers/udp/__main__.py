"""The UDP worker process: ``python -m workers.udp``."""

from pipeline.process import Process
from workers import registry, shell
from workers.udp.core import UdpCore

if __name__ == "__main__":
    proc = Process("udp")
    shell.run(proc, UdpCore(shell.sink(proc), proc.config.stack_addr_bytes, registry.services_or_exit("udp")))
