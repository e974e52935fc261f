"""The stack's processes, and what they use: CPU seconds and memory from /proc, counters from stackctl."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import resource

from tests.integration.netns import Namespace, Stack

from .common import BenchError

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (fields 14 and 15 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu() -> float:
    """CPU seconds of this process (the benchmark's own clients, in its threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def status_kb(pid: int, key: str) -> int:
    """One kB field of /proc/<pid>/status (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} for pid {pid}")


def stack_processes(ns: Namespace) -> tuple[dict[str, int], list[int]]:
    """The stack's processes in ns: {honcho name: pid} of the pipeline processes, and every pid.

    A process belongs to the stack when it carries HONCHO_PROCESS_NAME (honcho
    itself does not). Where a Procfile line runs a supervisor
    (``python3 -m pipeline.respawn python3 -m workers.tcp``), both share the
    name: the one whose first ``-m`` module is not the supervisor is the worker.
    The second list (for CPU time) holds supervisors too.
    """
    workers: dict[str, int] = {}
    every: list[int] = []
    for pid in ns._pids():
        with contextlib.suppress(OSError):
            env = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            name = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"HONCHO_PROCESS_NAME=")), None)
            if not name:
                continue
            every.append(pid)
            cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            modules = [cmd[i + 1] for i, arg in enumerate(cmd[:-1]) if arg == b"-m"]
            if modules and modules[0] != b"pipeline.respawn":
                workers[name] = pid
    return workers, every


def cpu_snapshot(pids) -> dict[int, float]:
    snap = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            snap[pid] = cpu_seconds(pid)
    return snap


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two snapshots; a process that appeared in between counts whole."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def stack_status(stack: Stack) -> dict:
    """What ``stackctl status --json`` says of the stack, or {} if it could not say."""
    done = stack.stackctl("status", "--json")
    return json.loads(done.stdout) if done.returncode == 0 else {}
