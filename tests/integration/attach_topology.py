"""The three test-made namespaces of attach mode, and servers the tests run in them.

  client ns  ustack0 10.0.0.1 (made by the stack, default route through it)
      │  TUN, attached
  host ns    the stack's processes; ve-host 192.0.2.1/24, 2001:db8::1/64
      │  veth
  server ns  ve-server 192.0.2.10/24, 2001:db8::10/64: the only servers relayed to

An nftables guard in the host namespace lets out only loopback and the
veth toward the documentation prefixes; everything else leaving it is
dropped and counted, so nothing relayed can reach beyond the namespaces the
test made. Nothing here touches the machine's main namespace.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.integration.netns import Namespace, Stack

SERVER = "192.0.2.10"
SERVER6 = "2001:db8::10"
HOST_SIDE = "192.0.2.1"
ABSENT = "192.0.2.99"       # on the server link, but nobody answers ARP for it
METADATA = "169.254.169.254"  # served in the host namespace: the relay must refuse it

GUARD = """
table inet ustack_guard {
  counter escaped {}
  chain out {
    type filter hook output priority 0; policy accept;
    oifname "lo" accept
    oifname "ve-host" ip daddr 192.0.2.0/24 accept
    oifname "ve-host" ip6 daddr 2001:db8::/64 accept
    oifname "ve-host" ip6 daddr { ff02::/16, fe80::/10 } accept
    counter name escaped drop
  }
}
"""


class Topology:
    def __init__(self) -> None:
        self.host = Namespace("ushost")
        self.server = Namespace("usserver")
        self.client = Namespace("usclient")
        host, server = self.host, self.server
        host.run("ip", "link", "add", "ve-host", "type", "veth", "peer", "name", "ve-server",
                 "netns", server.name)
        host.run("ip", "addr", "add", f"{HOST_SIDE}/24", "dev", "ve-host")
        host.run("ip", "addr", "add", "2001:db8::1/64", "dev", "ve-host", "nodad")
        host.run("ip", "link", "set", "ve-host", "up")
        server.run("ip", "addr", "add", f"{SERVER}/24", "dev", "ve-server")
        server.run("ip", "addr", "add", f"{SERVER6}/64", "dev", "ve-server", "nodad")
        server.run("ip", "link", "set", "ve-server", "up")
        host.run("ip", "addr", "add", f"{METADATA}/32", "dev", "lo")
        # Unprivileged ICMP echo sockets for the relay, in the namespace where the stack runs.
        host.run("sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647")
        host.run("nft", "-f", "-", input=GUARD.encode())

    def escaped(self) -> int:
        """Packets the guard stopped from leaving the host namespace."""
        out = self.host.run("nft", "list", "counter", "inet", "ustack_guard", "escaped").stdout.decode()
        return int(out.split("packets")[1].split()[0])

    def delete(self) -> None:
        for ns in (self.client, self.server, self.host):
            ns.delete()


def attached_stack(topo: Topology, *honcho_args: str, env: dict[str, str] | None = None,
                   run_dir: str | None = None) -> Stack:
    """The stack started in the host namespace, attached to the client namespace, ready
    (``run_dir`` as for ``Stack``: "" for its default one, where stackctl finds it by namespace)."""
    stack = Stack(topo.host, *honcho_args, env={"USTACK_ATTACH": topo.client.name, **(env or {})}, run_dir=run_dir)
    try:
        stack.wait_ready()
    except BaseException:
        stack.stop()
        raise
    return stack


class Server:
    """A TCP server in a test namespace, one thread per connection running ``handler(conn)``."""

    def __init__(self, ns: Namespace, address: str, port: int, handler, family=socket.AF_INET) -> None:
        self.sock = ns.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen(512)
        self.handler = handler
        self.accepted = 0
        self.outcomes: list[str] = []  # what handlers report
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                outcome = self.handler(conn)
            except OSError as exc:
                outcome = type(exc).__name__
            if outcome:
                self.outcomes.append(outcome)

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def echo(conn: socket.socket) -> str:
    """Echo until the client's FIN, then finish our side too (half-close mirrored)."""
    while data := conn.recv(1 << 20):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    return "eof"


def pusher(payload: bytes):
    """Send ``payload`` as fast as the path takes it, then close."""
    def handler(conn: socket.socket) -> str:
        conn.sendall(payload)
        return "sent"
    return handler


def read_until_eof_or_reset(conn: socket.socket) -> str:
    """Read until the client finishes (eof) or resets (ConnectionResetError)."""
    while conn.recv(1 << 16):
        pass
    return "eof"


def reset_after_hello(conn: socket.socket) -> str:
    """Answer the first bytes with a reset (SO_LINGER 0)."""
    conn.recv(100)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    return "reset_sent"


class UdpServer:
    """A UDP server in a test namespace answering each datagram with ``answer(data)``."""

    def __init__(self, ns: Namespace, address: str, port: int, answer, family=socket.AF_INET) -> None:
        self.sock = ns.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((address, port))
        self.answer = answer
        self.received = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            if peer is None:  # woken by close()
                return
            self.received += 1
            self.sock.sendto(self.answer(data), peer)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recvfrom
        self.sock.close()
