"""The worker shell's real sockets for relayed flows (attach mode).

Contract: ``Upstreams`` carries out a relaying core's commands
(``workers.attach.relay``) on non-blocking sockets opened in the namespace the
worker runs in, registers their descriptors in the shell's poller next to
the ZeroMQ socket, and turns what the kernel reports into ``Upstream``
events. It holds at most what the core handed it to write (the core stops
feeding it on BLOCKED) and reads only while the core has not paused the
flow, so no buffer here grows without bound.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import struct
import time
from collections.abc import Hashable

import zmq

from workers.attach import relay
from workers.attach.relay import Upstream

READ_SIZE = 256 * 1024   # one recv per readiness: the core holds what the namespace cannot take yet
READS_PER_WAKE = 4
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST

_UNREACHABLE = {errno.EHOSTUNREACH: "host", errno.ENETUNREACH: "net"}
# <linux/in.h>, <linux/in6.h>: report every ICMP error on a datagram socket, not only port unreachable
# (without them Linux reports host and network unreachable to nobody).
_IP_RECVERR, _IPV6_RECVERR = 11, 25
_IP_BIND_ADDRESS_NO_PORT = 24  # <linux/in.h>: a bind() before connect() reserves no port of its own
_MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
_SOCK_TYPE = {relay.TCP: (socket.SOCK_STREAM, 0), relay.UDP: (socket.SOCK_DGRAM, 0),
              relay.ICMP: (socket.SOCK_DGRAM, None)}
LISTENING = "listening"  # an entry's proto while it is a published port's listening socket
LISTENING_UDP = "listening-udp"  # a published UDP port's socket
ACCEPTS_PER_WAKE = 16


class _Entry:
    __slots__ = ("key", "sock", "proto", "connecting", "paused", "out", "shut_pending", "eof", "asked")

    def __init__(self, key: Hashable, sock: socket.socket, proto: str, connecting: bool) -> None:
        self.key = key
        self.sock = sock
        self.proto = proto
        self.connecting = connecting
        self.paused = True  # a TCP flow reads only once its core resumes it (handshake done)
        self.out = bytearray()
        self.shut_pending = False
        self.eof = False
        self.asked = 0.0  # while timing: when we sent what no answer has come for yet


class Upstreams:
    def __init__(self, poller: zmq.Poller, outbound: dict[int, str] | None = None) -> None:
        self.poller = poller
        self.outbound = outbound or {}  # address family -> the address relayed flows leave from
        self.by_key: dict[Hashable, _Entry] = {}
        self.by_fd: dict[int, _Entry] = {}
        self.accepted = 0  # provisional keys of accepted sockets
        # The latency budget's upstream stage (pipeline.latency): while ``timing``, each wait
        # from a send to the first data back, in microseconds, until the shell sends them on.
        self.timing = False
        self.waits: list[int] = []

    def __len__(self) -> int:
        return len(self.by_key)

    # -- commands --------------------------------------------------------------

    def execute(self, commands: list[relay.Command]) -> list[Upstream]:
        events: list[Upstream] = []
        for cmd in commands:
            entry = self.by_key.get(cmd.key)
            if isinstance(cmd, relay.Open):
                if entry is None:
                    self._open(cmd, events)
            elif isinstance(cmd, relay.Listen):
                if entry is None:
                    self._listen(cmd, events)
            elif entry is None:
                continue  # already gone (its close raced the command)
            elif isinstance(cmd, relay.Send):
                self._send(entry, cmd.data, events)
            elif isinstance(cmd, relay.Pause):
                entry.paused = cmd.paused
                self._watch(entry)
            elif isinstance(cmd, relay.ShutWrite):
                entry.shut_pending = True
                if not entry.out:
                    self._shut(entry)
            elif isinstance(cmd, relay.Close):
                self._close(entry, cmd.reset)
            elif isinstance(cmd, relay.SendTo):
                address, _, port = cmd.peer.rpartition("|")
                with contextlib.suppress(OSError):  # lost like any datagram the network drops
                    entry.sock.sendto(cmd.data, (address, int(port)))
            elif isinstance(cmd, relay.Adopt):
                del self.by_key[entry.key]
                entry.key = cmd.new
                self.by_key[cmd.new] = entry
        return events

    def _listen(self, cmd: relay.Listen, events: list[Upstream]) -> None:
        """A published port: every TCP worker listens on it and the kernel spreads connections.
        A port that cannot be bound (someone else's now) is reported, never fatal: the table
        changes while the stack runs."""
        kind = socket.SOCK_STREAM if cmd.proto == relay.TCP else socket.SOCK_DGRAM
        # One dual-stack socket: IPv6 clients, and IPv4 ones as mapped addresses (RFC 4291 §2.5.5.2).
        sock = socket.socket(socket.AF_INET6, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("::", cmd.port))
            if cmd.proto == relay.TCP:
                _keepalive(sock, cmd.keepalive)
                sock.listen(512)
        except OSError as exc:
            sock.close()
            events.append(Upstream(cmd.key, relay.LISTEN_FAILED, detail=exc.strerror or str(exc)))
            return
        entry = _Entry(cmd.key, sock, LISTENING if cmd.proto == relay.TCP else LISTENING_UDP, connecting=False)
        entry.paused = False
        self.by_key[cmd.key] = entry
        self.by_fd[sock.fileno()] = entry
        self._watch(entry)

    def _accept(self, listener: _Entry, events: list[Upstream]) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                sock, (address, port, *_) = listener.sock.accept()
            except BlockingIOError:
                return
            except OSError:
                return  # e.g. ECONNABORTED, EMFILE: the client retries
            sock.setblocking(False)
            self.accepted += 1
            key = ("accepted", self.accepted)
            entry = _Entry(key, sock, relay.TCP, connecting=False)
            self.by_key[key] = entry
            self.by_fd[sock.fileno()] = entry
            self._watch(entry)  # paused: nothing is read until the namespace side is connected
            # The client as the dual-stack socket saw it (IPv4 ones IPv4-mapped): where it enters
            # the namespace from is the core's choice (workers.attach.inbound).
            events.append(Upstream(key, relay.ACCEPTED, f"{address}|{port}".encode(),
                                   detail=str(listener.sock.getsockname()[1])))

    def _open(self, cmd: relay.Open, events: list[Upstream]) -> None:
        family = socket.AF_INET if len(cmd.address) == 4 else socket.AF_INET6
        kind, proto = _SOCK_TYPE[cmd.proto]
        if proto is None:
            proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
        try:
            sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, proto)
        except OSError as exc:
            if cmd.proto == relay.ICMP and exc.errno in (errno.EACCES, errno.EPERM):
                # Our group is outside net.ipv4.ping_group_range (a new namespace's is "1 0").
                events.append(Upstream(cmd.key, relay.REFUSED, detail="ping_group_range"))
            else:
                events.append(Upstream(cmd.key, relay.UNREACHABLE, detail="host", data=str(exc).encode()))
            return
        source = self.outbound.get(family) if cmd.relayed else None
        if source is not None:  # USTACK_OUTBOUND_ADDR(6): the relayed flow leaves from there
            if cmd.proto == relay.TCP:  # the port is picked at connect(), per destination
                sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            try:
                sock.bind((source, 0))
            except OSError as exc:  # the address went away since the start
                sock.close()
                events.append(_connect_error(cmd.key, exc.errno or errno.EADDRNOTAVAIL))
                return
        if cmd.proto == relay.TCP:
            _keepalive(sock, cmd.keepalive)
        elif cmd.proto == relay.UDP:
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
        address = socket.inet_ntop(family, cmd.address)
        code = sock.connect_ex((address, cmd.port))
        if code == errno.EINPROGRESS and cmd.proto == relay.TCP and _writable_now(sock):
            # A server on this host (loopback, a veth): Linux says EINPROGRESS, yet the handshake
            # is already done. Settle it now, not a poll registration and a wake-up later.
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        entry = _Entry(cmd.key, sock, cmd.proto, connecting=code == errno.EINPROGRESS)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            events.append(_connect_error(cmd.key, code))
            return
        if cmd.proto != relay.TCP:
            entry.paused = False  # datagrams: read from the start
        self.by_key[cmd.key] = entry
        self.by_fd[sock.fileno()] = entry
        self._watch(entry)
        if not entry.connecting and cmd.proto == relay.TCP:
            events.append(Upstream(cmd.key, relay.CONNECTED))

    def _send(self, entry: _Entry, data: bytes, events: list[Upstream]) -> None:
        if self.timing and not entry.asked:
            entry.asked = time.monotonic()
        if entry.proto != relay.TCP:
            try:
                entry.sock.send(data)
            except BlockingIOError:
                pass  # a datagram the socket has no room for is lost, as on the wire
            except OSError as exc:
                self._fail(entry, exc, events)
            return
        if entry.out:
            entry.out += data
            return
        try:
            sent = entry.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(entry, exc, events)
            return
        if sent < len(data):
            entry.out += memoryview(data)[sent:]
            self._watch(entry)
            events.append(Upstream(entry.key, relay.BLOCKED))

    def _shut(self, entry: _Entry) -> None:
        entry.shut_pending = False
        try:
            entry.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already reset: its reader reports it

    def _close(self, entry: _Entry, reset: bool) -> None:
        fd = entry.sock.fileno()
        self.by_key.pop(entry.key, None)
        self.by_fd.pop(fd, None)
        if fd >= 0:
            _unregister(self.poller, fd)
        if reset and entry.proto == relay.TCP:
            try:
                entry.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        entry.sock.close()

    def close_all(self) -> None:
        for entry in list(self.by_key.values()):
            self._close(entry, reset=True)

    def _watch(self, entry: _Entry) -> None:
        """(Re-)register the descriptor for what we wait on: connect, writable, readable."""
        flags = 0
        if entry.connecting or entry.out:
            flags |= zmq.POLLOUT
        if not entry.paused and not entry.eof and not entry.connecting:
            flags |= zmq.POLLIN
        fd = entry.sock.fileno()
        if flags:
            self.poller.register(fd, flags)
        else:
            _unregister(self.poller, fd)

    # -- readiness -------------------------------------------------------------

    def ready(self, fd: int, flags: int) -> list[Upstream]:
        """The poller says ``fd`` is ready: the events it brings."""
        entry = self.by_fd.get(fd)
        events: list[Upstream] = []
        if entry is None:
            return events
        if entry.proto == LISTENING:
            self._accept(entry, events)
            return events
        if entry.proto == LISTENING_UDP:
            for _ in range(READS_PER_WAKE):
                try:
                    data, (address, port, *_) = entry.sock.recvfrom(65535)
                except OSError:  # BlockingIOError, or an ICMP error for an earlier answer: nothing to do
                    break
                events.append(Upstream(entry.key, relay.RECEIVED, data, f"{address}|{port}"))
            return events
        if entry.connecting:
            code = entry.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._close(entry, reset=False)
                events.append(_connect_error(entry.key, code))
                return events
            entry.connecting = False
            self._watch(entry)
            events.append(Upstream(entry.key, relay.CONNECTED))
            return events
        if flags & zmq.POLLOUT and entry.out:
            self._flush(entry, events)
        if flags & (zmq.POLLIN | zmq.POLLERR) and not entry.paused and entry.key in self.by_key:
            self._read(entry, events)
        return events

    def _flush(self, entry: _Entry, events: list[Upstream]) -> None:
        try:
            sent = entry.sock.send(entry.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(entry, exc, events)
            return
        del entry.out[:sent]
        if not entry.out:
            self._watch(entry)
            if entry.shut_pending:
                self._shut(entry)
            events.append(Upstream(entry.key, relay.DRAINED))

    def _read(self, entry: _Entry, events: list[Upstream]) -> None:
        for _ in range(READS_PER_WAKE):
            try:
                data = entry.sock.recv(READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(entry, exc, events)
                return
            if not data and entry.proto == relay.TCP:
                entry.eof = True
                self._watch(entry)
                events.append(Upstream(entry.key, relay.EOF))
                return
            if entry.asked:
                self.waits.append(round((time.monotonic() - entry.asked) * 1_000_000))
                entry.asked = 0.0
            events.append(Upstream(entry.key, relay.DATA, data))
            if entry.proto == relay.TCP:
                return  # the core decides whether to keep reading (it may pause us)

    def _fail(self, entry: _Entry, exc: OSError, events: list[Upstream]) -> None:
        """A socket error: reset (TCP) or an ICMP error reported on a datagram socket."""
        if entry.proto == relay.TCP:
            self._close(entry, reset=False)
            events.append(Upstream(entry.key, relay.RESET, detail=errno.errorcode.get(exc.errno or 0, "")))
            return
        # The error's copy on the error queue (IP_RECVERR) is not needed: the errno says it all, and an
        # undrained queue would keep the socket readable for ever.
        with contextlib.suppress(OSError):
            while True:
                entry.sock.recvmsg(1, 1024, _MSG_ERRQUEUE)
        if exc.errno == errno.ECONNREFUSED:
            events.append(Upstream(entry.key, relay.REFUSED))
        elif exc.errno in _UNREACHABLE:
            events.append(Upstream(entry.key, relay.UNREACHABLE, detail=_UNREACHABLE[exc.errno]))


def _writable_now(sock: socket.socket) -> bool:
    poll = select.poll()
    poll.register(sock, select.POLLOUT)
    return bool(poll.poll(0))


def _unregister(poller: zmq.Poller, fd: int) -> None:
    with contextlib.suppress(KeyError):
        poller.unregister(fd)


def _connect_error(key: Hashable, code: int) -> Upstream:
    if code == errno.ECONNREFUSED:
        return Upstream(key, relay.REFUSED)
    if code in _UNREACHABLE:
        return Upstream(key, relay.UNREACHABLE, detail=_UNREACHABLE[code])
    if code == errno.ETIMEDOUT:
        return Upstream(key, relay.TIMED_OUT)
    return Upstream(key, relay.UNREACHABLE, detail="host", data=errno.errorcode.get(code, str(code)).encode())


def _keepalive(sock: socket.socket, keepalive: relay.Keepalive | None) -> None:
    """The kernel's keepalive on a real TCP socket (Linux options; whole seconds, at least 1)."""
    if keepalive is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, round(keepalive.idle)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, round(keepalive.interval)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, keepalive.probes))


def ping_refused() -> str:
    """Why this namespace refuses us unprivileged echo sockets ("" when it does not): relayed pings
    need our group inside ``net.ipv4.ping_group_range`` (both families; a new namespace's is "1 0")."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, socket.IPPROTO_ICMP).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""
