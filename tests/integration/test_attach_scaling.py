"""Attach mode with `honcho start -c tcp=4`: relayed flows spread over the workers like local ones,
and a SIGKILLed worker resets only its own relayed connections while the others finish intact."""

import concurrent.futures
import hashlib
import json
import os
import signal
import socket
import time

import pytest

from pipeline.wire.addr import split_endpoint
from tests.integration.attach_topology import SERVER, Server, attached_stack, echo
from tests.integration.netns import exchange, process_pid
from tests.integration.test_scaling import stackctl

WORKERS = 4


@pytest.fixture(scope="module")
def stack(topo):
    s = attached_stack(topo, "-c", f"tcp={WORKERS}")
    try:
        s.wait_ready({"icmp": 1, "udp": 1, "tcp": WORKERS})
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def server(topo, stack):
    s = Server(topo.server, SERVER, 7, echo)
    yield s
    s.close()


def owners(stack) -> dict[int, str]:
    """Client port -> the tcp worker that relayed the connection (its one record, relay_flow, once it ended)."""
    return {r["sport"]: r["proc"] for r in stack.records()
            if r["event"] == "relay_flow" and r["proto"] == "tcp" and r.get("dst") == SERVER}


def test_200_relayed_connections_spread_over_all_workers(topo, stack, server):
    def chat(i: int) -> tuple[int, bytes]:
        with topo.client.socket() as sock:
            return exchange(sock, (SERVER, 7), f"hello {i}".encode(), timeout=20)

    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        results = list(pool.map(chat, range(200)))
    assert [data for _, data in results] == [f"hello {i}".encode() for i in range(200)]
    stack.wait_for(lambda recs: len(owners(stack)) >= 200, 10, "200 relayed connections logged")
    table = owners(stack)
    by_worker: dict[str, int] = {}
    for port, _ in results:
        by_worker[table[port]] = by_worker.get(table[port], 0) + 1
    assert len(by_worker) == WORKERS, by_worker
    # stackctl status shows the relay's counters per worker (they travel in heartbeats).
    deadline = time.monotonic() + 5
    while True:
        procs = json.loads(stackctl(stack, "status", "--json").stdout)["processes"]
        connects = sum(p.get("stats", {}).get("relay_connects", 0) for p in procs)
        if connects >= 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert connects >= 200
    assert all("relayed" in p["stats"] for p in procs if p["role"] == "tcp")


class Upload:
    """A paced echo through the relay, still running when a worker is killed."""

    SIZE = 4 * 1024 * 1024
    CHUNK = 64 * 1024
    PAUSE = 0.05

    def __init__(self, topo) -> None:
        self.sock = topo.client.socket()
        self.sock.settimeout(20)
        self.sock.connect((SERVER, 7))
        self.port = self.sock.getsockname()[1]
        self.error: str | None = None
        self.intact = False
        self.ended_at = 0.0

    def run(self) -> "Upload":
        data = hashlib.sha256(str(self.port).encode()).digest() * (self.SIZE // 32)
        echoed = bytearray()
        try:
            for off in range(0, self.SIZE, self.CHUNK):
                self.sock.sendall(data[off:off + self.CHUNK])
                while len(echoed) < off:
                    chunk = self.sock.recv(1 << 20)
                    if not chunk:
                        raise ConnectionError("eof")
                    echoed += chunk
                time.sleep(self.PAUSE)
            self.sock.shutdown(socket.SHUT_WR)
            while chunk := self.sock.recv(1 << 20):
                echoed += chunk
            self.intact = echoed == data
        except OSError as exc:
            self.error = type(exc).__name__
        finally:
            self.ended_at = time.monotonic()
            self.sock.close()
        return self


def test_killed_worker_resets_only_its_relayed_connections(topo, stack, server):
    uploads = [Upload(topo) for _ in range(24)]
    with concurrent.futures.ThreadPoolExecutor(len(uploads)) as pool:
        futures = [pool.submit(u.run) for u in uploads]
        time.sleep(1.0)
        # Which worker holds each upload now: client port -> worker.
        table = stack.owners([u.port for u in uploads], lambda r: int(split_endpoint(r["remote"])[1]))
        victim = "tcp.2"
        os.kill(process_pid(topo.host, victim, "workers.tcp"), signal.SIGKILL)
        killed_at = time.monotonic()
        done = [f.result(timeout=90) for f in futures]
    dead = [u for u in done if table[u.port] == victim]
    alive = [u for u in done if table[u.port] != victim]
    assert dead and alive
    for u in alive:
        assert u.error is None and u.intact, (u.port, table[u.port], u.error)
    for u in dead:
        assert u.error is not None or not u.intact, u.port
        assert u.ended_at - killed_at < 5.0, u.ended_at - killed_at
