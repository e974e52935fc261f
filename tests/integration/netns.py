"""Test-made network namespaces and the stack started in them with honcho.

Every namespace is created here and deleted here, with every process in it
killed: nothing is configured in the machine's main namespace. Sockets for a
namespace are created by switching the calling thread into it just for the
``socket()`` call (a socket stays in the namespace it was made in).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time
import uuid

from pipeline.respawn import die_with_parent

ROOT = pathlib.Path(__file__).resolve().parents[2]
STACK_ADDR = "10.0.0.2"
HOST_ADDR = "10.0.0.1"
STACK_ADDR6 = "fd00::2"
HOST_ADDR6 = "fd00::1"
RUN_DIR_BASE = "/run/ustack-test"  # each stack's ipc sockets: RUN_DIR_BASE/<namespace>
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def require_root_and_tun() -> None:
    """Integration tests need root, TUN and namespaces: fail loudly, never skip."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    if not os.path.exists("/dev/net/tun"):
        problems.append("no /dev/net/tun")
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        problems.append("`ip netns` unavailable")
    if problems:
        raise RuntimeError("integration tests cannot run: " + ", ".join(problems) +
                           " (run them as root via scripts/test)")


class Namespace:
    def __init__(self, prefix: str = "ustest") -> None:
        require_root_and_tun()
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *argv: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], check=check, timeout=timeout,
                              capture_output=True, **kw)

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kw)

    @contextlib.contextmanager
    def entered(self):
        """Run the body with this thread inside the namespace."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            yield
        finally:
            _setns(home)
            os.close(home)
            os.close(target)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        with self.entered():
            return socket.socket(family, type, proto)

    def delete(self) -> None:
        """Kill whatever still runs inside, then delete the namespace."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self._pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 3
            while self._pids() and time.monotonic() < deadline:
                time.sleep(0.05)
        subprocess.run(["ip", "netns", "del", self.name], check=False)
        # This namespace's stacks' ipc sockets (only its own: other test runs may be live).
        shutil.rmtree(f"{RUN_DIR_BASE}/{self.name}", ignore_errors=True)

    def _pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


CLIENT_ADDR = "192.168.77.2"
ROUTER_ADDR = "192.168.77.1"
CLIENT_ADDR6 = "fd77::2"
ROUTER_ADDR6 = "fd77::1"


def _wire_ipv6(ns: Namespace, address: str, dev: str) -> None:
    """An IPv6 address usable at once (nodad: no second of 'tentative')."""
    ns.run("ip", "-6", "addr", "add", address, "dev", dev, "nodad")


def routed_client(stack_ns: Namespace) -> Namespace:
    """A second namespace that reaches the stack through the first one, as a router.

    client ns  ve-client 192.168.77.2 --veth-- ve-stack 192.168.77.1  stack ns  ustack0 10.0.0.1 -> stack 10.0.0.2

    Loss and bottlenecks applied to *forwarded* packets are real losses for
    both TCPs; drops in the output hook of the sending host's own namespace
    are not (the kernel's TCP sees a local send failure and simply retries).
    """
    client = Namespace("usclient")
    stack_ns.run("ip", "link", "add", "ve-stack", "type", "veth", "peer", "name", "ve-client",
                 "netns", client.name)
    stack_ns.run("ip", "addr", "add", f"{ROUTER_ADDR}/24", "dev", "ve-stack")
    stack_ns.run("ip", "link", "set", "ve-stack", "up")
    stack_ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    client.run("ip", "addr", "add", f"{CLIENT_ADDR}/24", "dev", "ve-client")
    client.run("ip", "link", "set", "ve-client", "up")
    client.run("ip", "route", "add", "default", "via", ROUTER_ADDR)
    stack_ns.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    _wire_ipv6(stack_ns, f"{ROUTER_ADDR6}/64", "ve-stack")
    _wire_ipv6(client, f"{CLIENT_ADDR6}/64", "ve-client")
    client.run("ip", "-6", "route", "add", "default", "via", ROUTER_ADDR6)
    return client


class Stack:
    """`honcho start` run in a namespace exactly as a user runs it, output captured."""

    # Every stack made in this process: tests/integration/conftest.py removes the
    # logs of those whose tests all passed (a failing test's log stays for reading).
    made: list[Stack] = []

    def __init__(self, ns: Namespace, *honcho_args: str, env: dict[str, str] | None = None,
                 run_dir: str | None = None) -> None:
        """``run_dir`` "" leaves the stack its default run directory (under /run/ustack), as a user's."""
        self.ns = ns
        self.run_dir = f"{RUN_DIR_BASE}/{ns.name}" if run_dir is None else run_dir
        self.log_path = ROOT / ".pytest_cache" / f"stack-{ns.name}-{uuid.uuid4().hex[:6]}.log"
        self.log_path.parent.mkdir(exist_ok=True)
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.run_dir:
            full_env["USTACK_RUN_DIR"] = self.run_dir
        full_env.update(env or {})
        self._log_file = open(self.log_path, "wb")
        Stack.made.append(self)
        # honcho goes (and stops the stack) if whoever started it dies without cleaning up.
        self.proc = ns.popen("honcho", "start", *honcho_args, cwd=ROOT, env=full_env,
                             stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
                             preexec_fn=die_with_parent)

    @property
    def stopped(self) -> bool:
        """stop() has run: nothing writes the log any more."""
        return self._log_file.closed

    def stackctl(self, *args: str) -> subprocess.CompletedProcess:
        """`stackctl ARGS` for this stack: by its run directory, or found as a user's is (--netns)."""
        which = ["--netns", self.ns.name] if not self.run_dir else []
        env = dict(os.environ, **({"USTACK_RUN_DIR": self.run_dir} if self.run_dir else {}))
        return subprocess.run([str(ROOT / ".venv" / "bin" / "stackctl"), *which, *args], env=env,
                              capture_output=True, text=True, timeout=10)

    def status(self) -> dict:
        """What `stackctl status --json` says: each process's counters and gauges."""
        done = self.stackctl("status", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def owners(self, wanted: list, key_of, timeout: float = 10.0) -> dict:
        """key_of(record) -> worker for every connection `stackctl conns` lists, once each key in
        ``wanted`` is among them (the workers hold them now)."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.stackctl("conns", "--json")
            assert done.returncode == 0, done.stderr
            table = {key_of(r): r["worker"] for r in json.loads(done.stdout)}
            if all(k in table for k in wanted):
                return table
            assert time.monotonic() < deadline, f"not all of {wanted} in a worker's connection table"
            time.sleep(0.2)

    def records(self) -> list[dict]:
        """Every JSON log record the processes wrote so far (honcho's prefix removed)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            _, sep, body = line.partition(" | ")
            if sep and body.startswith("{"):
                out.append(json.loads(body))
        return out

    def lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "condition") -> None:
        """Poll the log until predicate(records) holds; fail with the log's tail if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.records()):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = "\n".join(self.lines()[-40:])
        raise AssertionError(f"stack never reached: {what}\n--- log tail ---\n{tail}")

    def wait_ready(self, roles: dict[str, int] | None = None, timeout: float = 20.0) -> None:
        """Wait until ingress has seen workers of each role (role -> count)."""
        roles = roles or {"icmp": 1, "udp": 1, "tcp": 1}

        def ready(records: list[dict]) -> bool:
            joined: dict[str, set[str]] = {}
            for r in records:
                if r.get("event") == "worker_joined":
                    joined.setdefault(r["role"], set()).add(r["worker"])
            return all(len(joined.get(role, ())) >= n for role, n in roles.items())

        self.wait_for(ready, timeout, f"workers joined {roles}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> float:
        """Stop honcho the way Ctrl-C does; return how long it took."""
        start = time.monotonic()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_file.close()
        return time.monotonic() - start


def exchange(sock: socket.socket, address: tuple, payload: bytes, timeout: float = 15) -> tuple[int, bytes]:
    """Connect, send ``payload``, half-close, read until the peer's FIN: (our port, what came back)."""
    sock.settimeout(timeout)
    sock.connect(address)
    port = sock.getsockname()[1]
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return port, data


def honcho_name(pid: int) -> str | None:
    """The HONCHO_PROCESS_NAME a process was started with (None: not one of the stack's)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"HONCHO_PROCESS_NAME=")), None)


def parent_pid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def is_supervised(pid: int, name: str) -> bool:
    """True for a pipeline process itself, not its respawn wrapper: the wrapper (C or Python,
    pipeline/respawn.py) is its parent and carries the same honcho name; the wrapper's parent is
    honcho, which carries none."""
    return honcho_name(parent_pid(pid)) == name


def process_pid(ns: Namespace, name: str, module: str) -> int:
    """The pid of the pipeline process in ``ns`` running ``python -m module`` as honcho's
    ``name`` (the process itself, not its respawn wrapper)."""
    for pid in ns._pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if module.encode() in argv and honcho_name(pid) == name and is_supervised(pid, name):
            return pid
    raise LookupError(f"no running {module} named {name}")


NARROW_ROUTER = ("192.168.78.1", "fd78::1")  # the stack's namespace, on the narrow link
NARROW_MID = ("192.168.78.2", "fd78::2")
FAR_ROUTER = ("192.168.79.1", "fd79::1")  # the middle namespace, on the client's link
FAR_CLIENT = ("192.168.79.2", "fd79::2")


def narrow_path_client(stack_ns: Namespace, mtu: int) -> tuple[Namespace, Namespace]:
    """A client two router hops away whose path has a narrow link in the middle: (middle, client).

    stack ns  ustack0 (1500) | ve-narrow ==MTU== ve-narrow-m | middle ns | ve-far (1500) -- ve-client | client ns

    Both ends have the bigger MTU (the client offers an MSS for 1500), so
    only the stack's namespace, forwarding our segments onto the narrow link,
    can tell us: with ICMP "fragmentation needed" or Packet Too Big. IPv6
    is wired only when the narrow MTU allows it (RFC 8200 §5: 1280).
    """
    ipv6 = mtu >= 1280
    middle, client = Namespace("usmid"), Namespace("usclient")
    stack_ns.run("ip", "link", "add", "ve-narrow", "mtu", str(mtu), "type", "veth", "peer", "name", "ve-narrow-m",
                 "mtu", str(mtu), "netns", middle.name)
    middle.run("ip", "link", "add", "ve-far", "type", "veth", "peer", "name", "ve-client", "netns", client.name)
    links = ((stack_ns, "ve-narrow", NARROW_ROUTER), (middle, "ve-narrow-m", NARROW_MID),
             (middle, "ve-far", FAR_ROUTER), (client, "ve-client", FAR_CLIENT))
    for ns, dev, (addr4, addr6) in links:
        ns.run("ip", "addr", "add", f"{addr4}/24", "dev", dev)
        if ipv6:
            _wire_ipv6(ns, f"{addr6}/64", dev)
        ns.run("ip", "link", "set", dev, "up")
    for ns in (stack_ns, middle):
        ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        if ipv6:
            ns.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    routes = ((stack_ns, "192.168.79.0/24", NARROW_MID[0]), (middle, "10.0.0.0/24", NARROW_ROUTER[0]),
              (client, "default", FAR_ROUTER[0]))
    routes6 = ((stack_ns, "fd79::/64", NARROW_MID[1]), (middle, "fd00::/64", NARROW_ROUTER[1]),
               (client, "default", FAR_ROUTER[1]))
    for ns, prefix, via in routes + (routes6 if ipv6 else ()):
        ns.run("ip", "-6" if ":" in via else "-4", "route", "add", prefix, "via", via)
    return middle, client
