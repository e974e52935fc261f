"""Where a packet's time goes inside the stack: its latency budget (``stackctl latency``) over some traffic."""

from __future__ import annotations

import json
import os
import subprocess

from .common import BenchError


def latency_budget(run_dir: str, traffic, seconds: float = 3.0) -> dict:
    """The stack's latency budget (``stackctl latency``) over what ``traffic()`` sends (it must
    finish within ``seconds``): {stage: {p50_us, p99_us, count}}."""
    env = dict(os.environ, USTACK_RUN_DIR=run_dir)
    proc = subprocess.Popen(["stackctl", "latency", "--seconds", str(seconds), "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if "measuring" not in proc.stderr.readline():  # armed: ingress stamps from now
            raise BenchError("stackctl latency did not start")
        traffic()
        out, err = proc.communicate(timeout=seconds + 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"stackctl latency: {err.strip()}")
    return json.loads(out)


def budget_lines(title: str, budget: dict) -> list[str]:
    """A budget as table lines: each stage's p50 and p99 in µs."""
    lines = [title, f"  {'stage':<10} {'p50 µs':>8} {'p99 µs':>8} {'count':>7}"]
    lines += [f"  {stage:<10} {row['p50_us']:>8} {row['p99_us']:>8} {row['count']:>7}" for stage, row in budget.items()]
    return lines
