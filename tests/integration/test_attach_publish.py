"""Attach mode, published ports: changed while the stack runs, and the client's own address inside.

`stackctl --netns CLIENT publish add|list|remove` as a user runs it (the stack
found by the namespace it serves); servers inside the attached namespace
report the peer they see. Every server is one this test runs in a namespace
it made (``attach_topology``); the nftables guard proves nothing else was
reached.
"""

import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.integration.attach_topology import HOST_SIDE, SERVER, SERVER6, Server, Topology, attached_stack, echo
from tests.integration.netns import ROOT, STACK_ADDR, STACK_ADDR6, Namespace, Stack, process_pid

STACKCTL = str(ROOT / ".venv" / "bin" / "stackctl")
HOST_SIDE6 = "2001:db8::1"
INSIDE, INSIDE6 = "10.0.0.1", "fd00::1"  # the attached namespace's addresses
ALIAS = "10.0.2.2"  # USTACK_HOST_ALIAS: how a loopback client appears inside
APPLY = 10.0  # seconds a change may take to reach the workers
STALL = 20.0


def start(topo: Topology, **env: str) -> Stack:
    """A stack in the host namespace attached to the client namespace, in its default run directory
    (so stackctl finds it by the namespace it serves, as a user's), ready."""
    return attached_stack(topo, env=env, run_dir="")


def stackctl(topo: Topology, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("USTACK_")}
    return subprocess.run([STACKCTL, "--netns", topo.client.name, *args], env=env, capture_output=True,
                          text=True, timeout=20)


def publish(topo: Topology, action: str, item: str) -> str:
    done = stackctl(topo, "publish", action, item)
    assert done.returncode == 0, done.stderr
    return done.stdout


def published(topo: Topology) -> list[tuple[str, int, int]]:
    done = stackctl(topo, "publish", "list", "--json")
    assert done.returncode == 0, done.stderr
    return sorted((r["proto"], r["port"], r["to_port"]) for r in json.loads(done.stdout))


@pytest.fixture(scope="module")
def stack(topo):
    s = start(topo, USTACK_PUBLISH="tcp:18000:8000", USTACK_HOST_ALIAS=ALIAS)
    try:
        yield s
    finally:
        s.stop()


def who(conn: socket.socket) -> str:
    """A server inside that says whom it sees (address and port), then echoes."""
    host, port = conn.getpeername()[:2]
    conn.sendall(f"{host} {port}\n".encode())
    return echo(conn)


def connect(ns: Namespace, address: str, port: int, timeout: float = APPLY) -> socket.socket:
    """Connected once the workers listen (a change reaches them within moments)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = ns.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
        sock.settimeout(STALL)
        try:
            sock.connect((address, port))
            return sock
        except ConnectionRefusedError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def refused(ns: Namespace, address: str, port: int, timeout: float = APPLY) -> bool:
    """Connections are refused by the kernel (nothing listens) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with ns.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
            sock.settimeout(STALL)
            try:
                sock.connect((address, port))
            except ConnectionRefusedError:
                return True
        time.sleep(0.1)
    return False


def seen_by_server(sock: socket.socket) -> tuple[str, int]:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(100)
        assert chunk, "the server inside said nothing"
        line += chunk
    host, port = line.decode().split()
    return host, int(port)


class Steady:
    """A flow that keeps sending 1 KB every 10 ms and reading its echo back."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = self.got = 0
        self.stopping = False
        self.writer = threading.Thread(target=self._write, daemon=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.writer.start()
        self.reader.start()

    def _write(self) -> None:
        while not self.stopping:
            self.sock.sendall(b"x" * 1024)
            self.sent += 1024
            time.sleep(0.01)
        self.sock.shutdown(socket.SHUT_WR)

    def _read(self) -> None:
        while data := self.sock.recv(65536):
            self.got += len(data)

    def flowing(self, timeout: float = 10.0) -> bool:
        """More bytes come back within ``timeout``."""
        before = self.got
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.got >= before + 16 * 1024:
                return True
            time.sleep(0.05)
        return False

    def finish(self) -> bool:
        """Stop sending; True if every byte came back."""
        self.stopping = True
        self.writer.join(STALL)
        self.reader.join(STALL)
        self.sock.close()
        return self.got == self.sent and not self.reader.is_alive()


def test_publish_add_list_remove_while_a_flow_keeps_running(topo, stack):
    inside = Server(topo.client, INSIDE, 8000, echo)
    other = Server(topo.client, INSIDE, 8001, who)
    try:
        assert published(topo) == [("tcp", 18000, 8000)]  # USTACK_PUBLISH
        steady = Steady(connect(topo.server, HOST_SIDE, 18000))
        assert steady.flowing()

        assert publish(topo, "add", "tcp:18001:8001").strip() == "tcp:18001:8001 published"
        assert published(topo) == [("tcp", 18000, 8000), ("tcp", 18001, 8001)]
        listed = stackctl(topo, "publish", "list")
        assert listed.returncode == 0 and "18001" in listed.stdout and "8001" in listed.stdout
        with connect(topo.server, HOST_SIDE, 18001) as sock:
            assert seen_by_server(sock)[0] == SERVER
        assert steady.flowing()

        publish(topo, "remove", "tcp:18001:8001")
        assert refused(topo.server, HOST_SIDE, 18001)
        # The port the steady flow came through goes too: the flow carries on, new ones are refused.
        assert publish(topo, "remove", "tcp:18000:8000").strip() == "tcp:18000:8000 no longer published"
        assert published(topo) == []
        assert refused(topo.server, HOST_SIDE, 18000)
        assert steady.flowing()
        # Published again while that flow still holds the port.
        publish(topo, "add", "tcp:18000:8000")
        connect(topo.server, HOST_SIDE, 18000).close()
        assert steady.flowing() and steady.finish()
        assert inside.accepted == 2 and other.accepted == 1
    finally:
        inside.close()
        other.close()
    records = stack.records()
    changes = [(r["event"], r["proto"], r["port"], r["to_port"]) for r in records
               if r.get("event") in ("publish_added", "publish_removed")]
    assert changes == [("publish_added", "tcp", 18001, 8001), ("publish_removed", "tcp", 18001, 8001),
                       ("publish_removed", "tcp", 18000, 8000), ("publish_added", "tcp", 18000, 8000)]
    assert topo.escaped() == 0


def test_the_namespace_sees_the_outside_clients_own_address(topo, stack):
    publish(topo, "add", "tcp:18002:8002")
    servers = [Server(topo.client, INSIDE, 8002, who), Server(topo.client, INSIDE6, 8002, who, socket.AF_INET6)]
    try:
        with connect(topo.server, HOST_SIDE, 18002) as sock:  # from the server namespace, 192.0.2.10
            assert seen_by_server(sock) == (SERVER, sock.getsockname()[1])
            client_port = sock.getsockname()[1]
        with connect(topo.server, HOST_SIDE6, 18002) as sock:  # IPv6: to the namespace's IPv6 address
            assert seen_by_server(sock) == (SERVER6, sock.getsockname()[1])
        with connect(topo.host, "127.0.0.1", 18002) as sock:  # loopback where the stack runs: the alias
            assert seen_by_server(sock) == (ALIAS, sock.getsockname()[1])
        with connect(topo.host, "::1", 18002) as sock:  # no IPv6 alias: the stack's own IPv6 address
            assert seen_by_server(sock)[0] == STACK_ADDR6
        assert [s.accepted for s in servers] == [2, 2]
        stack.wait_for(lambda rs: any(r.get("event") == "relay_flow" and r.get("src") == SERVER
                                      and r.get("sport") == client_port and r.get("published") == 18002
                                      and r.get("dst") == INSIDE and r.get("dport") == 8002 for r in rs),
                       what="the published flow's record, naming its client")
    finally:
        for server in servers:
            server.close()
        publish(topo, "remove", "tcp:18002:8002")
    assert topo.escaped() == 0


class PeerUdpServer:
    """A UDP server inside that answers each datagram with the sender it sees."""

    def __init__(self, ns: Namespace, address: str, port: int) -> None:
        self.sock = ns.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, port))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
                self.sock.sendto(f"{peer[0]} {peer[1]}".encode(), peer)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


def ask(ns: Namespace, address: str, port: int) -> tuple[tuple[str, int], int, tuple]:
    """(the sender the server inside saw, our own port, whom the answer came from); retried until
    the workers listen."""
    with ns.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        deadline = time.monotonic() + APPLY
        while True:
            sock.sendto(b"who am i", (address, port))
            try:
                data, source = sock.recvfrom(100)
                break
            except (TimeoutError, ConnectionRefusedError):
                assert time.monotonic() < deadline, "no answer through the published UDP port"
        host, seen_port = data.decode().split()
        return (host, int(seen_port)), sock.getsockname()[1], source[:2]


def test_a_published_udp_port_shows_the_senders_own_address(topo, stack):
    servers = [PeerUdpServer(topo.client, INSIDE, 5300), PeerUdpServer(topo.client, INSIDE6, 5300)]
    try:
        publish(topo, "add", "udp:15353:5300")
        seen, ours, source = ask(topo.server, HOST_SIDE, 15353)
        assert seen == (SERVER, ours) and source == (HOST_SIDE, 15353)  # its own address and port
        seen, ours, source = ask(topo.server, HOST_SIDE6, 15353)
        assert seen == (SERVER6, ours) and source == (HOST_SIDE6, 15353)
        seen, ours, _ = ask(topo.host, "127.0.0.1", 15353)
        assert seen == (ALIAS, ours)
        publish(topo, "remove", "udp:15353:5300")
        # Nothing listens: the kernel answers port unreachable (a connected socket hears it).
        with topo.server.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.5)
            sock.connect((HOST_SIDE, 15353))
            deadline = time.monotonic() + APPLY
            while time.monotonic() < deadline:
                sock.send(b"anyone?")
                try:
                    sock.recv(100)
                except ConnectionRefusedError:
                    break
                except TimeoutError:
                    continue
            else:
                pytest.fail("the unpublished UDP port still answers")
    finally:
        for server in servers:
            server.close()
    assert topo.escaped() == 0


def test_a_bad_publish_add_says_why_and_changes_nothing(topo, stack):
    before = published(topo)
    busy = topo.host.socket()
    busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    busy.bind(("127.0.0.1", 18500))
    busy.listen(1)
    busy_udp = topo.host.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy_udp.bind(("0.0.0.0", 18501))
    try:
        for action, item, why in [
            ("add", "tcp:abc", "is not proto:port:port"),
            ("add", "tcp:18000:9000", "tcp port 18000 is already published (to 8000)"),
            ("add", "tcp:18500:80", "tcp port 18500 is in use where the stack runs"),
            ("add", "udp:18501:53", "udp port 18501 is in use where the stack runs"),
            ("remove", "tcp:18999:80", "tcp port 18999 is not published"),
            ("remove", "tcp:18000:9000", "tcp port 18000 is published to 8000, not 9000"),
        ]:
            done = stackctl(topo, "publish", action, item)
            assert done.returncode != 0 and why in done.stderr, (item, done.stderr)
            assert done.stderr.startswith("stackctl: ") and done.stdout == ""
        assert published(topo) == before
    finally:
        busy.close()
        busy_udp.close()


def test_a_restarted_ingress_keeps_the_table_and_a_restarted_worker_listens_on_it(topo, stack):
    inside = Server(topo.client, INSIDE, 8003, who)
    try:
        publish(topo, "add", "tcp:18003:8003")
        publish(topo, "remove", "tcp:18000:8000")  # in USTACK_PUBLISH: must stay unpublished
        expected = published(topo)
        os.kill(process_pid(topo.host, "ingress.1", "pipeline.ingress"), signal.SIGKILL)
        stack.wait_for(lambda rs: any(r.get("event") == "published" and r.get("restored") for r in rs),
                       what="the restarted ingress restoring the table")
        assert published(topo) == expected
        os.kill(process_pid(topo.host, "tcp.1", "workers.tcp"), signal.SIGKILL)
        stack.wait_for(lambda rs: sum(r.get("event") == "worker_started" and r.get("proc") == "tcp.1"
                                      for r in rs) >= 2, what="tcp.1 restarted")
        with connect(topo.server, HOST_SIDE, 18003) as sock:
            assert seen_by_server(sock)[0] == SERVER
        assert refused(topo.server, HOST_SIDE, 18000)
    finally:
        inside.close()
    assert topo.escaped() == 0


def test_publish_source_stack_and_a_fresh_start_begins_from_ustack_publish():
    t = Topology()
    try:
        s = start(t, USTACK_PUBLISH="tcp:18000:8000", USTACK_PUBLISH_SOURCE="stack")
        inside = Server(t.client, INSIDE, 8000, who)
        try:
            with connect(t.server, HOST_SIDE, 18000) as sock:
                assert seen_by_server(sock)[0] == STACK_ADDR  # today's behaviour: the stack's address
            publish(t, "add", "tcp:18010:8010")
            listed = stackctl(t, "list", "--json")
            [ours] = [r for r in json.loads(listed.stdout) if r["netns"]["name"] == t.host.name]
            run_dir = ours["run_dir"]
            assert os.path.exists(os.path.join(run_dir, "published.json"))
        finally:
            inside.close()
            s.stop()
        assert not os.path.exists(run_dir)  # a clean stop: the table is not kept
        # A killed stack's table, left in its run directory: the next start ignores it.
        os.makedirs(run_dir, mode=0o700)
        with open(os.path.join(run_dir, "published.json"), "w") as f:
            json.dump({"stack": "12345:678", "table": [["tcp", 18010, 8010]]}, f)
        s = start(t, USTACK_PUBLISH="tcp:18000:8000")
        try:
            assert published(t) == [("tcp", 18000, 8000)]
            assert refused(t.server, HOST_SIDE, 18010, timeout=2.0)
        finally:
            s.stop()
    finally:
        t.delete()
