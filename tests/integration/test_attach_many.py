"""One stack, many namespaces (issue 21, part 2): a stack started with USTACK_ATTACH=n1,...,n20.

  n1 … n20   ustack0 10.0.0.1 each (made by the stack), the same addresses in every one
      │  20 TUN devices, one queue pair each
  host ns    the stack's processes (honcho, one worker of each kind); ve-host 192.0.2.1
      │  veth, behind the nftables guard of attach_topology
  server ns  192.0.2.10: an HTTP server (a file to fetch), a TCP and a UDP echo server

Every namespace pings the stack, uses its line service and fetches a file
through the relay; stackctl shows each namespace's flows, connections and
records apart (--ns). Two namespaces using the same 4-tuple at once get their
own streams; nothing of one namespace reaches another (captured on the
other's device); a 21st namespace is attached and detached while the others
keep talking; a namespace deleted while attached is detached with a record.
Nothing here touches the machine's main namespace, and the guard must count
no escape. stackctl is run as a user runs it, finding the stack by a
namespace it serves or the one it runs in, with no USTACK_RUN_DIR.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid

import pytest

from tests.integration.attach_topology import SERVER, Topology, UdpServer
from tests.integration.netns import HOST_ADDR, HOST_ADDR6, ROOT, STACK_ADDR, STACK_ADDR6, Namespace, Stack

COUNT = 20
HTTP_PORT = 8080
ECHO_PORT = 7
LINE_PORT = 8000
FILE_SIZE = 256 * 1024
STACKCTL = str(ROOT / ".venv" / "bin" / "stackctl")


# -- helpers ----------------------------------------------------------------------------

def stackctl(*args: str, netns: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`stackctl --netns NETNS ARGS` as a user runs it: no USTACK_* settings, the stack found by
    the namespace it serves or runs in. PYTHONPATH: this clone's stackctl (the venv may be shared)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("USTACK_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([STACKCTL, "--netns", netns, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def stackctl_json(*args: str, netns: str):
    done = stackctl(*args, "--json", netns=netns)
    assert done.returncode == 0, f"stackctl {' '.join(args)}: {done.stderr}"
    return json.loads(done.stdout)


def until(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll ``predicate()`` until it returns something true; fail saying ``what`` (and its last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {timeout} s: {what} (last: {value!r})")
        time.sleep(interval)


def line_exchange(sock: socket.socket, text: str) -> bytes:
    """Send one line to the line service and read its answer (the line reversed, a newline)."""
    sock.sendall(text.encode() + b"\n")
    return recv_exactly(sock, len(text) + 1)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def connected(ns: Namespace, address: tuple, family: int = socket.AF_INET, bind: tuple | None = None,
              timeout: float = 10) -> socket.socket:
    sock = ns.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    if bind is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(bind)
    sock.connect(address)
    return sock


def device_gone(ns: Namespace) -> bool:
    return ns.run("ip", "link", "show", "ustack0", check=False).returncode != 0


class TaggedEcho:
    """A TCP echo server in the server namespace that knows each connection by its first line
    (the client's namespace) and how it ended: "eof" or "reset" (what detach must do upstream)."""

    def __init__(self, ns: Namespace, port: int) -> None:
        self.sock = ns.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((SERVER, port))
        self.sock.listen(512)
        self.ended: dict[str, str] = {}  # tag -> how its connection ended
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        tag, outcome = "?", "eof"
        with conn:
            try:
                first = conn.recv(65536)
                tag = first.split(b"\n", 1)[0].decode(errors="replace")
                data = first
                while data:
                    conn.sendall(data)
                    data = conn.recv(65536)
            except ConnectionResetError:
                outcome = "reset"
            except OSError as exc:
                outcome = type(exc).__name__
        with self.lock:
            self.ended[tag] = outcome

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class Chatter:
    """A line and its answer every 50 ms on one open connection, in a thread, until stopped: traffic
    that must carry on, uninterrupted, while other namespaces come and go."""

    def __init__(self, ns: Namespace, address: tuple, echo: bool) -> None:
        self.ns = ns
        self.echo = echo
        self.sock = connected(ns, address, timeout=5)
        self.exchanges = 0
        self.slowest = 0.0
        self.error: str | None = None
        self._stop = threading.Event()
        if echo:  # the echo server knows a connection by its first line
            self.sock.sendall(f"{ns.name} chatter\n".encode())
            recv_exactly(self.sock, len(ns.name) + 9)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            text = f"{self.ns.name} line {i}"
            start = time.monotonic()
            try:
                self.sock.sendall(text.encode() + b"\n")
                got = recv_exactly(self.sock, len(text) + 1)
            except OSError as exc:
                self.error = f"{self.ns.name}: {exc!r} after {self.exchanges} exchanges"
                return
            want = text.encode() + b"\n" if self.echo else text[::-1].encode() + b"\n"
            if got != want:
                self.error = f"{self.ns.name}: {got!r} instead of {want!r}"
                return
            self.slowest = max(self.slowest, time.monotonic() - start)
            self.exchanges += 1
            i += 1
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
        self.sock.close()


# -- the stack and its namespaces -----------------------------------------------------------

class Many:
    def __init__(self) -> None:
        self.topo = Topology()
        self.clients: list[Namespace] = [self.topo.client]
        self.stack: Stack | None = None
        self.www = tempfile.mkdtemp(prefix="ustack-many-")
        self.payload = os.urandom(FILE_SIZE)
        self.digest = hashlib.sha256(self.payload).hexdigest()
        with open(os.path.join(self.www, "file.bin"), "wb") as f:
            f.write(self.payload)
        self.http: http.server.ThreadingHTTPServer | None = None
        self.echo: TaggedEcho | None = None
        self.udp: UdpServer | None = None

    def start(self) -> None:
        for _ in range(COUNT - 1):
            self.clients.append(Namespace("usclient"))
        self._servers()
        self.stack = Stack(self.topo.host, env={"USTACK_ATTACH": ",".join(ns.name for ns in self.clients)},
                           run_dir="")  # the default run directory: stackctl finds it as a user's
        self.stack.wait_ready(timeout=60)
        until(lambda: len(self.namespaces()) == COUNT, 30, f"{COUNT} namespaces attached")

    def _servers(self) -> None:
        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 256
            daemon_threads = True

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

        with self.topo.server.entered():  # the listening socket lives in the server namespace
            self.http = Server((SERVER, HTTP_PORT), functools.partial(Quiet, directory=self.www))
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.echo = TaggedEcho(self.topo.server, ECHO_PORT)
        self.udp = UdpServer(self.topo.server, SERVER, ECHO_PORT, lambda data: data)

    @property
    def host(self) -> str:
        return self.topo.host.name

    def namespaces(self) -> list[dict]:
        done = stackctl("namespaces", "--json", netns=self.host)
        return json.loads(done.stdout) if done.returncode == 0 else []

    def close(self) -> None:
        if self.stack is not None:
            self.stack.stop()
        for server in (self.echo, self.udp):
            if server is not None:
                server.close()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        for ns in self.clients[1:]:
            ns.delete()
        self.topo.delete()
        shutil.rmtree(self.www, ignore_errors=True)


@pytest.fixture(scope="module")
def many():
    m = Many()
    try:
        m.start()
        yield m
    finally:
        m.close()


def served_by_the_stack(many: Many, ns: Namespace) -> str:
    """What one namespace does: ping the stack, a line to its line service, a file through the
    relay. "" when all three worked, else what failed."""
    problems = []
    ping = ns.run("ping", "-c", "1", "-W", "5", STACK_ADDR, check=False)
    if ping.returncode != 0:
        problems.append(f"ping: {ping.stdout.decode()[-200:]}")
    try:
        with connected(ns, (STACK_ADDR, LINE_PORT)) as sock:
            got = line_exchange(sock, f"hello from {ns.name}")
        if got != f"hello from {ns.name}"[::-1].encode() + b"\n":
            problems.append(f"line service: {got!r}")
    except OSError as exc:
        problems.append(f"line service: {exc!r}")
    fetch = ns.run("curl", "-sS", "--max-time", "30", f"http://{SERVER}:{HTTP_PORT}/file.bin", check=False,
                   timeout=40)
    if fetch.returncode != 0 or hashlib.sha256(fetch.stdout).hexdigest() != many.digest:
        problems.append(f"fetch: curl {fetch.returncode}, {len(fetch.stdout)} bytes, {fetch.stderr.decode()[-200:]}")
    return "; ".join(problems)


# -- (a) twenty namespaces served, and stackctl's view of each ----------------------------------

def test_twenty_namespaces_each_ping_use_the_line_service_and_fetch_a_file(many):
    with concurrent.futures.ThreadPoolExecutor(COUNT) as pool:
        outcomes = dict(zip((ns.name for ns in many.clients), pool.map(lambda ns: served_by_the_stack(many, ns),
                                                                       many.clients)))
    failed = {name: why for name, why in outcomes.items() if why}
    assert not failed, failed

    names = {ns.name for ns in many.clients}

    def logged(records):
        fetched = {r.get("ns") for r in records if r.get("event") == "relay_flow" and r.get("dport") == HTTP_PORT}
        lined = {r.get("ns") for r in records if r.get("event") == "tcp_closed" and r.get("lport") == LINE_PORT}
        return names <= fetched and names <= lined
    many.stack.wait_for(logged, 15, "a relay_flow (the fetch) and a tcp_closed (the line) with each namespace's ns")
    # Every record of a namespace's flow says which namespace.
    for r in many.stack.records():
        if r.get("event") in ("relay_flow", "tcp_closed", "relay_denied", "dns_answer"):
            assert r.get("ns") in names, r

    rows = stackctl_json("namespaces", netns=many.host)
    assert sorted(r["name"] for r in rows) == sorted(names)
    assert len({r["index"] for r in rows}) == COUNT and all(r["device"] == "ustack0" for r in rows)
    assert {r["path"] for r in rows} == {f"/run/netns/{n}" for n in names}
    table = stackctl("namespaces", netns=many.host)
    assert table.returncode == 0 and all(n in table.stdout for n in names), table.stdout + table.stderr

    # Found by any namespace it serves (the stack file lists them all), and listed with all of them.
    for ns in many.clients:
        status = stackctl_json("status", netns=ns.name)
        assert len(status["namespaces"]) == COUNT, ns.name
    listed = [r for r in stackctl_json("list", netns=many.host) if r["netns"]["name"] == many.host]
    assert len(listed) == 1 and sorted(a["name"] for a in listed[0]["attached"]) == sorted(names), listed
    assert stackctl("status", netns=many.topo.server.name).returncode != 0  # it serves nothing there


def test_stackctl_shows_each_namespaces_connections_flows_and_records_apart(many):
    # In every namespace: a connection to the line service and one relayed to the echo server, held open.
    held: dict[str, list[socket.socket]] = {}
    try:
        for ns in many.clients:
            line = connected(ns, (STACK_ADDR, LINE_PORT))
            assert line_exchange(line, "abc") == b"cba\n"
            relayed = connected(ns, (SERVER, ECHO_PORT))
            relayed.sendall(f"{ns.name} held\n".encode())
            recv_exactly(relayed, len(ns.name) + 6)
            held[ns.name] = [line, relayed]
        ports = {name: {s.getsockname()[1] for s in socks} for name, socks in held.items()}

        conns = stackctl_json("conns", netns=many.host)
        mine = {}
        for r in conns:
            mine.setdefault(r.get("ns"), set()).add(int(r["remote"].rsplit(":", 1)[1]))
        for name, opened in ports.items():
            assert opened <= mine.get(name, set()), (name, opened, mine.get(name))

        flows = stackctl_json("flows", netns=many.host)
        assert all(f.get("ns") in ports for f in flows), flows
        for ns in many.clients[:5]:
            # The per-namespace views: exactly that namespace's, whichever way it is named.
            for how in (ns.name, f"/run/netns/{ns.name}"):
                only = stackctl_json("conns", "--ns", how, netns=many.host)
                assert {r["ns"] for r in only} == {ns.name}, only
                assert ports[ns.name] <= {int(r["remote"].rsplit(":", 1)[1]) for r in only}
            only = stackctl_json("flows", "--ns", ns.name, netns=many.host)
            assert {f["ns"] for f in only} == {ns.name}, only
            assert {(f["remote"], f["rport"]) for f in only} >= {(HOST_ADDR, p) for p in ports[ns.name]}
            assert any(f.get("local") == SERVER and f["lport"] == ECHO_PORT for f in only), only
        per_ns = {r["name"]: r["flows"] for r in stackctl_json("namespaces", netns=many.host)}
        assert all(per_ns[name] >= 2 for name in ports), per_ns
        nowhere = stackctl("flows", "--ns", many.topo.server.name, netns=many.host)
        assert nowhere.returncode != 0 and "not attached" in nowhere.stderr, nowhere.stderr

        # logs --ns: only that namespace's records, while two namespaces talk.
        a, b = many.clients[2], many.clients[3]
        follower = subprocess.Popen([STACKCTL, "--netns", many.host, "logs", "-f", "--ns", a.name],
                                    env={**{k: v for k, v in os.environ.items() if not k.startswith("USTACK_")},
                                         "PYTHONPATH": str(ROOT)},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        def read() -> None:
            for line in follower.stdout:
                lines.append(line)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            def a_logged():
                for ns in (a, b):  # a connection closed in each: one tcp_closed record each
                    with connected(ns, (STACK_ADDR, LINE_PORT)) as sock:
                        line_exchange(sock, "x")
                return any(json.loads(line).get("event") == "tcp_closed" for line in list(lines))
            until(a_logged, 15, f"a tcp_closed record of {a.name} from stackctl logs --ns", interval=0.5)
        finally:
            follower.send_signal(signal.SIGINT)
            follower.wait(10)
            reader.join(5)
        records = [json.loads(line) for line in lines]
        assert records and {r.get("ns") for r in records} == {a.name}, records[:5]
    finally:
        for socks in held.values():
            for s in socks:
                s.close()


# -- (b) the same 4-tuple in two namespaces at once -------------------------------------------

def test_two_namespaces_using_the_same_four_tuple_at_once_get_their_own_streams(many):
    a, b = many.clients[0], many.clients[1]
    port = 41000
    socks = []
    try:
        # Both connected before either sends: two flows with identical addresses and ports.
        line_a = connected(a, (STACK_ADDR, LINE_PORT), bind=(HOST_ADDR, port))
        line_b = connected(b, (STACK_ADDR, LINE_PORT), bind=(HOST_ADDR, port))
        relay_a = connected(a, (SERVER, ECHO_PORT), bind=(HOST_ADDR, port + 1))
        relay_b = connected(b, (SERVER, ECHO_PORT), bind=(HOST_ADDR, port + 1))
        six_a = connected(a, (STACK_ADDR6, LINE_PORT), socket.AF_INET6, bind=(HOST_ADDR6, port + 2))
        six_b = connected(b, (STACK_ADDR6, LINE_PORT), socket.AF_INET6, bind=(HOST_ADDR6, port + 2))
        socks += [line_a, line_b, relay_a, relay_b, six_a, six_b]
        udp = {}
        for ns in (a, b):
            u = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.settimeout(5)
            u.bind((HOST_ADDR, port + 3))
            socks.append(u)
            udp[ns.name] = u

        flows = stackctl_json("flows", netns=many.host)
        same = [f for f in flows if f["remote"] == HOST_ADDR and f["rport"] == port and f["lport"] == LINE_PORT]
        assert sorted(f["ns"] for f in same) == sorted([a.name, b.name]), flows
        relayed = [f for f in flows if f["rport"] == port + 1 and f.get("local") == SERVER]
        assert sorted(f["ns"] for f in relayed) == sorted([a.name, b.name]), flows

        for sock_a, sock_b, echo in ((line_a, line_b, False), (six_a, six_b, False), (relay_a, relay_b, True)):
            text_a, text_b = f"{a.name} says {'a' * 3000}", f"{b.name} tells {'b' * 5000}"
            sock_a.sendall(text_a.encode() + b"\n")
            sock_b.sendall(text_b.encode() + b"\n")
            got_b = recv_exactly(sock_b, len(text_b) + 1)
            got_a = recv_exactly(sock_a, len(text_a) + 1)
            for text, got in ((text_a, got_a), (text_b, got_b)):
                assert got == (text if echo else text[::-1]).encode() + b"\n", got[:80]
        # UDP: the same source in both, to the stack's echo and relayed to the server's.
        for dest in ((STACK_ADDR, ECHO_PORT), (SERVER, ECHO_PORT)):
            for ns in (a, b):
                udp[ns.name].sendto(f"datagram from {ns.name}".encode(), dest)
            for ns in (a, b):
                data, peer = udp[ns.name].recvfrom(2048)
                assert data == f"datagram from {ns.name}".encode() and peer == dest, (data, peer)
    finally:
        for s in socks:
            s.close()


# -- (c) isolation --------------------------------------------------------------------------------

class Capture:
    """dumpcap on a namespace's ustack0, inside it, to a pcap file."""

    def __init__(self, ns: Namespace) -> None:
        self.path = os.path.join(tempfile.mkdtemp(prefix="ustack-many-cap-"), "b.pcap")
        self.proc = ns.popen("dumpcap", "-q", "-P", "-i", "ustack0", "-w", self.path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        until(lambda: os.path.exists(self.path) and os.path.getsize(self.path) >= 24, 15, "dumpcap writing")
        time.sleep(0.5)  # the file header is written just before capturing starts

    def stop(self) -> bytes:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        with open(self.path, "rb") as f:
            data = f.read()
        os.unlink(self.path)
        os.rmdir(os.path.dirname(self.path))
        return data

    @staticmethod
    def ports(ns: Namespace, data: bytes) -> set[int]:
        """Every TCP and UDP port of the packets captured (tshark reads the file)."""
        with tempfile.NamedTemporaryFile(suffix=".pcap") as f:
            f.write(data)
            f.flush()
            out = subprocess.run(["tshark", "-r", f.name, "-T", "fields", "-e", "tcp.srcport", "-e", "tcp.dstport",
                                  "-e", "udp.srcport", "-e", "udp.dstport"], capture_output=True, text=True,
                                 check=True).stdout
        return {int(p) for p in out.replace(",", " ").split()}


def test_nothing_of_one_namespace_reaches_another(many):
    a, b = many.clients[4], many.clients[5]
    marker = uuid.uuid4().bytes  # 16 bytes in every payload a sends
    b_marker = uuid.uuid4().bytes
    # b listens on its own 10.0.0.1 — which is a's own address too: a cannot even name b.
    listener = b.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST_ADDR, 9999))
    listener.listen(8)
    listener.settimeout(0.5)
    b_udp = b.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b_udp.bind((HOST_ADDR, 9998))
    b_udp.settimeout(0.5)
    capture = Capture(b)
    a_ports: set[int] = set()
    try:
        ping = a.run("ping", "-c", "3", "-i", "0.2", "-W", "5", "-p", marker.hex(), STACK_ADDR, check=False)
        assert ping.returncode == 0, ping.stdout
        for address in ((STACK_ADDR, LINE_PORT), (SERVER, ECHO_PORT)):
            with connected(a, address) as sock:
                a_ports.add(sock.getsockname()[1])
                text = "x" + marker.hex()
                got = line_exchange(sock, text)
                assert got in (text.encode() + b"\n", text[::-1].encode() + b"\n")
        with a.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(5)
            for dest in ((STACK_ADDR, ECHO_PORT), (SERVER, ECHO_PORT)):
                u.sendto(marker, dest)
                assert u.recvfrom(100)[0] == marker
            u.sendto(marker, (HOST_ADDR, 9998))   # b's socket, by b's address: a's own
            u.sendto(marker, ("10.0.0.3", 9998))  # a neighbour on the device's subnet
            a_ports.add(u.getsockname()[1])
        with a.socket() as s:
            s.settimeout(5)
            with pytest.raises(ConnectionRefusedError):  # a's own address, where a listens on nothing
                s.connect((HOST_ADDR, 9999))
        with pytest.raises(socket.timeout):
            listener.accept()
        with pytest.raises(socket.timeout):
            b_udp.recvfrom(100)
        # b's own traffic does show on the capture (it could catch a leak).
        ping_b = b.run("ping", "-c", "1", "-W", "5", "-p", b_marker.hex(), STACK_ADDR, check=False)
        assert ping_b.returncode == 0, ping_b.stdout
        time.sleep(0.5)
    finally:
        data = capture.stop()
        listener.close()
        b_udp.close()
    assert b_marker in data, "the capture on b's device missed b's own ping"
    assert marker not in data, "a's payload appeared on b's device"
    leaked = Capture.ports(b, data) & a_ports
    assert not leaked, f"packets with a's ports on b's device: {leaked}"


# -- publishing into one namespace --------------------------------------------------------------

def test_a_port_is_published_into_the_namespace_named(many):
    """stackctl publish add --ns b: a connection to the port where the stack runs reaches b's server,
    not the first namespace's (each namespace has a server on the same address and port)."""
    servers = []
    try:
        for ns in many.clients[:3]:
            listener = ns.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", 8008))
            listener.listen(8)
            servers.append(listener)

            def answer(listener=listener, name=ns.name) -> None:
                with contextlib.suppress(OSError):
                    while True:
                        conn, _ = listener.accept()
                        with conn:
                            conn.sendall(f"served by {name}\n".encode())
            threading.Thread(target=answer, daemon=True).start()
        target = many.clients[1]
        added = stackctl("publish", "add", "tcp:18008:8008", "--ns", target.name, netns=many.host)
        assert added.returncode == 0, added.stderr
        listed = stackctl_json("publish", "list", netns=many.host)
        assert {"proto": "tcp", "port": 18008, "to_port": 8008, "ns": target.name} in listed, listed
        assert stackctl_json("publish", "list", "--ns", many.clients[0].name, netns=many.host) == [
            r for r in listed if r["ns"] == many.clients[0].name]

        def answered():
            with many.topo.host.socket() as sock:
                sock.settimeout(5)
                try:
                    sock.connect(("192.0.2.1", 18008))
                    return recv_exactly(sock, len(target.name) + 11)
                except OSError:
                    return None
        assert until(answered, 10, "an answer through the published port") == f"served by {target.name}\n".encode()
        removed = stackctl("publish", "remove", "tcp:18008:8008", "--ns", target.name, netns=many.host)
        assert removed.returncode == 0, removed.stderr
        assert not [r for r in stackctl_json("publish", "list", netns=many.host) if r["port"] == 18008]
    finally:
        for listener in servers:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()


# -- (d) a 21st namespace attached and detached while the others talk --------------------------------

def test_a_namespace_attached_and_detached_at_run_time_under_traffic(many):
    extra = Namespace("usclient")
    chatter: list[Chatter] = []
    held: list[socket.socket] = []
    try:
        chatter = [Chatter(ns, (STACK_ADDR, LINE_PORT), echo=False) for ns in many.clients]
        chatter += [Chatter(ns, (SERVER, ECHO_PORT), echo=True) for ns in many.clients[:5]]
        time.sleep(0.5)
        attached = stackctl("attach", extra.name, netns=many.host)
        assert attached.returncode == 0, attached.stderr
        assert extra.name in attached.stdout
        until(lambda: HOST_ADDR in extra.run("ip", "-o", "addr", "show", "dev", "ustack0", check=False).stdout.decode(),
              15, f"ustack0 with {HOST_ADDR} in {extra.name}")
        assert len(many.namespaces()) == COUNT + 1
        why = served_by_the_stack(many, extra)
        assert not why, why
        many.stack.wait_for(lambda recs: any(r.get("event") == "namespace_attached" and r.get("ns") == extra.name
                                             for r in recs), 10, "a namespace_attached record")
        found = stackctl("status", "--json", netns=extra.name)  # found by the namespace attached at run time
        assert found.returncode == 0, found.stderr

        line = connected(extra, (STACK_ADDR, LINE_PORT))
        assert line_exchange(line, "abc") == b"cba\n"
        relayed = connected(extra, (SERVER, ECHO_PORT))
        relayed.sendall(f"{extra.name}\n".encode())
        recv_exactly(relayed, len(extra.name) + 1)
        held += [line, relayed]
        assert len(stackctl_json("flows", "--ns", extra.name, netns=many.host)) >= 2

        detached = stackctl("detach", extra.name, netns=many.host)
        assert detached.returncode == 0, detached.stderr
        assert extra.name not in detached.stdout
        # Its connections are reset toward it (egress writes those resets before it lets the device
        # go), and closed upstream.
        outcomes = {}
        for name, sock in (("line", line), ("relayed", relayed)):
            sock.settimeout(10)
            try:
                outcomes[name] = "eof" if sock.recv(100) == b"" else "data"
            except ConnectionResetError:
                outcomes[name] = "reset"
            except socket.timeout:
                outcomes[name] = "silent"
        until(lambda: device_gone(extra), 10, f"ustack0 gone from {extra.name}")
        assert outcomes == {"line": "reset", "relayed": "reset"}, outcomes
        until(lambda: many.echo.ended.get(extra.name), 10, "the relayed connection closed upstream")

        many.stack.wait_for(lambda recs: any(r.get("event") == "namespace_detached" and r.get("ns") == extra.name
                                             and r.get("reason") == "stackctl" for r in recs),
                            10, "a namespace_detached record, reason stackctl")
        assert extra.name not in {r["name"] for r in many.namespaces()} and len(many.namespaces()) == COUNT
        until(lambda: not any(f.get("ns") == extra.name for f in stackctl_json("flows", netns=many.host)), 10,
              f"no flow of {extra.name}")
        assert not any(r.get("ns") == extra.name for r in stackctl_json("conns", netns=many.host))
        assert stackctl("status", netns=extra.name).returncode != 0  # no longer served
        assert not os.path.exists(f"/etc/netns/{extra.name}/resolv.conf")  # nothing of it left behind

        for c in chatter:
            assert c.error is None, c.error
        time.sleep(0.5)
    finally:
        for c in chatter:
            c.stop()
        for s in held:
            s.close()
        extra.delete()
    for c in chatter:
        assert c.error is None, c.error
        assert c.exchanges > 20, (c.ns.name, c.exchanges)
        assert c.slowest < 2.0, f"{c.ns.name}: an exchange took {c.slowest:.2f} s while another namespace came and went"


# -- (e) a namespace deleted while attached ------------------------------------------------------

def test_a_namespace_deleted_while_attached_is_detached_and_costs_the_others_nothing(many):
    gone = many.clients[-1]
    others = many.clients[:-1]
    chatter: list[Chatter] = []
    held: list[socket.socket] = []
    try:
        chatter = [Chatter(ns, (STACK_ADDR, LINE_PORT), echo=False) for ns in others[:5]]
        relayed = connected(gone, (SERVER, ECHO_PORT))
        relayed.sendall(f"{gone.name}\n".encode())
        recv_exactly(relayed, len(gone.name) + 1)
        held.append(relayed)
        time.sleep(0.3)
        subprocess.run(["ip", "netns", "del", gone.name], check=True)
        many.stack.wait_for(lambda recs: any(r.get("event") == "namespace_detached" and r.get("ns") == gone.name
                                             and r.get("reason") == "namespace_gone" for r in recs),
                            20, "a namespace_detached record, reason namespace_gone")
        until(lambda: many.echo.ended.get(gone.name), 10, "its relayed connection closed upstream")
        rows = many.namespaces()
        assert gone.name not in {r["name"] for r in rows} and len(rows) == COUNT - 1, rows
        until(lambda: not any(f.get("ns") == gone.name for f in stackctl_json("flows", netns=many.host)), 10,
              f"no flow of {gone.name}")
        listed = [r for r in stackctl_json("list", netns=many.host) if r["netns"]["name"] == many.host]
        assert len(listed[0]["attached"]) == COUNT - 1, listed
    finally:
        for c in chatter:
            c.stop()
        for s in held:
            s.close()
    for c in chatter:
        assert c.error is None, c.error
        assert c.slowest < 2.0, f"{c.ns.name}: an exchange took {c.slowest:.2f} s while {gone.name} went"
    # Every other namespace is served as before.
    with concurrent.futures.ThreadPoolExecutor(len(others)) as pool:
        failed = {ns.name: why for ns, why in zip(others, pool.map(lambda ns: served_by_the_stack(many, ns), others))
                  if why}
    assert not failed, failed
    assert many.stack.proc.poll() is None


def test_nothing_escaped_the_test_namespaces(many):
    assert many.topo.escaped() == 0
