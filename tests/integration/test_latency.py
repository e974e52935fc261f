"""The latency budget (`stackctl latency`) against the real stack: its shape, never its speed.

Every stage a ping crosses is present and counted; a stage made slow (the
icmp worker stopped with SIGSTOP while pings wait for it) shows in that
stage; a relayed request adds the upstream socket's stage.
"""

import json
import os
import signal
import subprocess
import time

from tests.integration.attach_topology import SERVER, Server, attached_stack, echo
from tests.integration.netns import ROOT, STACK_ADDR, Stack, process_pid

STACKCTL = str(ROOT / ".venv" / "bin" / "stackctl")
PIPELINE_STAGES = {"ingress", "to_worker", "worker", "to_egress", "egress", "total"}


def measuring(stack: Stack, seconds: float) -> subprocess.Popen:
    """`stackctl latency --json` running while the test sends traffic; returns the process."""
    proc = subprocess.Popen([STACKCTL, "latency", "--seconds", str(seconds), "--json"],
                            env=dict(os.environ, USTACK_RUN_DIR=stack.run_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    line = ""
    while "measuring" not in line and time.monotonic() < deadline:  # armed: ingress stamps from now
        line = proc.stderr.readline()
    assert "measuring" in line, line
    return proc


def budget_of(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return json.loads(out)


def test_every_stage_of_a_ping_is_present_and_counted(fresh_ns):
    stack = Stack(fresh_ns)
    try:
        stack.wait_ready()
        measure = measuring(stack, 2.5)
        fresh_ns.run("ping", "-c", "20", "-i", "0.05", "-q", STACK_ADDR)
        budget = budget_of(measure)
    finally:
        stack.stop()
    assert PIPELINE_STAGES <= set(budget), budget
    for stage in PIPELINE_STAGES:
        assert budget[stage]["count"] >= 20, budget
        assert 0 <= budget[stage]["p50_us"] <= budget[stage]["p99_us"]
    assert budget["total"]["p50_us"] >= budget["worker"]["p50_us"]


def test_nothing_is_measured_when_nobody_asks(fresh_ns):
    stack = Stack(fresh_ns)
    try:
        stack.wait_ready()
        fresh_ns.run("ping", "-c", "5", "-i", "0.05", "-q", STACK_ADDR)
        measure = measuring(stack, 0.5)  # asked only now: the pings before are not in it
        budget = budget_of(measure)
    finally:
        stack.stop()
    assert budget == {}, budget


def test_a_worker_made_slow_shows_in_its_hop(fresh_ns):
    stack = Stack(fresh_ns)
    try:
        stack.wait_ready()
        icmp = process_pid(fresh_ns, "icmp.1", "workers.icmp")
        measure = measuring(stack, 3)
        pinging = fresh_ns.popen("ping", "-c", "30", "-i", "0.05", "-q", STACK_ADDR, stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        os.kill(icmp, signal.SIGSTOP)  # its pings wait on the bus, in the hop to it
        time.sleep(0.4)
        os.kill(icmp, signal.SIGCONT)
        pinging.wait(timeout=20)
        budget = budget_of(measure)
    finally:
        stack.stop()
    assert budget["to_worker"]["p99_us"] >= 250_000, budget
    others = [budget[s]["p99_us"] for s in ("ingress", "worker", "to_egress", "egress")]
    assert budget["to_worker"]["p99_us"] > max(others), budget


def test_a_relayed_request_adds_the_upstream_stage(topo):
    server = Server(topo.server, SERVER, 7100, echo)
    stack = attached_stack(topo)
    try:
        measure = measuring(stack, 2.5)
        with topo.client.socket() as sock:
            sock.settimeout(10)
            sock.connect((SERVER, 7100))
            for i in range(20):
                line = f"request {i}\n".encode()
                sock.sendall(line)
                got = b""
                while len(got) < len(line):
                    got += sock.recv(100)
                assert got == line
        budget = budget_of(measure)
    finally:
        stack.stop()
        server.close()
    assert budget["upstream"]["count"] >= 20, budget
    assert PIPELINE_STAGES <= set(budget), budget
    assert topo.escaped() == 0
