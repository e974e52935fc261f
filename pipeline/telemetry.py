"""Live telemetry for operators: what ``stackctl logs``, ``capture`` and ``conns`` read.

Every process holds one :class:`Publisher` (an XPUB connected to ingress's
publish endpoint, its own ZeroMQ context so the process's shutdown order does
not matter). ZeroMQ passes each subscription up to it, so a process knows
what someone is reading and publishes only that:

* log records while someone follows ``LOG_TOPIC`` (the records still go to
  stdout for honcho as well);
* copies of the packets crossing the device (ingress and egress) while someone
  captures ``CAPTURE_TOPIC``; otherwise the cost is one attribute test;
* a snapshot of its connections each time someone subscribes to
  ``CONNS_TOPIC`` (subscribing is the request).

Sends never block: past the high-water mark, or with a reader that is slow,
copies are dropped and counted (``telemetry_dropped``). Ingress runs the
:class:`Forwarder` between the publishers and the subscribers (stackctl).
Layouts are in ``pipeline.bus.messages``, sockets in ``pipeline.bus.endpoints``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import zmq

from pipeline.bus import endpoints, messages
from pipeline.config import StackConfig


class Publisher:
    def __init__(self, cfg: StackConfig, name: str, role: str, counters: Counter[str]) -> None:
        self.name = name
        self.sees_device = role in ("ingress", "egress")  # the processes that have packets to copy
        self.counters = counters
        self.ctx = zmq.Context(1)
        self.socket = endpoints.telemetry_publisher(self.ctx, cfg)
        self.logs = False       # someone follows the log records
        self.capturing = False  # someone captures packets
        self.responders: dict[bytes, Callable[[], list[dict[str, Any]]]] = {}

    def on_conns(self, snapshot: Callable[[], list[dict[str, Any]]]) -> None:
        """Answer every ``stackctl conns`` with ``snapshot()``."""
        self.responders[messages.CONNS_TOPIC] = snapshot

    def service(self) -> None:
        """Take the subscriptions that arrived (call once per wake-up; cheap when none did)."""
        sock = self.socket
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                event = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not event:
                continue
            on, topic = event[0] == 1, event[1:]
            if topic == messages.LOG_TOPIC:
                self.logs = on
            elif topic == messages.CAPTURE_TOPIC:
                self.capturing = on
                if on and self.sees_device:  # every new capture learns who copies packets
                    self._send(messages.encode_capturing(self.name))
            elif on and topic in self.responders:
                self._send(messages.encode_conns(self.name, self.responders[topic]()))

    def log(self, record: dict[str, Any]) -> None:
        self._send(messages.encode_log(json.dumps(record, default=str).encode()))

    def packet(self, direction: str, data: bytes) -> None:
        self._send(messages.encode_captured(self.name, direction, time.time(), data))

    def _send(self, frames: list[bytes]) -> None:
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # Again at the high-water mark: drop, never block
            self.counters["telemetry_dropped"] += 1

    def close(self) -> None:
        self.socket.close(linger=0)
        self.ctx.term()


class Forwarder:
    """Ingress's relay: telemetry from the publishers to the subscribers, subscriptions back."""

    def __init__(self, ctx: zmq.Context, cfg: StackConfig, counters: Counter[str]) -> None:
        self.inbound, self.outbound = endpoints.telemetry_forwarder(ctx, cfg)
        self.counters = counters

    def pump(self) -> None:
        while True:  # subscriptions (and unsubscriptions) of stackctl, to every publisher
            try:
                self.inbound.send(self.outbound.recv(zmq.NOBLOCK), flags=zmq.NOBLOCK)
            except zmq.Again:
                break
        while True:
            try:
                frames = self.inbound.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self.outbound.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                self.counters["telemetry_dropped"] += 1

    def close(self) -> None:
        self.inbound.close()
        self.outbound.close()
