"""Ingress: read the TUN device, route each IP packet to the worker that owns it.

The only checked IPv4 parse of the pipeline happens here (version, lengths,
header checksum, fragments, destination); workers trust the bus and re-read
the header without re-verifying. Routing: ICMP to ``icmp``, UDP to ``udp``,
TCP to one of the ``tcp`` workers by rendezvous hash of the flow, any other
protocol to ``icmp`` (which answers protocol unreachable, RFC 1122 §3.2.2.1).

Packets for a role with no live worker yet (start-up, or a worker
restarting) wait in a small bounded queue for a couple of seconds instead of
being lost: processes start in any order.
"""

from __future__ import annotations

import collections
import time

import zmq

from pipeline import tun
from pipeline.bus import endpoints, messages
from pipeline.membership import Membership
from pipeline.offload import Offload
from pipeline.process import Process
from pipeline.wire import Malformed
from pipeline.wire.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, parse_ipv4

PENDING_LIMIT = 1024   # packets held per role while it has no live worker
PENDING_MAX_AGE = 2.0  # seconds; older ones are dropped (the peer retransmits)
DRAIN_BATCH = 256      # device reads per wake-up before checking the bus again

_ROLE_BY_PROTO = {PROTO_ICMP: "icmp", PROTO_UDP: "udp", PROTO_TCP: "tcp"}


class Router:
    """Decides the destination worker of each packet; pure apart from the clock it is given."""

    def __init__(self, proc: Process, members: Membership) -> None:
        self.proc = proc
        self.members = members
        self.address = proc.config.stack_addr_bytes
        self.pending: dict[str, collections.deque[tuple[float, bytes, Offload | None]]] = collections.defaultdict(
            lambda: collections.deque(maxlen=PENDING_LIMIT))

    def route(self, packet: bytes) -> tuple[str | None, str]:
        """(worker name or None, role) for a packet; None with role "" means dropped."""
        proc = self.proc
        if not packet or packet[0] >> 4 != 4:
            proc.drop("not_ipv4", version=packet[0] >> 4 if packet else None)
            return None, ""
        try:
            header, payload = parse_ipv4(packet)
        except Malformed as exc:
            proc.drop(exc.reason, layer="ipv4")
            return None, ""
        if header.dst != self.address:
            proc.drop("not_for_us")
            return None, ""
        role = _ROLE_BY_PROTO.get(header.protocol, "icmp")
        if role == "tcp":
            # The flow key: remote address and both ports (the local address is ours).
            key = header.src + bytes(payload[:4])
            return self.members.pick(role, key), role
        return self.members.pick(role, b""), role


def main() -> None:
    proc = Process("ingress")
    cfg = proc.config
    log = proc.log
    counters = proc.counters
    endpoints.ensure_run_dir(cfg.run_dir)
    try:
        device = tun.open_device(cfg.tun_name, writer_only=False, offload=cfg.offload)
        tun.configure_kernel_side(device.name, str(cfg.host_interface), cfg.mtu)
    except tun.TunError as exc:
        log.error("tun_open_failed", device=cfg.tun_name, error=str(exc))
        raise SystemExit(1) from None
    ctx = zmq.Context()
    router_sock = endpoints.ingress_router(ctx, cfg.run_dir)
    members = Membership(messages.HEARTBEAT_TIMEOUT)
    router = Router(proc, members)
    poller = zmq.Poller()
    poller.register(router_sock, zmq.POLLIN)
    poller.register(device.fileno(), zmq.POLLIN)
    log.info("ingress_started", device=device.name, host=str(cfg.host_interface), address=str(cfg.stack_address),
             offload=hex(getattr(device, "offload_bits", 0)))

    def forward(name: str, packet: bytes, offload: Offload | None) -> bool:
        try:
            router_sock.send_multipart([name.encode(), *messages.encode_packet(packet, offload)], flags=zmq.NOBLOCK)
        except zmq.Again:
            proc.drop("worker_full", worker=name)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the worker is gone
            if members.remove(name):
                log.warning("worker_lost", worker=name, error=exc.strerror)
            return False
        counters["packets_out"] += 1
        return True

    def flush_pending(role: str, now: float) -> None:
        queue = router.pending.get(role)
        while queue:
            born, packet, offload = queue.popleft()
            if now - born > PENDING_MAX_AGE:
                proc.drop("no_worker", role=role)
                continue
            name, _ = router.route(packet)
            if name is None or not forward(name, packet, offload):
                queue.appendleft((born, packet, offload))
                return

    try:
        while not proc.stopper.stopping:
            ready = dict(poller.poll(500))
            now = time.monotonic()
            if router_sock in ready:
                while True:
                    try:
                        frames = router_sock.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        msg = messages.decode(frames[1:])
                    except messages.BusError as exc:
                        proc.drop("bus_" + str(exc))
                        continue
                    if isinstance(msg, messages.Heartbeat):
                        if msg.name.encode() != frames[0]:
                            proc.drop("bus_name_mismatch", claimed=msg.name)
                        elif members.seen(msg.name, msg.role, now):
                            log.info("worker_joined", worker=msg.name, role=msg.role)
                            flush_pending(msg.role, now)
                    elif isinstance(msg, messages.Goodbye):
                        if members.remove(msg.name):
                            log.info("worker_left", worker=msg.name)
            if device.fileno() in ready:
                for _ in range(DRAIN_BATCH):
                    got = device.read()
                    if got is None:
                        break
                    packet, offload = got
                    counters["packets_in"] += 1
                    name, role = router.route(packet)
                    if name is not None:
                        if not forward(name, packet, offload):
                            router.pending[role].append((now, packet, offload))
                    elif role:
                        router.pending[role].append((now, packet, offload))
            for name in members.expire(now):
                log.warning("worker_timeout", worker=name)
            for role, queue in router.pending.items():
                if queue and members.has_role(role):
                    flush_pending(role, now)
                while queue and now - queue[0][0] > PENDING_MAX_AGE:
                    queue.popleft()
                    proc.drop("no_worker", role=role)
    finally:
        log.info("ingress_stopped", **dict(counters))
        router_sock.close()
        ctx.term()
        device.close()


if __name__ == "__main__":
    main()
