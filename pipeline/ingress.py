"""Ingress: read the TUN device and send each IP packet to the worker that owns it.

Also the pipeline's meeting point: workers (and egress) heartbeat here with
their counters (a TCP worker also with the ports its services want steered
by client), TCP workers announce the flows they hold, and ``stackctl`` asks
here for the pipeline's status. Routing decisions live in
``pipeline.routing``, admission's in ``pipeline.admission``, which reads the
view routing checked; this module is the I/O around them.

Ingress also owns the table of published ports (attach mode,
``pipeline.publishing``): ``stackctl publish`` changes it here, and every TCP
and UDP worker gets the whole table after each change and whenever it
(re)joins, so a restarted worker listens on the current table.
"""

from __future__ import annotations

import os
import time

import zmq

from pipeline import bpf, latency, publishing, relay_config, resolvconf, synfilter, tun
from pipeline.admission import Admission
from pipeline.bus import endpoints, messages
from pipeline.config import StackConfig
from pipeline.flow import Flow
from pipeline.fragments import Limits, Reassembler
from pipeline.membership import Membership
from pipeline.process import Process
from pipeline.routing import PENDING_MAX_AGE, Router
from pipeline.telemetry import Forwarder

DRAIN_BATCH = messages.MAX_BATCH  # device reads per wake-up before looking at the bus again
ORPHAN_MAX_AGE = 5.0  # seconds to wait for a tcp worker that can reset a dead worker's peers
STOP_WORKERS_WAIT = 5.0  # stackctl stop: seconds the workers get to reset their connections
STOP_EGRESS_WAIT = 3.0   # then seconds egress gets to write what they sent
PUBLISHING_ROLES = ("tcp", "udp")  # the workers that listen on published ports
PUBLISH_COMMANDS = ("publish_list", "publish_add", "publish_remove")  # stackctl publish list|add|remove


def reassembler(cfg: StackConfig) -> Reassembler:
    """The fragment reassembler with the RFC timeouts, or the configured one for both families."""
    if cfg.reassembly_timeout is None:
        return Reassembler()
    return Reassembler(Limits(timeout_ipv4=cfg.reassembly_timeout, timeout_ipv6=cfg.reassembly_timeout))


class Ingress:
    def __init__(self, proc: Process, device: tun.TunDevice, ctx: zmq.Context) -> None:
        cfg = proc.config
        self.proc = proc
        self.log = proc.log
        self.device = device
        self.started = time.monotonic()
        self.epoch = int.from_bytes(os.urandom(4), "big")
        self.members = Membership(messages.HEARTBEAT_TIMEOUT)
        self.router = Router(cfg.stack_addr_bytes, self.members, proc.drop, self.started,
                             address6=cfg.stack_addr6_bytes, quiet=self.quiet, reassembler=reassembler(cfg),
                             forward=cfg.forward)
        self.admission = Admission(lambda key: key in self.router.flows, proc.drop, proc.counters)
        self.shedder: synfilter.SynShedder | None = None
        self.recent_syns = -1  # the kernel filter's map of recent SYNs, made when it first goes on
        if cfg.syn_filter and isinstance(device, tun.LinuxTun):
            self.shedder = synfilter.SynShedder(self.started)
            self.set_syn_filter(synfilter.OFF)  # a filter a previous ingress left on the device
        self.drains = 0  # wake-ups that read the device (for the shedder)
        self.auth = endpoints.start_authenticator(ctx, cfg)
        self.bus = endpoints.ingress_router(ctx, cfg)
        self.refusals = endpoints.auth_monitor(self.bus)
        self.control = endpoints.control_router(ctx, cfg)
        self.orphans: list[tuple[float, Flow]] = []
        self.budget = latency.Budget()
        self.timing_until = 0.0  # stamp packets until then (stackctl latency asked)
        self.telemetry = Forwarder(ctx, cfg, proc.counters)
        # stackctl stop: None, then "workers" (they finish), "egress" (it drains), "done".
        self.stop_phase: str | None = None
        self.stop_deadline = 0.0
        # Published ports: USTACK_PUBLISH at a fresh start, the run-time table after a restart.
        self.stack_id = publishing.stack_id(cfg.run_dir)
        self.published, self.published_restored = publishing.load(cfg.run_dir, self.stack_id,
                                                                  relay_config.relay_settings().publish)

    # -- packets ---------------------------------------------------------------

    def quiet(self, reason: str, **fields: object) -> None:
        """The kernel's own IPv6 chatter: its own counter, one debug line, never a drop or a warning."""
        self.proc.counters[reason] += 1
        if self.proc.debug:
            self.log.debug("ignored", reason=reason, **fields)

    def forward(self, name: str, items: list[messages.Item], read: float | None = None) -> bool:
        """Send packets to one worker as one message; False if the worker is gone. With ``read``
        (the time they were read, while stackctl latency measures) the message is stamped."""
        stamps = None if read is None else [read, time.monotonic()]
        try:
            self.bus.send_multipart([name.encode(), *messages.encode_packets(items, stamps)], flags=zmq.NOBLOCK,
                                    copy=False)  # large frames zero-copy (endpoints.ZERO_COPY_MIN)
        except zmq.Again:
            self.proc.drop("worker_full", worker=name, packets=len(items))
            return True  # dropped, not to be retried: the peers retransmit
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the worker's connection is gone
            self.worker_gone(name, "unreachable", exc.strerror)
            return False
        self.proc.counters["packets_out"] += len(items)
        self.admission.forwarded(name, len(items))
        return True

    def route_and_forward(self, items: list[messages.Item], now: float) -> None:
        """Route packets, then send each worker its share in one message (STYLE: batch where it pays)."""
        batches: dict[str, list[messages.Item]] = {}
        router = self.router
        admit = self.admission.admit
        for data, offload in items:
            name, role, packet, segment = router.route(data, now)
            if packet is not data:
                offload = None  # reassembled from fragments: a new packet, checksums unvouched
            if name is not None:
                if segment is not None and not admit(segment, now):  # routing's checked view: no second parse
                    continue  # shed under overload, counted (pipeline.admission)
                batches.setdefault(name, []).append((packet, offload))
            elif role:
                router.hold(role, now, (packet, offload))  # no live worker yet, or settling
        read = now if now < self.timing_until else None
        for name, batch in batches.items():
            if not self.forward(name, batch, read):
                # The worker vanished under us: route again among the living (or hold).
                for data, offload in batch:
                    again, role, _, _ = router.route(data, now)
                    if again is None or not self.forward(again, [(data, offload)]):
                        router.hold(role, now, (data, offload))

    def read_device(self, now: float) -> None:
        items = []
        read = self.device.read
        for _ in range(DRAIN_BATCH):
            got = read()
            if got is None:
                break
            items.append(got)
        self.drains += 1
        if len(items) == DRAIN_BATCH:
            self.proc.counters["device_backlogged"] += 1  # more waiting than one drain takes
        if items:
            self.proc.counters["packets_in"] += len(items)
            if self.proc.telemetry.capturing:
                for data, _ in items:
                    self.proc.telemetry.packet("in", data)
            self.route_and_forward(items, now)
            if self.router.reassembler.drops:
                self.count_fragment_drops()

    def flush_pending(self, now: float) -> None:
        for role, queue in self.router.pending.items():
            while queue:
                born, packet, offload = queue[0]
                if now - born > PENDING_MAX_AGE:
                    queue.popleft()
                    self.proc.drop("no_worker", role=role)
                    continue
                if not self.members.has_role(role):
                    break
                queue.popleft()
                name, _, _, _ = self.router.route(packet, now)
                if name is None:
                    queue.appendleft((born, packet, offload))
                    break
                if not self.forward(name, [(packet, offload)]):
                    queue.appendleft((born, packet, offload))
                    break

    def expire_fragments(self, now: float) -> None:
        """Give up datagrams whose reassembly timer ran out; count the reassembler's drops.

        One whose first fragment came is owed ICMP Time Exceeded (fragment
        reassembly, RFC 1122 §3.3.2, RFC 8200 §4.5): that bare fragment goes
        to ``icmp``, the only way a fragment reaches a worker, and it builds
        the error.
        """
        owed = [(e.first_fragment, None) for e in self.router.reassembler.expire(now) if e.icmp_owed]
        self.count_fragment_drops()
        name = self.members.pick("icmp", b"")
        if owed and name is not None:
            self.forward(name, owed)

    def count_fragment_drops(self) -> None:
        """The reassembler's refusals (overlap, bounds, timeouts) as drop_fragment_<reason> counters."""
        reassembler = self.router.reassembler
        for reason, n in reassembler.drops.items():
            self.proc.counters["drop_fragment_" + reason] += n
            if self.proc.debug:
                self.log.debug("drop", reason="fragment_" + reason, count=n)
        reassembler.drops.clear()

    def set_syn_filter(self, decision: synfilter.Decision) -> None:
        """Attach the filter ``decision`` asks for (or take it off); on failure, carry on without one."""
        assert isinstance(self.device, tun.LinuxTun)
        try:
            if decision.fraction is None:
                self.device.set_filter(-1)
            else:
                if self.recent_syns < 0:  # kept across reloads, so the filter remembers SYNs it saw
                    self.recent_syns = bpf.create_array_map(synfilter.RECENT_VALUE_SIZE, synfilter.RECENT_SLOTS)
                prog = bpf.load_socket_filter(synfilter.program(
                    decision.fraction, decision.real4, decision.real6, self.recent_syns))
                try:
                    self.device.set_filter(prog)
                finally:
                    os.close(prog)
        except OSError as exc:
            self.log.warning("syn_filter_unavailable", error=str(exc), hint="USTACK_SYN_FILTER=0 turns it off")
            self.proc.counters["syn_filter_unavailable"] = 1
            self.shedder = None
            return
        ppm = 1_000_000 if decision.fraction is None else decision.fraction * 1_000_000 >> 32
        was = self.proc.counters.get("syn_filter_pass_ppm", 1_000_000)
        self.proc.counters["syn_filter_pass_ppm"] = ppm  # shown by stackctl status
        if (ppm == 1_000_000) != (was == 1_000_000):
            self.log.info("syn_filter_on" if ppm < 1_000_000 else "syn_filter_off", pass_ppm=ppm,
                          real_sources=len(decision.real4) + len(decision.real6))
        elif self.proc.debug:
            self.log.debug("syn_filter", pass_ppm=ppm, real_sources=len(decision.real4) + len(decision.real6))

    # -- membership ------------------------------------------------------------

    def worker_gone(self, name: str, why: str, detail: str | None = None) -> None:
        was_member = self.members.remove(name)
        orphans = self.router.forget_worker(name)
        if not was_member and not orphans:
            return
        self.log.warning("worker_lost", worker=name, why=why, detail=detail, flows=len(orphans))
        now = time.monotonic()
        self.orphans.extend((now, f) for f in orphans)

    def hand_out_orphans(self, now: float) -> None:
        """Ask a live tcp worker to make the dead worker's peers reset (see workers.tcp.demux)."""
        self.orphans = [(t, f) for t, f in self.orphans if now - t <= ORPHAN_MAX_AGE]
        if not self.orphans:
            return
        name = self.members.pick("tcp", b"orphans")
        if name is None:
            return
        flows = [f for _, f in self.orphans]
        try:
            self.bus.send_multipart([name.encode(), *messages.encode_orphans(flows)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            return
        self.log.info("orphans_handed_out", worker=name, flows=len(flows))
        self.orphans = []

    def read_bus(self, now: float) -> None:
        for peer, msg in endpoints.drain(self.bus, self.proc.drop, routed=True):
            if isinstance(msg, messages.Heartbeat):
                if msg.name.encode() != peer:
                    self.proc.drop("bus_name_mismatch", claimed=msg.name)
                    continue
                event = self.members.seen(msg.name, msg.role, now, msg.seq, msg.stats, msg.steered)
                if event == "restarted":
                    # A new process under the old name: whatever the old one held is gone.
                    self.worker_gone(msg.name, "restarted")
                    event = self.members.seen(msg.name, msg.role, now, msg.seq, msg.stats, msg.steered)
                if msg.role == "tcp":  # what it took in against what it was sent: the SYN rate adapts
                    self.admission.worker_report(msg.name, msg.stats.get("packets_in", 0), now)
                if event == "joined":
                    self.log.info("worker_joined", worker=msg.name, role=msg.role)
                    try:
                        self.bus.send_multipart([peer, *messages.encode_welcome(self.epoch)], flags=zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
                    if msg.role in PUBLISHING_ROLES:  # after its Welcome: it listens on the current table
                        self.send_published([msg.name])
            elif isinstance(msg, messages.Flows):
                if msg.name.encode() == peer and self.members.is_alive(msg.name):
                    self.router.update_flows(msg.name, msg.full, msg.opened, msg.closed)
            elif isinstance(msg, messages.Latency):
                if now < self.timing_until:
                    self.budget.add(msg.samples)
            elif isinstance(msg, messages.Goodbye):
                if msg.name.encode() == peer and self.members.remove(msg.name):
                    self.router.forget_worker(msg.name)  # it reset its own connections
                    self.log.info("worker_left", worker=msg.name)
            else:
                self.proc.drop("bus_unexpected_kind")

    # -- control ---------------------------------------------------------------

    def status(self, now: float) -> dict:
        flows = self.router.flows_by_worker()
        return {
            "epoch": messages.epoch_label(self.epoch),
            "uptime": round(now - self.started, 3),
            "device": self.device.name,
            "address": str(self.proc.config.stack_address),
            "address6": None if self.proc.config.stack_address6 is None else str(self.proc.config.stack_address6),
            "reassembly": {"datagrams": self.router.reassembler.datagrams,
                           "bytes": self.router.reassembler.bytes_held},
            "processes": [{"name": self.proc.name, "role": "ingress", "heartbeat_age": 0.0,
                           "flows": len(self.router.flows), "stats": dict(self.proc.counters)}] + [
                {"name": m.name, "role": m.role, "heartbeat_age": round(now - m.last_seen, 3),
                 "flows": flows.get(m.name, 0), "stats": m.stats}
                for m in self.members.members()],
        }

    def read_control(self, now: float) -> None:
        while True:
            try:
                frames = self.control.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 3:  # [peer, empty delimiter (REQ), message]
                self.proc.drop("control_frames")
                continue
            peer, delimiter, body = frames[0], frames[1], frames[2:]
            try:
                msg = messages.decode(body)
            except messages.BusError as exc:
                reply = messages.encode_reply("error", str(exc), None)
            else:
                if isinstance(msg, messages.Request) and msg.command == "status":
                    reply = messages.encode_reply("ok", None, self.status(now))
                elif isinstance(msg, messages.Request) and msg.command == "flows":
                    reply = messages.encode_reply("ok", None, messages.flow_table(self.router.owned_flows()))
                elif isinstance(msg, messages.Request) and msg.command == "stop":
                    reply = messages.encode_reply("ok", None, self.begin_stop(now))
                elif isinstance(msg, messages.Request) and msg.command in PUBLISH_COMMANDS:
                    reply = self.publish_command(msg.command, msg.args)
                elif isinstance(msg, messages.Request) and msg.command in ("latency", "latency_start"):
                    if msg.command == "latency_start":
                        self.budget.clear()
                    self.timing_until = now + latency.ARMED_FOR
                    reply = messages.encode_reply("ok", None, self.budget.summary())
                else:
                    reply = messages.encode_reply("error", "unknown_command", None)
            try:
                self.control.send_multipart([peer, delimiter, *reply], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    # -- published ports (stackctl publish) ------------------------------------------

    def published_records(self) -> list[dict[str, object]]:
        return [publishing.record(row) for row in self.published.rows()]

    def publish_command(self, command: str, args: tuple[str, ...]) -> list[bytes]:
        """``publish_list``, or one change (``publish_add``/``publish_remove`` ITEM): the reply."""
        if command == "publish_list":
            return messages.encode_reply("ok", None, {"published": self.published_records()})
        if len(args) != 1:
            return messages.encode_reply("error", f"{command} takes one proto:port:port", None)
        if not self.proc.config.attach:
            return messages.encode_reply("error", "ports are published only in attach mode (USTACK_ATTACH): "
                                         "this stack is no other namespace's network", None)
        try:
            if command == "publish_add":
                row = self.published.add(args[0], publishing.port_in_use)
            else:
                row = self.published.remove(args[0])
        except publishing.PublishError as exc:
            return messages.encode_reply("error", str(exc), None)  # the table is unchanged
        try:
            publishing.save(self.proc.config.run_dir, self.stack_id, self.published)
        except OSError as exc:  # the change holds; only a restarted ingress would not know it
            self.log.warning("publish_not_saved", error=str(exc))
        event = "publish_added" if command == "publish_add" else "publish_removed"
        self.log.info(event, **publishing.record(row))
        self.send_published([m.name for m in self.members.members() if m.role in PUBLISHING_ROLES])
        return messages.encode_reply("ok", None, {"changed": publishing.record(row),
                                                  "published": self.published_records()})

    def send_published(self, names: list[str]) -> None:
        """The whole table to these workers; one that is gone gets it when it joins again."""
        frames = messages.encode_published(self.published.rows())
        for name in names:
            try:
                self.bus.send_multipart([name.encode(), *frames], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    # -- ordered stop (stackctl stop) ---------------------------------------------

    def _tell(self, role_filter) -> list[str]:
        names = [m.name for m in self.members.members() if role_filter(m.role)]
        for name in names:
            try:
                self.bus.send_multipart([name.encode(), *messages.encode_stop()], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        return names

    def begin_stop(self, now: float) -> dict:
        """Stop in order: the workers reset their connections and say goodbye, then egress
        writes what they sent, then ingress exits 0 (and honcho stops what is left)."""
        if self.stop_phase is None:
            self.log.info("stack_stopping", requested_by="stackctl")
            self.stop_phase = "workers"
            self.stop_deadline = now + STOP_WORKERS_WAIT
            self._tell(lambda role: role != "egress")
        return {"stopping": [m.name for m in self.members.members()]}

    def advance_stop(self, now: float) -> None:
        roles = [m.role for m in self.members.members()]
        if self.stop_phase == "workers" and (now >= self.stop_deadline or all(r == "egress" for r in roles)):
            self.stop_phase = "egress"
            self.stop_deadline = now + STOP_EGRESS_WAIT
            self._tell(lambda role: role == "egress")
        elif self.stop_phase == "egress" and (now >= self.stop_deadline or not roles):
            self.stop_phase = "done"
            self.proc.stopper.stopping = True

    # -- loop --------------------------------------------------------------------

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.bus, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.device.fileno(), zmq.POLLIN)
        poller.register(self.telemetry.inbound, zmq.POLLIN)
        poller.register(self.telemetry.outbound, zmq.POLLIN)
        poller.register(self.proc.telemetry.socket, zmq.POLLIN)
        if self.refusals is not None:
            poller.register(self.refusals, zmq.POLLIN)
        device_fd = self.device.fileno()
        reassembler = self.router.reassembler
        accepting = True  # the device is polled; False once stackctl stop began
        while not self.proc.stopper.stopping:
            if accepting and self.stop_phase is not None:  # stopping: no new packets in
                poller.unregister(device_fd)
                accepting = False
            self.proc.flush_logs()
            timeout = 100
            deadline = reassembler.next_deadline()
            if deadline is not None:
                timeout = min(timeout, max(0, int((deadline - time.monotonic()) * 1000) + 1))
            if self.shedder is not None:
                timeout = min(timeout, max(0, int((self.shedder.next_deadline() - time.monotonic()) * 1000) + 1))
            ready = dict(endpoints.poll(poller, timeout, self.proc.config.busy_poll))
            now = time.monotonic()
            self.proc.trim_heap(now)
            if self.bus in ready:
                self.read_bus(now)
            if device_fd in ready:
                self.read_device(now)
            if self.control in ready:
                self.read_control(now)
            if self.refusals is not None and self.refusals in ready:
                endpoints.log_refusals(self.refusals, self.log)
            if deadline is not None and deadline <= now:
                self.expire_fragments(now)
            if self.shedder is not None and self.shedder.next_deadline() <= now:
                counters = self.proc.counters
                load = synfilter.Reading(counters["packets_in"], self.admission.syns_seen, self.drains,
                                         counters["device_backlogged"])
                decision = self.shedder.tick(now, load, list(self.admission.real))
                if decision is not None:
                    self.set_syn_filter(decision)
            for name in self.members.expire(now):
                self.worker_gone(name, "heartbeat_timeout")
            if any(self.router.pending.values()):
                self.flush_pending(now)
            if self.orphans:
                self.hand_out_orphans(now)
            if self.telemetry.inbound in ready or self.telemetry.outbound in ready:
                self.telemetry.pump()
            if self.stop_phase is not None:
                self.advance_stop(now)

    def close(self) -> None:
        self.bus.close()
        self.control.close()
        self.telemetry.close()
        if self.refusals is not None:
            self.refusals.close()
        if self.auth is not None:
            self.auth.stop()


def main() -> None:
    proc = Process("ingress")
    cfg = proc.config
    endpoints.ensure_run_dir(cfg.run_dir)
    try:
        device = tun.open_device(cfg.tun_name, writer_only=False, offload=cfg.offload, run_dir=cfg.run_dir,
                                 netns=cfg.attach)
        tun.configure_kernel_side(device.name, str(cfg.host_interface), cfg.mtu,
                                  None if cfg.host_interface6 is None else str(cfg.host_interface6),
                                  netns=cfg.attach, default_route=cfg.default_route)
    except tun.TunError as exc:
        proc.log.error("tun_open_failed", device=cfg.tun_name, error=str(exc))
        raise SystemExit(tun.exit_status(exc)) from None
    resolv_conf = None
    if cfg.attach and relay_config.relay_settings().dns:  # the namespace asks the stack's resolver
        stack = [str(a) for a in (cfg.stack_address, cfg.stack_address6) if a is not None]
        resolv_conf = resolvconf.install(cfg.attach, stack, cfg.run_dir)
        proc.log.info("resolv_conf", path=resolv_conf, nameservers=stack,
                      note=None if resolv_conf else "not written: the namespace is unnamed or has its own")
    ctx = zmq.Context()
    ingress = Ingress(proc, device, ctx)
    proc.log.info("ingress_started", device=device.name, host=str(cfg.host_interface),
                  address=str(cfg.stack_address), host6=cfg.host_interface6 and str(cfg.host_interface6),
                  address6=cfg.stack_address6 and str(cfg.stack_address6), attach=cfg.attach or None,
                  forward=cfg.forward, offload=hex(getattr(device, "offload_bits", 0)),
                  epoch=messages.epoch_label(ingress.epoch))
    if ingress.published.ports:
        proc.log.info("published", ports=[publishing.text(row) for row in ingress.published.rows()],
                      restored=ingress.published_restored)  # restored: this ingress was restarted
    try:
        ingress.run()
        # A clean exit: the stack stops, and its next start begins from USTACK_PUBLISH again.
        publishing.discard(cfg.run_dir)
    finally:
        proc.log.info("ingress_stopped", **dict(proc.counters))
        if ingress.shedder is not None:
            ingress.set_syn_filter(synfilter.OFF)  # the device may outlive us (egress holds it)
        if ingress.recent_syns >= 0:
            os.close(ingress.recent_syns)
        ingress.close()
        ctx.term()
        device.close()
        if resolv_conf is not None:
            resolvconf.remove(resolv_conf, cfg.run_dir)


if __name__ == "__main__":
    main()
