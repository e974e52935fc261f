"""The stack's processes, and what they use: CPU seconds and memory (RSS, PSS) from /proc, counters from stackctl."""

from __future__ import annotations

import contextlib
import json
import os
import resource

from tests.integration.netns import Namespace, Stack, honcho_name, is_supervised

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
    itself does not). Each Procfile line runs a respawn wrapper (C or Python,
    ``pipeline/respawn.py``) and the pipeline process under it; both carry the
    name, and the pipeline process is the one whose parent does too. The
    second list (for CPU time) holds the wrappers too.
    """
    workers: dict[str, int] = {}
    every: list[int] = []
    for pid in ns._pids():
        name = honcho_name(pid)
        if not name:
            continue
        every.append(pid)
        if is_supervised(pid, name):
            workers[name] = pid
    return workers, every


def stack_roles(ns: Namespace) -> dict[int, str]:
    """Every process in ns by what it is: its role (``tcp`` for tcp.1 ... tcp.N), ``respawn`` for a
    respawn wrapper, ``honcho`` for honcho and the copies of itself it runs each command from."""
    workers, every = stack_processes(ns)
    roles = {pid: name.split(".")[0] for name, pid in workers.items()}
    return {pid: roles.get(pid, "respawn" if pid in every else "honcho") for pid in ns._pids()}


def pss_kb(pid: int) -> int:
    """A process's proportional set size (kB): its own pages plus its share of each shared one."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


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
