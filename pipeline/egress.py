"""Egress: write the packets workers send to the TUN device.

Egress holds a detached queue of the device (see ``pipeline.tun``): it can
write, and the kernel never steers inbound traffic to it. It heartbeats to
ingress like a worker, so ``stackctl status`` shows its counters.

Attached to several namespaces (``pipeline.attachments``), egress holds a queue
of each one's device and writes each message's packets to the device of its
``ns``; ingress says which namespaces there are (NAMESPACES) whenever that
changes. The queue of a detached namespace is closed a moment later
(``DETACH_GRACE``), so the resets its workers send toward it still go out;
the device goes with its last queue.

Each wake-up writes the packets of at most ``MAX_DRAIN`` bus messages, like
a worker (``workers/shell.py``): when workers send faster than the device
takes packets, the inbox never empties, and an unbounded drain would starve
the heartbeat (ingress would declare egress lost after 3 s), stackctl's
STOP and the telemetry requests.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Callable

import zmq

from pipeline import latency, tun
from pipeline.bus import endpoints, messages
from pipeline.process import Process

MAX_DRAIN = 64  # bus messages (each up to messages.MAX_BATCH packets) written per wake-up
LATENCY_REPORT = 0.2  # seconds between latency samples sent to ingress, while there are some
DETACH_GRACE = 1.0  # seconds a detached namespace's queue stays open for what its workers still send


class Writer:
    """Writes what the workers send to the device of its namespace, one system call per packet."""

    def __init__(self, devices: dict[int, tun.TunDevice], counters: Counter[str], drop: Callable[..., None],
                 capture: Callable[[bytes], None] | None = None) -> None:
        self.devices = devices  # namespace index -> its device queue
        self.counters = counters
        self.drop = drop
        self.capture = capture  # called with each packet written while stackctl captures
        self.samples: latency.Samples = {}  # stamped messages' stages, until sent to ingress

    def write_some(self, inbox: zmq.Socket) -> int:
        """Write the packets of at most MAX_DRAIN waiting messages; return how many messages."""
        taken = 0
        for _, msg in itertools.islice(endpoints.drain(inbox, self.drop), MAX_DRAIN):
            taken += 1
            if not isinstance(msg, messages.Packets):
                self.drop("bus_unexpected_kind")
                continue
            device = self.devices.get(msg.ns)
            if device is None:  # a namespace detached meanwhile
                self.drop("unknown_namespace", ns=msg.ns, packets=len(msg.items))
                continue
            write = device.write
            received = time.monotonic() if msg.stamps is not None else 0.0
            for data, offload in msg.items:
                try:
                    write(data, offload)
                except OSError as exc:  # e.g. EINVAL for a packet the kernel refuses, EIO when down
                    self.drop("write_failed", error=exc.strerror)
                    continue
                self.counters["packets_out"] += 1
                if self.capture is not None:
                    self.capture(data)
            if msg.stamps is not None:
                latency.merge(self.samples, latency.departure(msg.stamps, received, time.monotonic()))
        return taken


def main() -> None:
    proc = Process("egress")
    cfg = proc.config
    log = proc.log
    counters = proc.counters
    if cfg.egress_bind.startswith("ipc://") or cfg.ingress_endpoint.startswith("ipc://"):
        endpoints.ensure_run_dir(cfg.run_dir)

    def queue(path: str) -> tun.TunDevice:
        return tun.open_device(cfg.tun_name, writer_only=True, offload=cfg.offload, run_dir=cfg.run_dir,
                               netns=path)

    # USTACK_ATTACH's namespaces under the indexes ingress gives them at a fresh start; NAMESPACES
    # corrects that (a restarted egress, namespaces attached or detached at run time).
    paths = dict(enumerate(cfg.attached or ("",)))
    try:
        device = queue(paths[0])
    except tun.TunError as exc:
        log.error("tun_open_failed", device=cfg.tun_name, error=str(exc))
        raise SystemExit(tun.exit_status(exc)) from None
    devices = {0: device}
    for index, path in list(paths.items())[1:]:
        try:
            devices[index] = queue(path)
        except tun.TunError as exc:
            log.warning("namespace_queue_failed", index=index, path=path, error=str(exc))
            del paths[index]
    # Detached namespaces' queues: still written to (the resets their workers send) until closed,
    # DETACH_GRACE later. Ingress never gives a detached namespace's index to another meanwhile.
    closing: list[tuple[float, int, tun.TunDevice]] = []

    def namespaces(table: tuple[messages.Attached, ...], now: float) -> None:
        """Ingress's table of attached namespaces: a queue for each new one, the gone ones closed soon."""
        wanted = {index: path for index, _, path in table}
        for index in [i for i in paths if wanted.get(i) != paths[i]]:
            closing.append((now + DETACH_GRACE, index, devices[index]))
            del paths[index]
        for index, path in wanted.items():
            if index not in paths:
                try:
                    devices[index] = queue(path)
                except tun.TunError as exc:  # ingress detaches it when it sees it gone
                    log.warning("namespace_queue_failed", index=index, path=path, error=str(exc))
                    continue
                paths[index] = path

    ctx = zmq.Context()
    auth = endpoints.start_authenticator(ctx, cfg)
    inbox = endpoints.egress_pull(ctx, cfg)
    refusals = endpoints.auth_monitor(inbox)
    heartbeat = endpoints.worker_dealer(ctx, cfg, proc.name)
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    poller.register(heartbeat, zmq.POLLIN)  # ingress's STOP arrives here
    poller.register(proc.telemetry.socket, zmq.POLLIN)
    telemetry = proc.telemetry
    stop_asked = False
    if refusals is not None:
        poller.register(refusals, zmq.POLLIN)

    writer = Writer(devices, counters, proc.drop)

    def capture(data: bytes) -> None:
        telemetry.packet("out", data)

    log.info("egress_started", device=device.name, offload=cfg.offload)
    seq = 0
    next_heartbeat = 0.0
    next_report = 0.0
    try:
        while not proc.stopper.stopping and not stop_asked:
            proc.flush_logs()
            now = time.monotonic()
            proc.trim_heap(now)
            if now >= next_heartbeat:
                try:
                    heartbeat.send_multipart(messages.encode_heartbeat(proc.name, "egress", seq, dict(counters)),
                                             flags=zmq.NOBLOCK)
                    seq += 1
                except zmq.Again:
                    pass
                next_heartbeat = now + messages.HEARTBEAT_INTERVAL
            wake = min(next_heartbeat, next_report) if writer.samples else next_heartbeat
            if closing:
                wake = min(wake, closing[0][0])
            ready = dict(endpoints.poll(poller, max(1, int((wake - now) * 1000)), cfg.busy_poll))
            if refusals is not None and refusals in ready:
                endpoints.log_refusals(refusals, log)
            if heartbeat in ready:
                for _, msg in endpoints.drain(heartbeat, proc.drop):
                    if isinstance(msg, messages.Stop):
                        stop_asked = True
                    elif isinstance(msg, messages.Namespaces):
                        namespaces(msg.table, time.monotonic())
            while closing and closing[0][0] <= now:
                _, index, gone = closing.pop(0)
                if devices.get(index) is gone and index not in paths:
                    del devices[index]
                gone.close()
            if inbox in ready:
                writer.capture = capture if telemetry.capturing else None
                writer.write_some(inbox)
            if writer.samples and (now := time.monotonic()) >= next_report:
                with contextlib.suppress(zmq.Again):  # ingress away: these samples are lost, no harm
                    heartbeat.send_multipart(messages.encode_latency(proc.name, writer.samples), flags=zmq.NOBLOCK)
                writer.samples = {}
                next_report = now + LATENCY_REPORT
        if stop_asked:
            # stackctl stop: the workers have said goodbye; write what they sent, then idle.
            while inbox.poll(200):
                writer.write_some(inbox)
            heartbeat.send_multipart(messages.encode_goodbye(proc.name), flags=zmq.NOBLOCK)
            log.info("egress_parked", **dict(counters))
            proc.park()
    finally:
        log.info("egress_stopped", **dict(counters))
        inbox.close()
        heartbeat.close()
        if refusals is not None:
            refusals.close()
        if auth is not None:
            auth.stop()
        ctx.term()
        for dev in {id(d): d for d in [*devices.values(), *(d for _, _, d in closing)]}.values():
            dev.close()


if __name__ == "__main__":
    main()
