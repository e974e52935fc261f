"""What every measurement shares: the run's settings, addresses, the line exchanged, statistics, output.

Everything the benchmark prints while it runs goes to stderr through ``say``;
stdout carries only the table at the end.
"""

from __future__ import annotations

import os
import pathlib
import socket
import statistics
import sys
from dataclasses import dataclass

from tests.integration.netns import Namespace

ROOT = pathlib.Path(__file__).resolve().parents[2]
MINIMAL_ADDR = "10.0.0.2"        # the minimal responder answers the same address, in its own namespace
LOOPBACK = "127.0.0.1"
LOOPBACK6 = "::1"
LINE = b"the quick brown fox jumps over the lazy dog\n"
ANSWER = LINE[:-1][::-1] + b"\n"  # what the line service (8000) sends back
CHUNK = 1 << 20
# Namespaces are named <prefix>-<random>; a caller checking that a run cleaned up sets its own prefix.
NS_PREFIX = os.environ.get("USTACK_BENCH_NS_PREFIX", "usbench")
RUN_DIR_BASE = "/run/ustack-bench"
MB = 1_000_000


class BenchError(RuntimeError):
    """A measurement could not be made (the message says which and why)."""


@dataclass
class Settings:
    quick: bool
    repetitions: int
    ping_count: int          # echoes per repetition, 1 ms apart
    udp_seconds: float
    conn_seconds: float
    conn_clients: int        # client processes, each one connection at a time
    bulk_seconds: float
    bulk_parallel: int
    idle_connections: int
    ab_requests: int         # ab -n (one run per target)
    ab_concurrency: int      # ab -c
    download_mb: int         # the file curl downloads, MB
    iperf_seconds: int       # iperf3 -t, one stream each way
    compare_pure: bool       # also measure a second stack interpreted (USTACK_PURE=1)

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(quick, 1, 200, 0.5, 1.0, 4, 1.0, 8, 1000, 1000, 20, 20, 1, False)
        return cls(quick, 3, 1000, 2.0, 3.0, 4, 3.0, 8, 10_000, 20_000, 50, 100, 3, True)


def allow_many_connections(ns: Namespace) -> None:
    """Enough ephemeral ports in ns for a connection-rate run plus the idle connections, and reuse
    of our own TIME-WAIT ports (the client closes first)."""
    ns.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65535")
    ns.run("sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def median(values: list[float]) -> float:
    return statistics.median(values)


def number(v) -> str:
    """A figure as the table prints it: fewer decimals the larger it is, a dash for none."""
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def first_line(exc: BaseException) -> str:
    """An error as one line of the report: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"
