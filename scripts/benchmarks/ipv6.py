"""The same clients over IPv6 (fd00::2), and ping -s 4000 (fragmented both ways) in both families.

References: the stack over IPv4 in this run (what IPv6 costs), the kernel's
loopback over ::1 for ping.
"""

from __future__ import annotations

from tests.integration.netns import STACK_ADDR, STACK_ADDR6

from .common import LOOPBACK, LOOPBACK6, median, percentile, say
from .ping import ping_us
from .run import Run
from .tcp import bulk_into_discard, bulk_out_of_chargen
from .udp import udp_echo_rate

FRAGMENTED_PING = 4000  # ping -s: fragmented both ways on a 1500-byte link


def measure_ipv6(run: Run) -> None:
    """Pings (56 and 4000 bytes), UDP echoes and one bulk connection each way, over IPv6."""
    pings = {"ping6_ustack": (run.stack_ns, STACK_ADDR6, 56), "ping6_kernel_loopback": (run.kern_ns, LOOPBACK6, 56),
             "ping_frag_ustack": (run.stack_ns, STACK_ADDR, FRAGMENTED_PING),
             "ping6_frag_ustack": (run.stack_ns, STACK_ADDR6, FRAGMENTED_PING),
             "ping_frag_kernel_loopback": (run.kern_ns, LOOPBACK, FRAGMENTED_PING)}
    reps: dict[str, list[tuple[float, float]]] = {k: [] for k in pings}
    for _ in range(run.s.repetitions):
        for key, (ns, addr, size) in pings.items():
            t = ping_us(ns, addr, run.s.ping_count, size)
            reps[key].append((percentile(t, 50), percentile(t, 99)))
    for key, r in reps.items():
        run.raw[key] = {"p50_us": median([x[0] for x in r]), "p99_us": median([x[1] for x in r]),
                        "repetitions": r}
        say(f"  {key}: p50 {run.raw[key]['p50_us']:.0f} µs")
    for inflight in (1, 64):
        r = [udp_echo_rate(run.stack_ns, STACK_ADDR6, inflight, run.s.udp_seconds)
             for _ in range(run.s.repetitions)]
        run.raw[f"udp{inflight}_ustack6"] = {"rate": median([x["rate"] for x in r]), "repetitions": r}
        say(f"  udp echo over IPv6, {inflight} in flight: {run.raw[f'udp{inflight}_ustack6']['rate']:.0f}/s")
    for direction, fn in (("discard", bulk_into_discard), ("chargen", bulk_out_of_chargen)):
        r = [fn(run.stack_ns, STACK_ADDR6, 1, run.s.bulk_seconds) for _ in range(run.s.repetitions)]
        key = f"bulk6_{direction}1_ustack"
        run.raw[key] = {"mbit_s": median([x["mbit_s"] for x in r]), "repetitions": r}
        say(f"  tcp bulk {direction} over IPv6, 1 connection: {run.raw[key]['mbit_s']:.0f} Mbit/s")
