"""TCP against the kernel's loopback: connections per second (connect, a line to 8000, its answer,
close) and bulk throughput into discard (9) and out of chargen (19), with the CPU seconds each
gigabyte costs."""

from __future__ import annotations

import multiprocessing
import signal
import socket
import threading
import time

from tests.integration.netns import STACK_ADDR, Namespace

from .common import ANSWER, CHUNK, LINE, LOOPBACK, BenchError, family, median, say
from .processes import cpu_seconds, cpu_snapshot, cpu_used, self_cpu, stack_processes
from .references import rfc864
from .run import Run


def line_answered(s: socket.socket) -> bool:
    """Send the line on a connected socket and read until its end (or the peer's FIN): was it answered?"""
    s.sendall(LINE)
    got = b""
    while not got.endswith(b"\n"):
        data = s.recv(4096)
        if not data:
            break
        got += data
    return got == ANSWER


def _conn_client(ns: Namespace, addr: str, start_at: float, seconds: float, results) -> None:
    """One client process: connect, one line to 8000, its answer, close; again until time is up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it kills us if interrupted
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with ns.entered():
        done = errors = 0
        while time.monotonic() < start_at:
            time.sleep(0.001)
        end = start_at + seconds
        while time.monotonic() < end:
            s = socket.socket()
            try:
                s.settimeout(5)
                s.connect((addr, 8000))
                if line_answered(s):
                    done += 1
                else:
                    errors += 1
            except OSError:
                errors += 1
            finally:
                s.close()
        results.put((done, errors, time.monotonic() - start_at))


def conn_rate(ns: Namespace, addr: str, clients: int, seconds: float) -> dict:
    """Connections per second from ``clients`` processes, each one connection at a time, for ``seconds``."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    start_at = time.monotonic() + 0.3
    procs = [ctx.Process(target=_conn_client, args=(ns, addr, start_at, seconds, results), daemon=True)
             for _ in range(clients)]
    try:
        for p in procs:
            p.start()
        outs = [results.get(timeout=seconds + 30) for _ in procs]
    finally:
        for p in procs:
            p.join(2)
            if p.is_alive():
                p.kill()
                p.join()
    done = sum(o[0] for o in outs)
    errors = sum(o[1] for o in outs)
    elapsed = max(o[2] for o in outs)
    if done == 0:
        raise BenchError(f"connections to {addr}:8000: none completed ({errors} failed)")
    return {"rate": done / elapsed, "connections": done, "errors": errors}


def _threads(n: int, target) -> list:
    """Run target(barrier) in n threads; return their results (re-raising the first error)."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        try:
            results[i] = target(barrier)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            results[i] = exc
            barrier.abort()
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise BenchError(f"bulk transfer failed: {r!r}") from r
    return results


def bulk_into_discard(ns: Namespace, addr: str, conns: int, seconds: float) -> dict:
    """Send for `seconds`, then FIN, and stop the clock when the server's FIN comes back.

    The server closes only after it has taken in every byte, so bytes / time
    counts only what arrived, not what sat in socket buffers.
    """
    data = memoryview(rfc864(CHUNK))

    def one(barrier: threading.Barrier):
        s = ns.socket(family(addr))
        with s:
            s.settimeout(30)
            s.connect((addr, 9))
            barrier.wait(10)
            start = time.perf_counter()
            end = start + seconds
            sent = 0
            while time.perf_counter() < end:
                s.sendall(data)
                sent += len(data)
            s.shutdown(socket.SHUT_WR)
            if s.recv(1) != b"":
                raise BenchError("discard sent data")
            return sent, start, time.perf_counter()
    res = _threads(conns, one)
    total = sum(r[0] for r in res)
    elapsed = max(r[2] for r in res) - min(r[1] for r in res)
    return {"mbit_s": total * 8 / elapsed / 1e6, "bytes": total, "seconds": elapsed}


def bulk_out_of_chargen(ns: Namespace, addr: str, conns: int, seconds: float) -> dict:
    """Receive for `seconds`; bytes received / time."""
    def one(barrier: threading.Barrier):
        buf = bytearray(CHUNK)
        s = ns.socket(family(addr))
        with s:
            s.settimeout(30)
            s.connect((addr, 19))
            barrier.wait(10)
            start = time.perf_counter()
            end = start + seconds
            got = 0
            while time.perf_counter() < end:
                n = s.recv_into(buf)
                if not n:
                    raise BenchError("chargen closed")
                got += n
            return got, start, time.perf_counter()
    res = _threads(conns, one)
    total = sum(r[0] for r in res)
    elapsed = max(r[2] for r in res) - min(r[1] for r in res)
    return {"mbit_s": total * 8 / elapsed / 1e6, "bytes": total, "seconds": elapsed}


def measure_conns(run: Run) -> None:
    """Connections per second, ``conn_clients`` processes to the line service (8000) of each target."""
    targets = {"ustack": (run.stack_ns, STACK_ADDR), "kernel_loopback": (run.kern_ns, LOOPBACK)}
    reps: dict[str, list[dict]] = {k: [] for k in targets}
    for _ in range(run.s.repetitions):
        for who, (ns, addr) in targets.items():
            reps[who].append(conn_rate(ns, addr, run.s.conn_clients, run.s.conn_seconds))
    for who, r in reps.items():
        run.raw[f"conn_{who}"] = {"rate": median([x["rate"] for x in r]), "repetitions": r}
        say(f"  tcp connections, {who}: {run.raw[f'conn_{who}']['rate']:.0f}/s")


def measure_bulk(run: Run) -> None:
    """Both directions with 1 and ``bulk_parallel`` connections; the CPU both ends use (for the stack:
    its processes; for the loopback: the kernel servers and this process, the client)."""
    targets = {"ustack": (run.stack_ns, STACK_ADDR), "kernel_loopback": (run.kern_ns, LOOPBACK)}
    kernel_pid = run.kernel.pid
    cpu = {f"{d}_{w}": [0.0, 0] for d in ("discard", "chargen") for w in targets}
    for direction, fn in (("discard", bulk_into_discard), ("chargen", bulk_out_of_chargen)):
        for conns in (1, run.s.bulk_parallel):
            reps: dict[str, list[dict]] = {k: [] for k in targets}
            for _ in range(run.s.repetitions):
                for who, (ns, addr) in targets.items():
                    if who == "ustack":
                        before = cpu_snapshot(stack_processes(run.stack_ns)[1])
                    else:
                        before = cpu_seconds(kernel_pid) + self_cpu()
                    r = fn(ns, addr, conns, run.s.bulk_seconds)
                    if who == "ustack":
                        used = cpu_used(before, cpu_snapshot(stack_processes(run.stack_ns)[1]))
                    else:
                        used = cpu_seconds(kernel_pid) + self_cpu() - before
                    cpu[f"{direction}_{who}"][0] += used
                    cpu[f"{direction}_{who}"][1] += r["bytes"]
                    reps[who].append(r)
            for who, r in reps.items():
                key = f"bulk_{direction}{conns}_{who}"
                run.raw[key] = {"mbit_s": median([x["mbit_s"] for x in r]), "repetitions": r}
                say(f"  tcp bulk {direction}, {conns} connection(s), {who}: {run.raw[key]['mbit_s']:.0f} Mbit/s")
    for key, (used, nbytes) in cpu.items():
        run.raw[f"cpu_{key}"] = {"cpu_s_per_gb": used / (nbytes / 1e9) if nbytes else None,
                                 "cpu_s": used, "bytes": nbytes}
