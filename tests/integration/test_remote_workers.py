"""tcp:// endpoints (workers on other hosts) with mandatory CURVE authentication.

Inside the test's namespace, loopback stands in for the network between hosts.
"""

import json
import os
import queue
import subprocess
import threading
import time

import zmq.auth

from pipeline.tools.keys import make_keys
from tests.integration.netns import ROOT, STACK_ADDR, Stack


def test_worker_with_unauthorised_key_is_refused_and_gets_no_traffic(fresh_ns, tmp_path):
    ns = fresh_ns
    keys = tmp_path / "keys"
    make_keys(str(keys), ["client"])
    rogue_dir = tmp_path / "rogue"
    rogue_dir.mkdir()
    zmq.auth.create_certificates(str(rogue_dir), "rogue")  # a key pair nobody authorised
    env = {"USTACK_INGRESS_ENDPOINT": "tcp://127.0.0.1:5601", "USTACK_EGRESS_ENDPOINT": "tcp://127.0.0.1:5602",
           "USTACK_KEYS_DIR": str(keys)}
    stack = Stack(ns, env=env)
    rogue = None
    try:
        stack.wait_ready()
        rogue_env = dict(os.environ, **env, HONCHO_PROCESS_NAME="tcp.9", USTACK_RUN_DIR=stack.run_dir,
                         USTACK_CLIENT_KEY=str(rogue_dir / "rogue.key_secret"), PYTHONUNBUFFERED="1")
        rogue = ns.popen(str(ROOT / ".venv" / "bin" / "python"), "-m", "workers.tcp", cwd=ROOT, env=rogue_env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        stack.wait_for(lambda recs: any(r["event"] == "peer_refused" for r in recs), 15, "rogue refused")
        for i in range(20):  # all of these must go to the authorised worker
            with ns.socket() as sock:
                sock.settimeout(5)
                sock.connect((STACK_ADDR, 8000))
                sock.sendall(f"line {i}\n".encode())
                assert sock.recv(100) == (f"line {i}"[::-1] + "\n").encode()
        status = subprocess.run([str(ROOT / ".venv" / "bin" / "stackctl"), "status", "--json"],
                                env=dict(os.environ, **env, USTACK_RUN_DIR=stack.run_dir),
                                capture_output=True, text=True, timeout=10)
        names = {p["name"] for p in json.loads(status.stdout)["processes"]}
        assert "tcp.1" in names and "tcp.9" not in names
    finally:
        if rogue is not None:
            rogue.terminate()
            out = rogue.communicate(timeout=10)[0].decode()
        stack.stop()
    rogue_records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    stopped = next(r for r in rogue_records if r["event"] == "worker_stopped")
    assert stopped.get("packets_in", 0) == 0
    assert not any(r["event"] == "welcomed" for r in rogue_records)
    # Each connection's one record (tcp_closed, written by the time the stack stopped) names its worker.
    closed = [r for r in stack.records() if r["event"] == "tcp_closed"]
    assert len(closed) == 20 and {r["proc"] for r in closed} == {"tcp.1"}


def test_a_remote_worker_publishes_its_logs_over_curve(fresh_ns, tmp_path):
    """A worker of "host B" (its own run directory and stack lock, tcp:// with its own key)
    appears in `stackctl logs` on host A."""
    ns = fresh_ns
    keys = tmp_path / "keys"
    make_keys(str(keys), ["client", "worker-b"])
    env = {"USTACK_INGRESS_ENDPOINT": "tcp://127.0.0.1:5611", "USTACK_EGRESS_ENDPOINT": "tcp://127.0.0.1:5612",
           "USTACK_TELEMETRY_ENDPOINT": "tcp://127.0.0.1:5613", "USTACK_KEYS_DIR": str(keys)}
    host_a = Stack(ns, env=env)
    host_b = Stack(ns, "tcp", run_dir=f"{host_a.run_dir}-b",
                   env={**env, "USTACK_CLIENT_KEY": str(keys / "worker-b.key_secret"), "USTACK_NAME_PREFIX": "b-"})
    follow = None
    try:
        host_a.wait_ready({"icmp": 1, "udp": 1, "tcp": 2})
        follow = subprocess.Popen([str(ROOT / ".venv" / "bin" / "stackctl"), "--netns", ns.name, "logs", "-f",
                                   "--proc", "b-*", "--event", "tcp_closed"],
                                  env=dict(os.environ, **env, USTACK_RUN_DIR=host_a.run_dir),
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in follow.stdout], daemon=True).start()
        deadline = time.monotonic() + 20
        while lines.empty() and time.monotonic() < deadline:  # connections until one on b-tcp.1 has ended
            with ns.socket() as sock:
                sock.settimeout(5)
                sock.connect((STACK_ADDR, 8000))
                sock.sendall(b"where\n")
                assert sock.recv(100) == b"erehw\n"
            time.sleep(0.2)
        record = json.loads(lines.get(timeout=5))
        assert record["proc"] == "b-tcp.1" and record["event"] == "tcp_closed" and record["lport"] == 8000
    finally:
        if follow is not None:
            follow.terminate()
            follow.wait(10)
        host_b.stop()
        host_a.stop()
