"""iperf3, one stream each way: the stack against ``iperf3 -s`` on the kernel's loopback."""

from __future__ import annotations

import json

from tests.integration.netns import STACK_ADDR, Namespace

from .common import LOOPBACK, BenchError, say
from .run import Run


def iperf3_run(ns: Namespace, addr: str, seconds: int, reverse: bool) -> dict:
    """iperf3 -c, one stream: the receiver's Mbit/s."""
    args = ["iperf3", "-c", addr, "-t", str(seconds), "-J"] + (["-R"] if reverse else [])
    done = ns.run(*args, check=False, timeout=seconds + 60)
    try:
        end = json.loads(done.stdout)["end"]
        return {"mbit_s": end["sum_received"]["bits_per_second"] / 1e6, "bytes": end["sum_received"]["bytes"]}
    except (ValueError, KeyError) as exc:
        raise BenchError(f"iperf3 {' '.join(args[3:])}: {done.stdout.decode(errors='replace')[-300:]}") from exc


def measure_iperf3(run: Run) -> None:
    """iperf3 -c, then iperf3 -c -R, at each target."""
    targets = {"ustack": (run.stack_ns, STACK_ADDR), "kernel_loopback": (run.kern_ns, LOOPBACK)}
    for reverse in (False, True):
        for who, (ns, addr) in targets.items():
            key = f"iperf3_{'reverse' if reverse else 'normal'}_{who}"
            run.raw[key] = iperf3_run(ns, addr, run.s.iperf_seconds, reverse)
            say(f"  iperf3{' -R' if reverse else ''}, {who}: {run.raw[key]['mbit_s']:.0f} Mbit/s")
