"""A SYN flood: ``hping3 -S --rand-source`` at the stack while FLOOD_CLIENTS kernel clients connect at
once, from a source that has completed a handshake before and from new ones; then connections 1 s after
it stopped, and every process's RSS under it."""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import subprocess
import time

from tests.integration.netns import STACK_ADDR, Namespace

from .common import BenchError, median, number, say
from .processes import stack_processes, stack_status, status_kb
from .run import Run
from .tcp import line_answered

FLOOD_CLIENTS = 30
FLOOD_RSS_BOUND_MB = 150  # each stack process under the flood (the tcp worker also holds the idle connections)
FLOOD_MODES = {"u10": ["-i", "u10"], "flood": ["--flood"]}  # hping3 rate: ~10,000/s, ~110,000/s here
# Where the clients connect from: "known", the kernel side's address after one exchange (a source that has
# completed a handshake, as a server's existing clients have); "new", 30 addresses never seen, one per client
# (first-time visitors: to a flood filter they look like the spoofed sources).
FLOOD_SOURCES = ("known", "new")
NEW_SOURCES = {mode: [f"10.0.0.{100 + FLOOD_CLIENTS * n + i}" for i in range(FLOOD_CLIENTS)]
               for n, mode in enumerate(FLOOD_MODES)}  # fresh ones for each mode


def connect_line(ns: Namespace, addr: str, timeout: float, source: str | None = None) -> float | None:
    """Connect, one line to 8000, its answer, close: seconds to connect, None if it failed."""
    s = ns.socket()
    try:
        if source is not None:
            s.bind((source, 0))
        s.settimeout(timeout)
        start = time.monotonic()
        s.connect((addr, 8000))
        took = time.monotonic() - start
        return took if line_answered(s) else None
    except OSError:
        return None
    finally:
        s.close()


def measure_synflood(run: Run) -> None:
    """Each flood rate (only u10 in a quick run), with clients from known and from new sources."""
    for address in (a for addresses in NEW_SOURCES.values() for a in addresses):  # the kernel's side
        run.stack_ns.run("ip", "addr", "add", f"{address}/32", "dev", "ustack0")
    connect_line(run.stack_ns, STACK_ADDR, 5.0)  # the kernel side's address completes a handshake
    for mode in (("u10",) if run.s.quick else tuple(FLOOD_MODES)):
        for sources in FLOOD_SOURCES:
            _flood(run, mode, sources)


def _flood(run: Run, mode: str, sources: str) -> None:
    """One flood at one rate, the clients from one kind of source."""
    flood = run.stack_ns.popen("hping3", "-S", "--rand-source", "-p", "8000", *FLOOD_MODES[mode],
                               STACK_ADDR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run.children.append(flood)
    client_sources = [None] * FLOOD_CLIENTS if sources == "known" else NEW_SOURCES[mode]
    try:
        time.sleep(1.0)  # the flood is on before the clients start
        with concurrent.futures.ThreadPoolExecutor(FLOOD_CLIENTS) as pool:
            took = list(pool.map(lambda source: connect_line(run.stack_ns, STACK_ADDR, 10.0, source),
                                 client_sources))
        pids, _ = stack_processes(run.stack_ns)
        rss = {name: status_kb(pid, "VmRSS") for name, pid in sorted(pids.items())}
        ingress = next((p["stats"] for p in stack_status(run.stack).get("processes", [])
                        if p["role"] == "ingress"), {})
        if flood.poll() is not None:
            raise BenchError(f"hping3 {mode} stopped early (exit {flood.returncode})")
    finally:
        flood.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            flood.wait(5)
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    time.sleep(1.0)
    after = [connect_line(run.stack_ns, STACK_ADDR, 5.0) for _ in range(5)]
    ok = [t for t in took if t is not None]
    key = f"synflood_{mode}" if sources == "known" else f"synflood_{mode}_{sources}"
    run.raw[key] = {
        "clients": FLOOD_CLIENTS, "sources": sources, "completed": len(ok),
        "within_3s": sum(t <= 3.0 for t in ok),
        "median_connect_ms": median(ok) * 1000 if ok else None, "connect_s": took,
        "after_ok": sum(t is not None for t in after),
        "after_median_connect_ms": median([t for t in after if t is not None]) * 1000
        if any(t is not None for t in after) else None,
        "rss_kb": rss, "ingress": {k: v for k, v in ingress.items() if "syn" in k or k.startswith("packets")
                                   or k == "drop_worker_full"}}
    r = run.raw[key]
    say(f"  syn flood {mode}, {sources} sources: {r['completed']}/{FLOOD_CLIENTS} completed, "
        f"{r['within_3s']} within 3 s, median connect {number(r['median_connect_ms'])} ms; "
        f"1 s after: {r['after_ok']}/5, {number(r['after_median_connect_ms'])} ms")
