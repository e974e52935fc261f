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
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

from tests.integration.netns import Namespace, Stack

from .common import median, say
from .latency import latency_budget
from .references import BENCH
from .tcp import conn_rate

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
