"""tcp:// endpoints (workers on other hosts) with mandatory CURVE authentication.

Inside the test's namespace, loopback stands in for the network between hosts.
"""

import json
import os
import subprocess

import zmq.auth

from pipeline.keys import make_keys
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
    established = [r for r in stack.records() if r["event"] == "tcp_established"]
    assert len(established) == 20 and {r["proc"] for r in established} == {"tcp.1"}
