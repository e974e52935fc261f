"""The ICMP worker process: ``python -m workers.icmp``."""

import os

from pipeline import relay_config
from pipeline.process import Process
from workers import shell
from workers.icmp.core import IcmpCore
from workers.attach import wiring

PING_FIX = "sysctl -w net.ipv4.ping_group_range='0 2147483647'"

if __name__ == "__main__":
    proc = Process("icmp")  # checks every setting: the group read below cannot fail
    cfg = proc.config
    relays = relay_config.relay_settings()
    # Attach mode: echo requests to other addresses are relayed to the real hosts.
    learned = wiring.names(relays, cfg.run_dir, proc.name)
    policy = wiring.policy(relays, learned)
    if cfg.forward:  # the relay's modules (~1 MB) only then
        from workers.attach.icmp import EchoRelay
        from workers.attach.upstream import ping_refused
    if cfg.forward and (why := ping_refused()):  # said once; each refused ping is counted and answered
        proc.log.warning("ping_refused_by_host", error=why, fix=f"{PING_FIX} (in the namespace where the stack "
                         "runs), then relayed pings work without a restart")

    def core(index: int, ns: str) -> IcmpCore:
        """The ICMP of one attached namespace."""
        sink = shell.sink(proc, ns)
        relay = EchoRelay(sink, cfg.stack_addr_bytes, policy) if cfg.forward else None
        # Identifications of fragmented replies start at random (RFC 7739 §5: not predictable).
        return IcmpCore(sink, cfg.stack_addr_bytes, cfg.stack_addr6_bytes, cfg.mtu,
                        ident_seed=int.from_bytes(os.urandom(4), "big"), relay_=relay)

    shell.run(proc, core, outbound=wiring.outbound(relays), names=learned)
