"""``scripts/bench --scaling``: connections per second and aggregate bulk throughput with 1, 2 and 4 TCP
workers (``honcho start -c tcp=N``), each in a namespace and stack of its own."""

from __future__ import annotations

import contextlib
import shutil

from tests.integration.netns import STACK_ADDR, Namespace, Stack

from .common import NS_PREFIX, RUN_DIR_BASE, Settings, allow_many_connections, median, say
from .tcp import bulk_into_discard, bulk_out_of_chargen, conn_rate

SCALING_WORKERS = (1, 2, 4)


def run_scaling(settings: Settings) -> dict:
    """Connections/s and aggregate bulk with 1, 2 and 4 TCP workers (honcho start -c tcp=N)."""
    results = {}
    for n in SCALING_WORKERS:
        ns = Namespace(NS_PREFIX)
        stack = None
        try:
            allow_many_connections(ns)
            stack = Stack(ns, "-c", f"tcp={n}", run_dir=f"{RUN_DIR_BASE}/{ns.name}")
            stack.wait_ready({"icmp": 1, "udp": 1, "tcp": n}, timeout=30)
            say(f"scaling: {n} tcp worker(s)")
            reps = range(settings.repetitions)
            conns = [conn_rate(ns, STACK_ADDR, settings.conn_clients, settings.conn_seconds)["rate"] for _ in reps]
            into = [bulk_into_discard(ns, STACK_ADDR, settings.bulk_parallel, settings.bulk_seconds)["mbit_s"]
                    for _ in reps]
            out = [bulk_out_of_chargen(ns, STACK_ADDR, settings.bulk_parallel, settings.bulk_seconds)["mbit_s"]
                   for _ in reps]
            results[n] = {"connections_per_s": median(conns), "discard_mbit_s": median(into),
                          "chargen_mbit_s": median(out), "repetitions": {"conn": conns, "discard": into,
                                                                           "chargen": out}}
        finally:
            if stack is not None:
                stack.stop()
                with contextlib.suppress(OSError):
                    stack.log_path.unlink()
            ns.delete()
            shutil.rmtree(f"{RUN_DIR_BASE}/{ns.name}", ignore_errors=True)
    return results


def scaling_table(results: dict, settings: Settings) -> str:
    """One line per worker count: each figure and its ratio to one worker's."""
    base = results[SCALING_WORKERS[0]]
    lines = [f"tcp workers  connections/s  (x1)   discard Mbit/s  (x1)   chargen Mbit/s  (x1)   "
             f"[{settings.bulk_parallel} connections for bulk, {settings.conn_clients} connecting clients]"]
    for n, r in results.items():
        lines.append(f"{n:>11}  {r['connections_per_s']:>13,.0f}  {r['connections_per_s'] / base['connections_per_s']:>4.2f}"
                     f"  {r['discard_mbit_s']:>14,.0f}  {r['discard_mbit_s'] / base['discard_mbit_s']:>4.2f}"
                     f"  {r['chargen_mbit_s']:>14,.0f}  {r['chargen_mbit_s'] / base['chargen_mbit_s']:>4.2f}")
    return "\n".join(lines)
