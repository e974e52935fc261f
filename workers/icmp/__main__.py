"""The ICMP worker process: ``python -m workers.icmp``."""

import os

from pipeline import config, relay_config
from pipeline.process import Process
from workers import shell
from workers.icmp.core import IcmpCore
from workers.attach.icmp import EchoRelay
from workers.attach.policy import ForwardPolicy

if __name__ == "__main__":
    proc = Process("icmp")  # checks every setting: the group read below cannot fail
    cfg = proc.config
    relays = relay_config.relay_settings()
    sink = shell.sink(proc)
    # Attach mode: echo requests to other addresses are relayed to the real hosts.
    policy = ForwardPolicy(deny=relays.deny, allow=relays.allow, host_alias=relays.host_alias)
    relay = EchoRelay(sink, cfg.stack_addr_bytes, policy) if cfg.forward else None
    # Identifications of fragmented replies start at random (RFC 7739 §5: not predictable).
    shell.run(proc, IcmpCore(sink, cfg.stack_addr_bytes, cfg.stack_addr6_bytes, cfg.mtu,
                             ident_seed=int.from_bytes(os.urandom(4), "big"), relay_=relay))
