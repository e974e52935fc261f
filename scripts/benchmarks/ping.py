"""Ping round trips: the stack against the minimal responder and the kernel's loopback, and the
stack's latency budget of a ping."""

from __future__ import annotations

import re

from tests.integration.netns import STACK_ADDR, Namespace

from .common import LOOPBACK, MINIMAL_ADDR, BenchError, median, percentile, say
from .latency import budget_lines, latency_budget
from .run import Run


def ping_us(ns: Namespace, addr: str, count: int, size: int = 56) -> list[float]:
    """Per-echo round trip times in microseconds, from the kernel's ping (-s size)."""
    result = ns.run("ping", "-n", "-c", str(count), "-i", "0.001", "-W", "1", "-s", str(size), addr,
                    check=False, timeout=count * 0.01 + 30)
    times = [float(t) * 1000 for t in re.findall(rb"time=([0-9.]+) ms", result.stdout)]
    if len(times) < count * 0.9:
        raise BenchError(f"ping {addr}: {len(times)} of {count} echoes answered")
    return times


def measure_ping(run: Run) -> None:
    """p50 and p99 of each target (medians over the repetitions), then the budget of a ping to the stack."""
    targets = {"ustack": (run.stack_ns, STACK_ADDR), "minimal_responder": (run.min_ns, MINIMAL_ADDR),
               "kernel_loopback": (run.kern_ns, LOOPBACK)}
    reps: dict[str, list[tuple[float, float]]] = {k: [] for k in targets}
    for _ in range(run.s.repetitions):
        for who, (ns, addr) in targets.items():
            t = ping_us(ns, addr, run.s.ping_count)
            reps[who].append((percentile(t, 50), percentile(t, 99)))
    for who, r in reps.items():
        run.raw[f"ping_{who}"] = {"p50_us": median([x[0] for x in r]), "p99_us": median([x[1] for x in r]),
                                  "repetitions": r}
        say(f"  ping {who}: p50 {run.raw[f'ping_{who}']['p50_us']:.0f} µs, "
            f"p99 {run.raw[f'ping_{who}']['p99_us']:.0f} µs")
    # Where a ping's time goes inside the stack (measured apart: stamping costs a little).
    assert run.stack is not None
    budget = latency_budget(run.stack.run_dir, lambda: ping_us(run.stack_ns, STACK_ADDR, run.s.ping_count))
    run.raw["budget_ping"] = budget
    say("\n".join(budget_lines("  latency budget of a ping:", budget)))
