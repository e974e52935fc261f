"""Services hosted on TCP connections: the stream each one gets, and a fence around it.

Contract: the worker core hands every application event of a connection to
:meth:`ServiceHost.deliver` and asks :meth:`ServiceHost.timer` for the
service's own deadline next to the connection's. The host

- creates the service when the connection is established, from the factory
  registered for its local port (``factory(stream) -> Service``);
- gives it a :class:`HostedStream`: the connection's application API plus the
  current time, one timer, the peer's address, the retransmission counter and
  a logger bound to the flow;
- turns an exception raised by a service into a reset of that connection, a
  counted ``service_error`` and a logged error (traceback at debug): the
  worker and every other connection live on;
- remembers connections that a service touched from *another* connection's
  callback (an iperf3 control connection starting its data streams), so the
  core collects their output in the same wake-up (:meth:`ServiceHost.woken`);
- in attach mode, hosts relayed flows the same way: a flow the
  :class:`Relays` serve (one to another address, or one the stack opened for a
  published port) gets the relays' service instead of its port's, and events
  from outside TCP (the upstream socket's) reach it through :meth:`ServiceHost.call`.

Sans-IO like the core: time comes in as ``now``; nothing here reads a clock.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from pipeline.flow import Flow
from pipeline.wire.addr import fmt_addr
from workers.tcp import events
from workers.services.tcp import Service
from workers.tcp.connection import Connection, State

ServiceFactory = Callable[["HostedStream"], Service]


class Relays(Protocol):
    """Services chosen by flow, not by port: attach mode's relayed flows (``workers.attach.tcp``)."""

    def serves(self, key: Flow) -> bool:
        """The flow is relayed: its service is ours (and its own record says how it ended)."""
    def start(self, stream: HostedStream) -> Service:
        """The service of a relayed flow, once its connection is established."""
    def unserved(self, key: Flow, reason: str, now: float) -> None:
        """A relayed flow's connection ended with no service (never established, or its service failed)."""
    def forget(self, key: Flow) -> None:
        """The flow's connection is gone from the table."""


class HostedStream:
    """What a service may do with its connection (the Stream of ``services.tcp``, and more)."""

    __slots__ = ("_conn", "_host", "_key", "now", "deadline", "log", "remote", "remote_port", "local_port",
                 "close_reason")

    def __init__(self, conn: Connection, host: ServiceHost, key: Flow, now: float, log: Any) -> None:
        self._conn = conn
        self._host = host
        self._key = key
        self.now = now  # the time of the event being handled (seconds, monotonic)
        self.deadline: float | None = None  # when on_timer() is due
        self.close_reason = ""  # once on_closed() is called: closed, reset, timeout or aborted
        self.remote = fmt_addr(key.remote)
        self.remote_port = key.rport
        self.local_port = key.lport
        self.log = log.bind(remote=self.remote, rport=key.rport, lport=key.lport)

    @property
    def flow(self) -> Flow:
        """The connection's flow (a relayed flow's names its destination)."""
        return self._key

    @property
    def readable(self) -> int:
        """Bytes received and not yet read."""
        return self._conn.readable

    @property
    def send_space(self) -> int:
        """Bytes send() would take now."""
        return self._conn.send_space

    @property
    def retransmissions(self) -> int:
        """Segments this connection's TCP has retransmitted so far."""
        return self._conn.retransmissions

    def recv(self, max_bytes: int = -1) -> bytes:
        return self._conn.recv(max_bytes)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        self._host._touch(self._key)
        return self._conn.send(data)

    def close(self) -> None:
        self._host._touch(self._key)
        self._conn.close()

    def abort(self) -> None:
        self._host._touch(self._key)
        self._conn.abort()

    def set_timer(self, deadline: float | None) -> None:
        """Call the service's on_timer() at ``deadline`` (None cancels); one timer per stream."""
        self._host._touch(self._key)
        self.deadline = deadline


class ServiceHost:
    def __init__(self, factories: Mapping[int, ServiceFactory], log: Any, counters: Any,
                 relays: Relays | None = None) -> None:
        self.factories = factories
        self.log = log
        self.counters = counters
        self.relays = relays  # attach mode: relayed flows' services (None: no flow is relayed)
        self._hosted: dict[Flow, tuple[HostedStream, Service]] = {}
        self._current: Flow | None = None  # the connection whose event is being delivered
        self._woken: set[Flow] = set()

    def listens(self, port: int) -> bool:
        return port in self.factories

    def relayed(self, key: Flow) -> bool:
        """The flow's service is a relay (attach mode)."""
        return self.relays is not None and self.relays.serves(key)

    def deliver(self, key: Flow, conn: Connection, ev: events.Event, now: float) -> None:
        """One application event of ``conn`` to its service."""
        if isinstance(ev, events.Connected):
            stream = HostedStream(conn, self, key, now, self.log)
            self._call(key, stream, None, lambda: self._start(key, stream))
            return
        hosted = self._hosted.get(key)
        if hosted is None:
            if isinstance(ev, events.Closed) and self.relays is not None and self.relays.serves(key):
                self.relays.unserved(key, ev.reason, now)
            return
        stream, service = hosted
        stream.now = now
        if isinstance(ev, events.DataReceived):
            self._call(key, stream, service, service.on_readable)
        elif isinstance(ev, events.SendSpace):
            self._call(key, stream, service, service.on_writable)
        elif isinstance(ev, events.PeerClosed):
            self._call(key, stream, service, service.on_eof)
        elif isinstance(ev, events.Closed):
            del self._hosted[key]
            stream.close_reason = ev.reason
            self._call(key, stream, service, service.on_closed)

    def call(self, key: Flow, now: float, callback: Callable[[Service], None]) -> bool:
        """Run ``callback`` on the connection's service, for an event from outside TCP; False if it has none."""
        hosted = self._hosted.get(key)
        if hosted is None:
            return False
        stream, service = hosted
        stream.now = now
        self._call(key, stream, service, lambda: callback(service))
        return True

    def timer(self, key: Flow) -> float | None:
        hosted = self._hosted.get(key)
        return hosted[0].deadline if hosted is not None else None

    def fire(self, key: Flow, now: float) -> None:
        """Run the service's on_timer() if its deadline has come."""
        hosted = self._hosted.get(key)
        if hosted is None:
            return
        stream, service = hosted
        if stream._conn.state is State.CLOSED:
            return  # its Closed event comes next; the service is done
        if stream.deadline is not None and stream.deadline <= now:
            stream.deadline = None
            stream.now = now
            self._call(key, stream, service, service.on_timer)

    def woken(self) -> set[Flow]:
        """Connections touched from another connection's callback since the last call."""
        woken, self._woken = self._woken, set()
        return woken

    def forget(self, key: Flow) -> None:
        self._hosted.pop(key, None)
        self._woken.discard(key)
        if self.relays is not None:
            self.relays.forget(key)

    def _start(self, key: Flow, stream: HostedStream) -> None:
        relays = self.relays
        factory = relays.start if relays is not None and relays.serves(key) else self.factories[key.lport]
        self._hosted[key] = (stream, factory(stream))

    def _touch(self, key: Flow) -> None:
        if key != self._current:
            self._woken.add(key)

    def _call(self, key: Flow, stream: HostedStream, service: Service | None, callback: Callable[[], None]) -> None:
        outer, self._current = self._current, key
        try:
            callback()
        except Exception as exc:  # a service's bug: reset its connection, keep the worker
            self.counters["service_errors"] += 1
            stream.log.error("service_error", service=type(service).__name__ if service else "factory",
                             error=f"{type(exc).__name__}: {exc}")
            stream.log.debug("service_traceback", traceback=traceback.format_exc())
            self._hosted.pop(key, None)
            stream._conn.abort()
        finally:
            self._current = outer
