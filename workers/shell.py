"""The worker process shell: ZeroMQ I/O and timers around a sans-IO core.

The loop (STYLE.md §2): poll the ingress socket with a timeout that ends at
the core's next deadline or the next heartbeat, feed every packet that
arrived to the core, fire due timers, and push what the core returns to
egress. Nothing protocol-specific lives here.
"""

from __future__ import annotations

import time
from typing import Protocol

import zmq

from pipeline.bus import endpoints, messages
from pipeline.offload import Offload
from pipeline.process import Process


# An IP packet to send, with the virtio-net header fields egress should write
# with it (None: a complete packet, checksums filled in).
Outgoing = tuple[bytes, Offload | None]


class WorkerCore(Protocol):
    def handle_packet(self, data: bytes, now: float, offload: Offload | None) -> list[Outgoing]:
        """One IP packet (and its offload metadata from the device) in; packets to send out."""
    def handle_timer(self, now: float) -> list[Outgoing]:
        """Fire what is due at ``now``; packets to send out."""
    def next_deadline(self) -> float | None: ...
    def close(self, now: float) -> list[Outgoing]:
        """Shutting down: release what is held (e.g. reset connections)."""


def run(proc: Process, core: WorkerCore) -> None:
    ctx = zmq.Context()
    endpoints.ensure_run_dir(proc.config.run_dir)
    inbox = endpoints.worker_dealer(ctx, proc.config.run_dir, proc.name)
    outbox = endpoints.worker_push(ctx, proc.config.run_dir)
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    log = proc.log
    counters = proc.counters
    heartbeat_seq = 0
    next_heartbeat = 0.0
    log.info("worker_started", role=proc.role)

    def send(packets: list[Outgoing]) -> None:
        for pkt, offload in packets:
            try:
                outbox.send_multipart(messages.encode_packet(pkt, offload), flags=zmq.NOBLOCK)
                counters["packets_out"] += 1
            except zmq.Again:  # egress gone or far behind: the peer's TCP retransmits
                proc.drop("egress_full")

    try:
        while not proc.stopper.stopping:
            now = time.monotonic()
            if now >= next_heartbeat:
                try:
                    inbox.send_multipart(messages.encode_heartbeat(proc.name, proc.role, heartbeat_seq),
                                         flags=zmq.NOBLOCK)
                    heartbeat_seq += 1
                except zmq.Again:
                    pass
                next_heartbeat = now + messages.HEARTBEAT_INTERVAL
            deadline = core.next_deadline()
            wake = next_heartbeat if deadline is None else min(deadline, next_heartbeat)
            timeout_ms = max(0, int((wake - now) * 1000) + 1)
            if poller.poll(timeout_ms):
                # Drain everything waiting before touching timers: one wake-up, many packets.
                while True:
                    try:
                        frames = inbox.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        msg = messages.decode(frames)
                    except messages.BusError as exc:
                        proc.drop("bus_" + str(exc))
                        continue
                    if isinstance(msg, messages.Packet):
                        counters["packets_in"] += 1
                        send(core.handle_packet(msg.data, time.monotonic(), msg.offload))
            now = time.monotonic()
            deadline = core.next_deadline()
            if deadline is not None and deadline <= now:
                send(core.handle_timer(now))
        send(core.close(time.monotonic()))
        try:
            inbox.send_multipart(messages.encode_goodbye(proc.name), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
    finally:
        log.info("worker_stopped", **dict(proc.counters))
        inbox.close()
        outbox.close()
        ctx.term()
