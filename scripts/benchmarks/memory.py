"""What the stack's processes hold: a fresh default stack's PSS at idle (every process, honcho's
included, by role), the TCP worker's RSS with many idle connections open, and every process's peak
RSS over the run (against the minimal responder's)."""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import statistics
import time

from tests.integration.netns import STACK_ADDR, Namespace, Stack

from .common import RUN_DIR_BASE, BenchError, say
from .processes import pss_kb, stack_processes, stack_roles, stack_status, status_kb
from .run import Run

IDLE_SETTLE = 5.0  # seconds a fresh stack idles after its workers joined, before its PSS is read


def measure_idle_pss(run: Run) -> None:
    """PSS (what each process holds, shared pages divided among their sharers) of a fresh default
    stack at idle, summed over every process in its namespace, honcho's included; by role. One fresh
    stack per repetition (not the run's own, which serves HTTP and has had traffic); the medians."""
    samples: list[dict[str, int]] = []
    counts: dict[str, int] = {}
    for _ in range(run.s.repetitions):
        ns = run.namespace()
        stack = Stack(ns, run_dir=f"{RUN_DIR_BASE}/{ns.name}")
        try:
            stack.wait_ready(timeout=30)
            time.sleep(IDLE_SETTLE)
            by_role: dict[str, int] = {}
            counts = {}
            for pid, role in stack_roles(ns).items():
                by_role[role] = by_role.get(role, 0) + pss_kb(pid)
                counts[role] = counts.get(role, 0) + 1
            samples.append(by_role)
        finally:
            stack.stop()
            with contextlib.suppress(OSError):
                stack.log_path.unlink()
            ns.delete()
            run.namespaces.remove(ns)
    totals = [sum(sample.values()) / 1024 for sample in samples]
    roles = sorted({role for sample in samples for role in sample})
    by_role_mb = {role: statistics.median(sample.get(role, 0) for sample in samples) / 1024 for role in roles}
    run.raw["idle_stack_pss"] = {"total_mb": statistics.median(totals), "runs_mb": totals,
                                 "by_role_mb": by_role_mb, "processes": counts}
    say(f"  idle stack PSS {statistics.median(totals):.1f} MB in {sum(counts.values())} processes: " +
        ", ".join(f"{role} {mb:.1f}" for role, mb in by_role_mb.items()))


def open_idle(ns: Namespace, addr: str, port: int, count: int, batch: int = 200) -> tuple[list, int]:
    """Open `count` connections (at most `batch` handshakes at once); return them and the failures."""
    need = count + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(need, soft), max(need, hard)))
    sel = selectors.DefaultSelector()
    opened: list[socket.socket] = []
    failed = started = 0
    deadline = time.monotonic() + 60 + count / 100
    with ns.entered():
        while len(opened) + failed < count:
            while started < count and started - len(opened) - failed < batch:
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex((addr, port))
                sel.register(s, selectors.EVENT_WRITE)
                started += 1
            events = sel.select(timeout=5)
            if not events and time.monotonic() > deadline:
                break
            for key, _ in events:
                s = key.fileobj
                sel.unregister(s)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    failed += 1
                    s.close()
                else:
                    opened.append(s)
            if time.monotonic() > deadline:
                break
    for key in list(sel.get_map().values()):
        key.fileobj.close()
        failed += 1
    sel.close()
    return opened, failed


def _connections(run: Run) -> int:
    """The connections tcp.1 holds, as stackctl status shows them (one record each only at close)."""
    assert run.stack is not None
    for p in stack_status(run.stack).get("processes", []):
        if p["name"] == "tcp.1":
            return int(p["stats"].get("connections", 0))
    raise BenchError("stackctl status: no tcp.1")


def measure_idle(run: Run) -> None:
    """tcp.1's RSS before and after opening ``idle_connections`` connections to discard (9)."""
    tcp = stack_processes(run.stack_ns)[0]["tcp.1"]
    before = status_kb(tcp, "VmRSS")
    held_before = _connections(run)
    start = time.monotonic()
    socks, failed = open_idle(run.stack_ns, STACK_ADDR, 9, run.s.idle_connections)
    opened_in = time.monotonic() - start
    try:
        time.sleep(2)  # the last handshakes' ACKs reach the worker
        after = status_kb(tcp, "VmRSS")
        established = _connections(run) - held_before
    finally:
        run.idle_socks = socks  # closed after the stack stops: no 10k FIN exchanges to wait for
    run.raw["idle"] = {"connections": len(socks), "failed": failed, "established_held": established,
                       "seconds_to_open": opened_in, "tcp_rss_before_kb": before, "tcp_rss_kb": after,
                       "bytes_per_connection": (after - before) * 1024 / max(1, len(socks))}
    say(f"  {len(socks)} idle connections ({failed} failed) in {opened_in:.1f} s: "
        f"tcp.1 RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB")
    if len(socks) < run.s.idle_connections * 0.99:
        raise BenchError(f"only {len(socks)} of {run.s.idle_connections} idle connections opened")


def measure_peak_rss(run: Run) -> None:
    """Every stack process's VmHWM; a warning if one was restarted since the start (its figures are suspect)."""
    workers, _ = stack_processes(run.stack_ns)
    peak = {name: status_kb(pid, "VmHWM") for name, pid in sorted(workers.items())}
    run.raw["peak_rss_kb"] = peak
    run.raw["peak_rss_kb_minimal_responder"] = status_kb(run.minimal.pid, "VmHWM")
    restarted = sorted(name for name, pid in run.stack_pids.items() if workers.get(name) != pid)
    if restarted:  # a worker died during the run (a supervisor restarted it): figures are suspect
        run.warnings.append(f"restarted during the run: {', '.join(restarted)}")
