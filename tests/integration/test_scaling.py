"""Several TCP workers: sharing, a worker killed mid-transfer, ingress restarted, stackctl.

The stack runs with `honcho start -c tcp=4`, each process under the respawn
wrapper exactly as the Procfile says; clients are the kernel's TCP in a
routed client namespace, over both families at once (flows with 4- and
16-byte addresses share the workers).
"""

import concurrent.futures
import hashlib
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from pipeline.wire.addr import split_endpoint
from tests.integration.netns import (CLIENT_ADDR, CLIENT_ADDR6, ROOT, STACK_ADDR, STACK_ADDR6, Stack, exchange,
                                     process_pid)
from tests.integration.test_tcp_bulk import rfc864_stream

WORKERS = 4
# (socket family, the stack's address, the client's address as logs and stackctl print it)
FAMILIES = {"ipv4": (socket.AF_INET, STACK_ADDR, CLIENT_ADDR), "ipv6": (socket.AF_INET6, STACK_ADDR6, CLIENT_ADDR6)}
BOTH = list(FAMILIES.values())


@pytest.fixture(scope="module")
def stack(ns):
    s = Stack(ns, "-c", f"tcp={WORKERS}")
    try:
        s.wait_ready({"icmp": 1, "udp": 1, "tcp": WORKERS})
        yield s
    finally:
        s.stop()


def owners(stack) -> dict[tuple[str, int], str]:
    """(client address, port) -> the tcp worker that wrote the connection's record (tcp_closed: it ended)."""
    return {(r["remote"], r["rport"]): r["proc"] for r in stack.records() if r["event"] == "tcp_closed"}


def _endpoint(text: str) -> tuple[str, int]:
    address, port = split_endpoint(text)
    return address, int(port)


def stackctl(stack, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, USTACK_RUN_DIR=stack.run_dir)
    return subprocess.run([str(ROOT / ".venv" / "bin" / "stackctl"), *args], env=env, capture_output=True,
                          text=True, timeout=10)


def test_connections_are_spread_over_all_workers(client, stack):
    def chat(i: int) -> tuple[tuple[str, int], bytes]:
        af, address, client_address = BOTH[i % 2]
        with client.socket(af) as sock:
            port, data = exchange(sock, (address, 8000), f"hello {i}\n".encode())
            return (client_address, port), data

    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        results = list(pool.map(chat, range(200)))
    assert [data for _, data in results] == [(f"hello {i}"[::-1] + "\n").encode() for i in range(200)]
    stack.wait_for(lambda recs: sum(r["event"] == "tcp_closed" for r in recs) >= 200, 10, "200 logged")
    by_worker = {}
    table = owners(stack)
    for port, _ in results:
        by_worker[table[port]] = by_worker.get(table[port], 0) + 1
    assert len(by_worker) == WORKERS, by_worker
    assert min(by_worker.values()) >= 200 / WORKERS / 4, by_worker


def test_stackctl_status_lists_live_workers(client, stack):
    # Traffic of its own, enough for every worker (40 connections over 4: one left idle ~4 in 100,000),
    # then counters travel in heartbeats: give them one to show up.
    for i in range(40):
        af, address, _ = BOTH[i % 2]
        with client.socket(af) as sock:
            assert exchange(sock, (address, 8000), b"status\n")[1] == b"sutats\n"
    deadline = time.monotonic() + 5
    while True:
        done = stackctl(stack, "status", "--json")
        assert done.returncode == 0, done.stderr
        procs = {p["name"]: p for p in json.loads(done.stdout)["processes"]}
        counted = [procs.get(f"tcp.{i}", {}).get("stats", {}).get("packets_in", 0) for i in range(1, WORKERS + 1)]
        if all(counted) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {f"tcp.{i}" for i in range(1, WORKERS + 1)} | {"ingress.1", "egress.1", "icmp.1", "udp.1"} <= procs.keys()
    for i in range(1, WORKERS + 1):
        p = procs[f"tcp.{i}"]
        assert p["role"] == "tcp" and p["heartbeat_age"] < 3 and p["stats"]["packets_in"] > 0
        assert "connections" in p["stats"]
    text = stackctl(stack, "status")
    assert text.returncode == 0 and "tcp.4" in text.stdout
    assert f"ustack {STACK_ADDR} and {STACK_ADDR6} on" in text.stdout and "reassembly:" in text.stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_stackctl_flows_shows_each_flow_and_its_owner(client, stack, family):
    af, address, client_address = FAMILIES[family]
    with client.socket(af) as sock:
        sock.settimeout(10)
        sock.connect((address, 8000))
        port = sock.getsockname()[1]
        key = client_address, port
        deadline = time.monotonic() + 5
        while True:  # the worker announces the flow right after its handshake: wait for it
            done = stackctl(stack, "flows", "--json")
            assert done.returncode == 0, done.stderr
            mine = [f for f in json.loads(done.stdout) if f["rport"] == port and f["lport"] == 8000]
            if mine or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        text = stackctl(stack, "flows")
    # The worker that held it says so in the connection's record, once it has closed.
    stack.wait_for(lambda recs: key in owners(stack), 10, f"connection from port {port} closed")
    owner = owners(stack)[key]
    assert mine == [{"remote": client_address, "rport": port, "lport": 8000, "worker": owner}]
    endpoint = f"[{client_address}]:{port}" if family == "ipv6" else f"{client_address}:{port}"
    assert text.returncode == 0 and endpoint in text.stdout and owner in text.stdout


class Transfer:
    """A long transfer, paced so it is still running when something is killed."""

    SIZE = 6 * 1024 * 1024
    CHUNK = 64 * 1024
    PAUSE = 0.04  # ~1.5 MB/s per connection: ~4 s in all

    def __init__(self, client, kind: str, family: tuple[int, str, str] = BOTH[0]):
        self.kind = kind
        af, address, client_address = family
        self.sock = client.socket(af)
        self.sock.settimeout(20)
        self.sock.connect((address, 19 if kind == "download" else 7))
        self.port = self.sock.getsockname()[1]
        self.key = client_address, self.port
        self.error: str | None = None
        self.ended_at: float | None = None
        self.intact = False

    def run(self) -> "Transfer":
        try:
            if self.kind == "download":
                got = bytearray()
                while len(got) < self.SIZE:
                    chunk = self.sock.recv(min(self.CHUNK, self.SIZE - len(got)))
                    if not chunk:
                        raise ConnectionError("eof")
                    got += chunk
                    time.sleep(self.PAUSE * len(chunk) / self.CHUNK)
                self.intact = hashlib.sha256(got).digest() == hashlib.sha256(rfc864_stream(self.SIZE)).digest()
            else:
                data = hashlib.sha256(str(self.port).encode()).digest() * (self.SIZE // 32)
                echoed = bytearray()
                for off in range(0, self.SIZE, self.CHUNK):
                    self.sock.sendall(data[off:off + self.CHUNK])
                    while len(echoed) < off:  # stay close behind: bounded buffering both ways
                        chunk = self.sock.recv(1 << 20)
                        if not chunk:
                            raise ConnectionError("eof")
                        echoed += chunk
                    time.sleep(self.PAUSE)
                self.sock.shutdown(socket.SHUT_WR)
                while chunk := self.sock.recv(1 << 20):
                    echoed += chunk
                self.intact = hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
        except OSError as exc:
            self.error = type(exc).__name__
        finally:
            self.ended_at = time.monotonic()
            self.sock.close()
        return self


def test_killed_worker_resets_its_connections_and_survivors_finish(ns, client, stack):
    transfers = [Transfer(client, "download" if i % 2 else "upload", BOTH[i // 2 % 2]) for i in range(40)]
    with concurrent.futures.ThreadPoolExecutor(len(transfers)) as pool:
        futures = [pool.submit(t.run) for t in transfers]
        time.sleep(1.0)
        # Which worker holds each transfer now: (client address, port) -> worker.
        table = stack.owners([t.key for t in transfers], lambda r: _endpoint(r["remote"]))
        families = {}
        for t in transfers:
            families.setdefault(table[t.key], set()).add(t.key[0])
        victim = min(w for w, seen in families.items() if len(seen) == 2)  # it holds flows of both families
        os.kill(process_pid(ns, victim, "workers.tcp"), signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(3.0)
        for af, address, _ in BOTH:
            with client.socket(af) as sock:  # new connections go to the survivors at once
                sock.settimeout(5)
                sock.connect((address, 8000))
                sock.sendall(b"after\n")
                assert sock.recv(100) == b"retfa\n"
        done = [f.result(timeout=60) for f in futures]
    dead = [t for t in done if table[t.key] == victim]
    alive = [t for t in done if table[t.key] != victim]
    assert {t.key[0] for t in dead} == {t.key[0] for t in alive} == {CLIENT_ADDR, CLIENT_ADDR6}
    for t in alive:
        assert t.error is None and t.intact, (t.kind, t.key, table[t.key], t.error)
    for t in dead:
        assert t.error is not None or not t.intact, (t.kind, t.port)
        assert t.ended_at - killed_at < 5.0, (t.kind, t.ended_at - killed_at)


@pytest.mark.parametrize("stage,module", [("ingress.1", "pipeline.ingress"), ("egress.1", "pipeline.egress")])
def test_stage_restart_loses_no_connection(ns, client, stack, stage, module):
    transfers = [Transfer(client, "download" if i % 2 else "upload", BOTH[i // 2 % 2]) for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(len(transfers)) as pool:
        futures = [pool.submit(t.run) for t in transfers]
        time.sleep(1.0)
        os.kill(process_pid(ns, stage, module), signal.SIGKILL)
        done = [f.result(timeout=90) for f in futures]
    for t in done:
        assert t.error is None and t.intact, (t.kind, t.port, t.error)
    assert any(r["event"] == "process_died" and r["proc"] == stage for r in stack.records())
