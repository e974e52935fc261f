"""Egress: write the packets workers send to the TUN device.

Egress holds a detached queue of the device (see ``pipeline.tun``): it can
write, and the kernel never steers inbound traffic to it. It heartbeats to
ingress like a worker, so ``stackctl status`` shows its counters.
"""

from __future__ import annotations

import time

import zmq

from pipeline import tun
from pipeline.bus import endpoints, messages
from pipeline.process import Process


def main() -> None:
    proc = Process("egress")
    cfg = proc.config
    log = proc.log
    counters = proc.counters
    if cfg.egress_bind.startswith("ipc://") or cfg.ingress_endpoint.startswith("ipc://"):
        endpoints.ensure_run_dir(cfg.run_dir)
    try:
        device = tun.open_device(cfg.tun_name, writer_only=True, offload=cfg.offload, run_dir=cfg.run_dir,
                                 netns=cfg.attach)
    except tun.TunError as exc:
        log.error("tun_open_failed", device=cfg.tun_name, error=str(exc))
        raise SystemExit(tun.exit_status(exc)) from None
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

    def write_all(sock: zmq.Socket) -> None:
        for _, msg in endpoints.drain(sock, proc.drop):
            if not isinstance(msg, messages.Packets):
                proc.drop("bus_unexpected_kind")
                continue
            for data, offload in msg.items:
                try:
                    device.write(data, offload)
                except OSError as exc:  # e.g. EINVAL for a packet the kernel refuses, EIO when down
                    proc.drop("write_failed", error=exc.strerror)
                    continue
                counters["packets_out"] += 1
                if telemetry.capturing:
                    telemetry.packet("out", data)

    log.info("egress_started", device=device.name, offload=cfg.offload)
    seq = 0
    next_heartbeat = 0.0
    try:
        while not proc.stopper.stopping and not stop_asked:
            proc.flush_logs()
            now = time.monotonic()
            if now >= next_heartbeat:
                try:
                    heartbeat.send_multipart(messages.encode_heartbeat(proc.name, "egress", seq, dict(counters)),
                                             flags=zmq.NOBLOCK)
                    seq += 1
                except zmq.Again:
                    pass
                next_heartbeat = now + messages.HEARTBEAT_INTERVAL
            ready = dict(poller.poll(max(1, int((next_heartbeat - now) * 1000))))
            if refusals is not None and refusals in ready:
                endpoints.log_refusals(refusals, log)
            if heartbeat in ready:
                stop_asked = any(isinstance(msg, messages.Stop) for _, msg in endpoints.drain(heartbeat, proc.drop))
            if inbox in ready:
                write_all(inbox)
        if stop_asked:
            # stackctl stop: the workers have said goodbye; write what they sent, then idle.
            while inbox.poll(200):
                write_all(inbox)
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
        device.close()


if __name__ == "__main__":
    main()
