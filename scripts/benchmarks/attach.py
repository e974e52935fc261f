"""`scripts/bench --attach`: attach mode against slirp4netns, the tool people use today, in one run.

Three namespaces made here: a "host" namespace where ustack (attached to the
first client namespace, with USTACK_HOST_ALIAS=10.0.2.2) and slirp4netns (for
the second client namespace) both run, and where the servers listen on
127.0.0.1: iperf3, and the benchmark's kernel servers (line reverse on 8000).
In each client namespace 10.0.2.2 is the host namespace's loopback — slirp4netns's
own convention — so both tools are driven by the same clients to the same
servers: iperf3 one stream and four, both directions, and connections per
second (connect, a line, its answer, close), and the round trip of a line and
its answer on an open connection, at MTU 1500 and 65520. Each row is a ratio
ustack / slirp4netns (for the round trip, lower is better); ustack's latency
budget of the round trips is printed after the table. Nothing touches the
machine's main namespace.

``measure_many`` (``scripts/bench --only attach_many``) is the memory of one
namespace more: one stack attached to 20 namespaces at once, each having
pinged it, used its line service and fetched a file through the relay, its
PSS summed over every process it runs (honcho included), against 20
slirp4netns processes giving the same 20 namespaces their network and
doing the same (the line service then on the server, slirp4netns having
none). The same stack attached to the first namespace alone, measured the
same way first, gives what one namespace more costs, by PSS.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tests.integration.attach_topology import SERVER, Topology
from tests.integration.netns import STACK_ADDR, Namespace, Stack

from .common import RUN_DIR_BASE, BenchError, median, say
from .latency import latency_budget
from .references import BENCH
from .run import Run
from .tcp import conn_rate, line_answered

ALIAS = "10.0.2.2"
IPERF_PORT = "5201"
ROWS = [("iperf3 1 stream, namespace → host", []), ("iperf3 1 stream, host → namespace", ["-R"]),
        ("iperf3 4 streams, namespace → host", ["-P", "4"]), ("iperf3 4 streams, host → namespace", ["-P", "4", "-R"])]


def iperf(client: Namespace, args: list[str], seconds: float) -> float:
    """Gbit/s received, from iperf3's JSON. The server takes one test at a time and may still be
    finishing the previous one (a stalled stream ends with the server's own time-out): retry."""
    for _ in range(20):
        done = client.run("iperf3", "-c", ALIAS, "-p", IPERF_PORT, "-t", str(seconds), "-J", "--connect-timeout",
                          "5000", *args, check=False, timeout=seconds + 60)
        try:
            report = json.loads(done.stdout or b"{}")
        except ValueError:
            report = {"error": done.stdout.decode(errors="replace")[-200:]}
        if "busy" not in report.get("error", ""):
            break
        time.sleep(1)
    if "error" in report or "end" not in report:
        raise RuntimeError(f"iperf3 {' '.join(args)}: {report.get('error', done.stderr.decode()[-200:])}")
    return report["end"]["sum_received"]["bits_per_second"] / 1e9


RR_LABEL = "request/response round trip, µs (p50)"


def request_response_us(client: Namespace, count: int) -> float:
    """Median microseconds of a line and its answer on one open connection to the host's line server."""
    times = []
    with client.socket() as sock:
        sock.settimeout(5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((ALIAS, 8000))
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(b"ping pong\n")
            got = b""
            while not got.endswith(b"\n"):
                data = sock.recv(100)
                if not data:
                    raise RuntimeError("request/response: connection closed")
                got += data
            times.append((time.perf_counter() - start) * 1e6)
    return median(times)


def measure(what: str, fn) -> float | None:
    """One row's figure, said as soon as it is known; None (and why) when it could not be measured."""
    try:
        value = fn()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        say(f"attach bench: {what}: FAILED: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return None
    say(f"attach bench: {what}: {value:,.3f}")
    return value


def run(quick: bool) -> dict:
    """Every row for both tools at both MTUs, and ustack's latency budget of the round trips at each."""
    seconds = 2.0 if quick else 5.0
    exchanges = 200 if quick else 2000
    budgets: dict = {}
    host = Namespace("usbhost")
    clients: list[Namespace] = []
    procs: list[subprocess.Popen] = []
    results: dict = {}
    try:
        host.run("sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647")
        procs.append(host.popen("iperf3", "-s", "-B", "127.0.0.1", "-p", IPERF_PORT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(host.popen(sys.executable, str(BENCH), "--kernel-servers",
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
        procs[-1].stdout.readline()  # "kernel_servers: ready"
        for mtu in (1500, 65520):
            for tool in ("ustack", "slirp4netns"):
                client = Namespace("usbclient")
                clients.append(client)
                stack = None
                slirp = None
                try:
                    if tool == "ustack":
                        stack = Stack(host, env={"USTACK_ATTACH": client.name, "USTACK_HOST_ALIAS": ALIAS,
                                                 "USTACK_MTU": str(mtu)},
                                      run_dir=f"/run/ustack-test/{client.name}")
                        stack.wait_ready()
                    else:
                        slirp = host.popen("slirp4netns", "--configure", f"--mtu={mtu}", "--netns-type=path",
                                           f"/run/netns/{client.name}", "tap0",
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        for _ in range(100):
                            if client.run("ip", "route", "show", "default", check=False).stdout:
                                break
                            time.sleep(0.05)
                    row = results.setdefault(mtu, {})
                    for label, args in ROWS:
                        row.setdefault(label, {})[tool] = measure(f"{tool} MTU {mtu}: {label}",
                                                                  lambda: iperf(client, args, seconds))
                    row.setdefault("connections/s", {})[tool] = measure(
                        f"{tool} MTU {mtu}: connections/s", lambda: conn_rate(client, ALIAS, 4, seconds)["rate"])
                    row.setdefault(RR_LABEL, {})[tool] = measure(
                        f"{tool} MTU {mtu}: {RR_LABEL}", lambda: request_response_us(client, exchanges))
                    if stack is not None:  # where a relayed round trip's time goes
                        try:
                            budgets[mtu] = latency_budget(stack.run_dir, lambda: request_response_us(client, 200))
                        except (RuntimeError, OSError) as exc:
                            say(f"attach bench: latency budget at MTU {mtu}: failed: {exc}")
                finally:
                    if stack is not None:
                        stack.stop()
                        with contextlib.suppress(OSError):
                            os.unlink(stack.log_path)
                    if slirp is not None:
                        slirp.terminate()
                        slirp.wait(5)
                    client.delete()
                    clients.remove(client)
    finally:
        for p in procs:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        for client in clients:
            client.delete()
        host.delete()
    return {**{str(mtu): rows for mtu, rows in results.items()},
            "budget": {str(mtu): b for mtu, b in budgets.items()}}


def table(results: dict) -> str:
    """The rows as a Markdown table: each figure for both tools and their ratio."""
    lines = ["| MTU | measurement | ustack attach | slirp4netns | ratio |", "|---|---|---|---|---|"]
    for mtu, rows in results.items():
        if mtu == "budget":
            continue
        for label, by_tool in rows.items():
            counted = label in ("connections/s", RR_LABEL)
            unit = "" if counted else " Gbit/s"
            ours, theirs = by_tool.get("ustack"), by_tool.get("slirp4netns")
            fmt = (lambda v: "failed" if v is None else f"{v:,.0f}") if counted else \
                (lambda v: "failed" if v is None else f"{v:.2f}")
            ratio = f"{ours / theirs:.2f}" if ours and theirs else "-"
            lines.append(f"| {mtu} | {label} | {fmt(ours)}{unit} | {fmt(theirs)}{unit} | {ratio} |")
    return "\n".join(lines)


# -- one stack attached to many namespaces, against one slirp4netns each ---------------------------

MANY = 20  # namespaces (the target: <= 140 MB PSS for the stack, all processes)
MANY_PSS_BOUND_MB = 140
MANY_HTTP_PORT = 8080
MANY_LINE_PORT = 8000
SLIRP_GATEWAY = "10.0.2.2"  # slirp4netns answers pings itself there


def pss_kb(pid: int) -> int:
    """A process's proportional set size (shared pages divided among their users), kB."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise BenchError(f"no Pss for pid {pid}")


def pss_total_kb(pids) -> int:
    """PSS summed over ``pids``; a process that has gone in between counts nothing."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += pss_kb(pid)
    return total


def _part(pid: int) -> str:
    """What a process of a stack's namespace is, for the PSS breakdown: honcho (and its forked copies),
    a respawn wrapper, or the pipeline process by its honcho name."""
    cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    if any(arg.endswith(b"honcho") for arg in cmd[:2]):
        return "honcho"
    modules = [cmd[i + 1] for i, arg in enumerate(cmd[:-1]) if arg == b"-m"]
    if modules and modules[0] == b"pipeline.respawn":
        return "respawn wrappers"
    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"HONCHO_PROCESS_NAME=")), "other")


def pss_parts_kb(pids) -> dict[str, int]:
    """PSS per part of the stack (``_part``), kB."""
    parts: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            kb = pss_kb(pid)
            part = _part(pid)
            parts[part] = parts.get(part, 0) + kb
    return dict(sorted(parts.items()))


def _stack_pss(host: Namespace, clients: list[Namespace], digest: str, tag: str, result: dict) -> None:
    """Start a stack in ``host`` attached to ``clients``, serve each, and record its PSS under ``tag``."""
    stack = Stack(host, env={"USTACK_ATTACH": ",".join(ns.name for ns in clients)},
                  run_dir=f"{RUN_DIR_BASE}/{host.name}")
    try:
        stack.wait_ready(timeout=60)
        try:
            stack.wait_for(lambda recs: sum(r.get("event") == "namespace_attached" for r in recs) >= len(clients),
                           30, f"{len(clients)} namespace_attached records")
        except AssertionError as exc:
            raise BenchError(str(exc).splitlines()[0]) from None
        started = time.monotonic()
        result[f"{tag}_served"] = _serve_all(clients, STACK_ADDR, STACK_ADDR, digest)
        result[f"{tag}_serve_seconds"] = round(time.monotonic() - started, 1)
        time.sleep(1)  # the last flows' records and timers settle
        pids = host._pids()  # every process in the stack's namespace: honcho, wrappers, workers
        result[f"{tag}_processes"] = len(pids)
        result[f"{tag}_pss_kb"] = pss_total_kb(pids)
        result[f"{tag}_pss_parts_kb"] = pss_parts_kb(pids)
        say(f"  ustack, {len(clients)} namespace(s): {result[f'{tag}_served']} served; "
            f"PSS {result[f'{tag}_pss_kb'] / 1024:.1f} MiB in {len(pids)} processes "
            f"({', '.join(f'{k} {v / 1024:.1f}' for k, v in result[f'{tag}_pss_parts_kb'].items())})")
    finally:
        stack.stop()
        with contextlib.suppress(OSError):
            os.unlink(stack.log_path)


class _ManyServers:
    """In the server namespace, as threads of this process: the file over HTTP and the line service
    (what slirp4netns's namespaces use; ustack answers its own line service)."""

    def __init__(self, server: Namespace, size: int) -> None:
        self.www = tempfile.mkdtemp(prefix="ustack-bench-many-")
        payload = os.urandom(size)
        self.digest = hashlib.sha256(payload).hexdigest()
        with open(os.path.join(self.www, "file.bin"), "wb") as f:
            f.write(payload)

        class Http(http.server.ThreadingHTTPServer):
            request_queue_size = 256
            daemon_threads = True

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

        with server.entered():
            self.http = Http((SERVER, MANY_HTTP_PORT), functools.partial(Quiet, directory=self.www))
            self.line = socket.create_server((SERVER, MANY_LINE_PORT), backlog=256)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        threading.Thread(target=self._lines, daemon=True).start()

    def _lines(self) -> None:
        while True:
            try:
                conn, _ = self.line.accept()
            except OSError:
                return

            def run(conn=conn) -> None:
                with conn, contextlib.suppress(OSError):
                    pending = b""
                    while data := conn.recv(65536):
                        pending += data
                        *lines, pending = pending.split(b"\n")
                        conn.sendall(b"".join(ln.strip()[::-1] + b"\n" for ln in lines))
            threading.Thread(target=run, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.line.close()
        shutil.rmtree(self.www, ignore_errors=True)


def _serve_one(ns: Namespace, ping_to: str, line_to: str, digest: str) -> str:
    """Ping, a line and its answer, the file fetched: "" when all three worked, else what failed."""
    problems = []
    if ns.run("ping", "-c", "1", "-W", "5", ping_to, check=False, timeout=10).returncode != 0:
        problems.append("ping")
    try:
        with ns.socket() as sock:
            sock.settimeout(10)
            sock.connect((line_to, MANY_LINE_PORT))
            if not line_answered(sock):
                problems.append("line: no answer, or a wrong one")
    except OSError as exc:
        problems.append(f"line: {exc}")
    try:
        fetch = ns.run("curl", "-sS", "--max-time", "60", f"http://{SERVER}:{MANY_HTTP_PORT}/file.bin", check=False,
                       timeout=70)
    except subprocess.TimeoutExpired:
        return ", ".join(problems + ["fetch: curl hung"])
    if fetch.returncode != 0 or hashlib.sha256(fetch.stdout).hexdigest() != digest:
        problems.append(f"fetch: curl {fetch.returncode} {fetch.stderr.decode(errors='replace').strip()[:100]}")
    return ", ".join(problems)


def _serve_all(clients: list[Namespace], ping_to: str, line_to: str, digest: str) -> int:
    """How many namespaces did all three; each one's failures said."""
    with ThreadPoolExecutor(len(clients)) as pool:
        outcomes = list(pool.map(lambda ns: _serve_one(ns, ping_to, line_to, digest), clients))
    for ns, why in zip(clients, outcomes):
        if why:
            say(f"  {ns.name}: {why}")
    return sum(not why for why in outcomes)


def measure_many(run: Run) -> None:
    """PSS of one stack attached to MANY namespaces after each was served, and of MANY slirp4netns."""
    topo = Topology()  # host (both tools run there, behind the guard), server, and the first client
    clients = [topo.client]
    servers = None
    sleepers: list[subprocess.Popen] = []
    slirps: list[subprocess.Popen] = []
    result: dict = {"namespaces": MANY}
    try:
        clients += [Namespace("usclient") for _ in range(MANY - 1)]
        servers = _ManyServers(topo.server, (1 if run.s.quick else 10) * 1_000_000)
        result["file_mb"] = 1 if run.s.quick else 10
        # The same stack attached to the first namespace only: what one namespace more costs.
        _stack_pss(topo.host, clients[:1], servers.digest, "ustack_one", result)
        _stack_pss(topo.host, clients, servers.digest, "ustack", result)

        for ns in clients:  # the same namespaces, their ustack0 gone with the stack
            sleeper = ns.popen("sleep", "infinity")
            sleepers.append(sleeper)
            slirps.append(topo.host.popen("slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback",
                                          str(sleeper.pid), "tap0", stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        for ns in clients:
            while not ns.run("ip", "route", "show", "default", check=False).stdout:
                if time.monotonic() > deadline:
                    raise BenchError(f"slirp4netns never configured {ns.name}")
                time.sleep(0.05)
        started = time.monotonic()
        result["slirp_served"] = _serve_all(clients, SLIRP_GATEWAY, SERVER, servers.digest)
        result["slirp_serve_seconds"] = round(time.monotonic() - started, 1)
        time.sleep(1)
        result["slirp_processes"] = len(slirps)
        result["slirp_pss_kb"] = pss_total_kb(p.pid for p in slirps)
        say(f"  slirp4netns: {result['slirp_served']} of {MANY} served; PSS {result['slirp_pss_kb'] / 1024:.1f} MiB "
            f"in {len(slirps)} processes")
        result["escaped"] = topo.escaped()
        if result["escaped"]:
            raise BenchError(f"{result['escaped']} packets stopped by the guard")
    finally:
        run.raw["attach_many"] = result
        for p in slirps + sleepers:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        if servers is not None:
            servers.close()
        for ns in clients[1:]:
            ns.delete()
        topo.delete()
        shutil.rmtree(f"{RUN_DIR_BASE}/{topo.host.name}", ignore_errors=True)
    if result.get("ustack_served") != MANY:
        raise BenchError(f"ustack served {result.get('ustack_served')} of {MANY} namespaces")
