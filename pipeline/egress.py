"""Egress: write the packets workers send to the TUN device.

Egress holds a detached queue of the device (see ``pipeline.tun``): it can
write, and the kernel never steers inbound traffic to it.
"""

from __future__ import annotations

import zmq

from pipeline import tun
from pipeline.bus import endpoints, messages
from pipeline.process import Process


def main() -> None:
    proc = Process("egress")
    cfg = proc.config
    log = proc.log
    counters = proc.counters
    endpoints.ensure_run_dir(cfg.run_dir)
    try:
        device = tun.open_device(cfg.tun_name, writer_only=True, offload=cfg.offload)
    except tun.TunError as exc:
        log.error("tun_open_failed", device=cfg.tun_name, error=str(exc))
        raise SystemExit(1) from None
    ctx = zmq.Context()
    inbox = endpoints.egress_pull(ctx, cfg.run_dir)
    log.info("egress_started", device=device.name)
    try:
        while not proc.stopper.stopping:
            if not inbox.poll(500):
                continue
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
                if not isinstance(msg, messages.Packet):
                    proc.drop("bus_unexpected_kind")
                    continue
                try:
                    device.write(msg.data, msg.offload)
                except OSError as exc:  # e.g. EINVAL for a packet the kernel refuses, EIO when down
                    proc.drop("write_failed", error=exc.strerror)
                    continue
                counters["packets_out"] += 1
    finally:
        log.info("egress_stopped", **dict(counters))
        inbox.close()
        ctx.term()
        device.close()


if __name__ == "__main__":
    main()
