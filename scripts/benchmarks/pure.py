"""Compiled against interpreted: the same figures from a second stack running with USTACK_PURE=1,
measured alternately with the first (compiled) one."""

from __future__ import annotations

import contextlib

from tests.integration.netns import STACK_ADDR, Stack

from .common import RUN_DIR_BASE, BenchError, median, percentile, say
from .ping import ping_us
from .run import Run
from .tcp import bulk_into_discard, conn_rate
from .udp import udp_echo_rate


def measure_pure(run: Run) -> None:
    """ping p50, UDP echo 64, connections/s and bulk into discard from each build, alternately."""
    ns = run.namespace()
    pure = Stack(ns, env={"USTACK_PURE": "1"}, run_dir=f"{RUN_DIR_BASE}/{ns.name}")
    try:
        pure.wait_ready(timeout=30)
        builds = {r.get("mode") for r in pure.records() if r.get("event") == "build"}
        if builds != {"pure"}:
            raise BenchError(f"the second stack did not run interpreted: {builds}")
        targets = {"compiled": run.stack_ns, "pure": ns}
        reps: dict[str, dict[str, list[float]]] = {k: {"ping": [], "udp64": [], "conn": [], "discard1": []}
                                                   for k in targets}
        for _ in range(run.s.repetitions):
            for who, tns in targets.items():
                reps[who]["ping"].append(percentile(ping_us(tns, STACK_ADDR, run.s.ping_count), 50))
                reps[who]["udp64"].append(udp_echo_rate(tns, STACK_ADDR, 64, run.s.udp_seconds)["rate"])
                reps[who]["conn"].append(conn_rate(tns, STACK_ADDR, run.s.conn_clients,
                                                   run.s.conn_seconds)["rate"])
                reps[who]["discard1"].append(bulk_into_discard(tns, STACK_ADDR, 1, run.s.bulk_seconds)["mbit_s"])
        for who, r in reps.items():
            run.raw[f"build_{who}"] = {k: median(v) for k, v in r.items()} | {"repetitions": r}
        c, p = run.raw["build_compiled"], run.raw["build_pure"]
        say(f"  compiled / pure: ping p50 {c['ping']:.0f} / {p['ping']:.0f} µs, udp64 {c['udp64']:.0f} / "
            f"{p['udp64']:.0f} /s, conn {c['conn']:.0f} / {p['conn']:.0f} /s, "
            f"discard {c['discard1']:.0f} / {p['discard1']:.0f} Mbit/s")
    finally:
        pure.stop()
        with contextlib.suppress(OSError):
            pure.log_path.unlink()
