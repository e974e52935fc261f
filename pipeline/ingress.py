"""Ingress: read the TUN device and send each IP packet to the worker that owns it.

Also the pipeline's meeting point: workers (and egress) heartbeat here with
their counters (a TCP worker also with the ports its services want steered
by client), TCP workers announce the flows they hold, and ``stackctl`` asks
here for the pipeline's status. Routing decisions live in
``pipeline.routing``, admission's in ``pipeline.admission``, which reads the
view routing checked; this module is the I/O around them.

Ingress holds one device per attached namespace (``pipeline.attachments``;
one stack can be the network of many, and ``stackctl attach``/``detach``
change them while it runs): each has its own router, so flows and fragments
of namespaces that use the same addresses stay apart, and every packet and
flow on the bus carries the index of its namespace. Every worker and egress
gets the table of namespaces after each change and when it (re)joins; a
namespace that disappears is detached.

What stackctl asks (status, published ports, attached namespaces, the
ordered stop) is answered by ``pipeline.ingress_control``, which Ingress
extends. Ingress also owns the table of published ports (attach mode,
``pipeline.publishing``): ``stackctl publish`` changes it here, and every TCP
and UDP worker gets the whole table after each change and whenever it
(re)joins, so a restarted worker listens on the current table.
"""

from __future__ import annotations

import os
import sys
import time

import zmq

from pipeline import attachments, bpf, latency, publishing, relay_config, synfilter, tun
from pipeline.attachments import Attachment
from pipeline.admission import Admission
from pipeline.bus import endpoints, messages
from pipeline.config import StackConfig
from pipeline.flow import Flow
from pipeline.fragments import Limits, Reassembler
from pipeline.membership import Membership
from pipeline.process import Process
from pipeline.routing import PENDING_MAX_AGE, Router
from pipeline.ingress_control import PUBLISHING_ROLES, AttachError, Control
from pipeline.telemetry import Forwarder

DRAIN_BATCH = messages.MAX_BATCH  # device reads per wake-up before looking at the bus again
ORPHAN_MAX_AGE = 5.0  # seconds to wait for a tcp worker that can reset a dead worker's peers


def reassembler(cfg: StackConfig) -> Reassembler:
    """The fragment reassembler with the RFC timeouts, or the configured one for both families."""
    if cfg.reassembly_timeout is None:
        return Reassembler()
    return Reassembler(Limits(timeout_ipv4=cfg.reassembly_timeout, timeout_ipv6=cfg.reassembly_timeout))


class Ingress(Control):
    def __init__(self, proc: Process, ctx: zmq.Context) -> None:
        cfg = proc.config
        self.proc = proc
        self.log = proc.log
        self.started = time.monotonic()
        self.epoch = int.from_bytes(os.urandom(4), "big")
        self.members = Membership(messages.HEARTBEAT_TIMEOUT)
        self.dns = bool(cfg.attach) and relay_config.relay_settings().dns  # attached namespaces ask the stack
        # The attached namespaces by index, and by the descriptor of their device; the first
        # (index 0) is opened before the loop starts, by attach(), like every other.
        self.attachments: dict[int, Attachment] = {}
        self.by_fd: dict[int, Attachment] = {}
        self.poller = zmq.Poller()
        self.next_gone_check = 0.0
        self.next_index = 0  # the index the next attached namespace gets, if free (then the next one)
        # The router of the namespace whose packets are being handled (admission asks it).
        self.router = self.new_router(self.started)
        self.admission = Admission(lambda key: key in self.router.flows, proc.drop, proc.counters)
        self.shedder: synfilter.SynShedder | None = None
        self.recent_syns = -1  # the kernel filter's map of recent SYNs, made when it first goes on
        if cfg.syn_filter and sys.platform == "linux":
            self.shedder = synfilter.SynShedder(self.started)
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
        self.published, self.published_restored = publishing.load(
            cfg.run_dir, self.stack_id, [(*row, 0) for row in relay_config.relay_settings().publish])

    def new_router(self, started: float) -> Router:
        cfg = self.proc.config
        return Router(cfg.stack_addr_bytes, self.members, self.proc.drop, started, address6=cfg.stack_addr6_bytes,
                      quiet=self.quiet, reassembler=reassembler(cfg), forward=cfg.forward)

    # -- packets ---------------------------------------------------------------

    def quiet(self, reason: str, **fields: object) -> None:
        """The kernel's own IPv6 chatter: its own counter, one debug line, never a drop or a warning."""
        self.proc.counters[reason] += 1
        if self.proc.debug:
            self.log.debug("ignored", reason=reason, **fields)

    def forward(self, name: str, items: list[messages.Item], read: float | None = None, ns: int = 0) -> bool:
        """Send packets of namespace ``ns`` to one worker as one message; False if the worker is gone.
        With ``read`` (the time they were read, while stackctl latency measures) the message is stamped."""
        stamps = None if read is None else [read, time.monotonic()]
        try:
            self.bus.send_multipart([name.encode(), *messages.encode_packets(items, stamps, ns)], flags=zmq.NOBLOCK,
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

    def route_and_forward(self, items: list[messages.Item], now: float, att: Attachment) -> None:
        """Route one namespace's packets, then send each worker its share in one message (STYLE: batch
        where it pays)."""
        batches: dict[str, list[messages.Item]] = {}
        router = self.router = att.router
        ns = att.index
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
            if not self.forward(name, batch, read, ns):
                # The worker vanished under us: route again among the living (or hold).
                for data, offload in batch:
                    again, role, _, _ = router.route(data, now)
                    if again is None or not self.forward(again, [(data, offload)], ns=ns):
                        router.hold(role, now, (data, offload))

    def read_device(self, att: Attachment, now: float) -> None:
        items = []
        try:
            read = att.device.read
            for _ in range(DRAIN_BATCH):
                got = read()
                if got is None:
                    break
                items.append(got)
        except OSError as exc:  # the device went with its namespace (EBADFD, EIO)
            if att.path:
                self.detach(att, "namespace_gone", now, str(exc))
                return
            raise
        self.drains += 1
        if len(items) == DRAIN_BATCH:
            self.proc.counters["device_backlogged"] += 1  # more waiting than one drain takes
        if items:
            self.proc.counters["packets_in"] += len(items)
            if self.proc.telemetry.capturing:
                for data, _ in items:
                    self.proc.telemetry.packet("in", data)
            self.route_and_forward(items, now, att)
            if att.router.reassembler.drops:
                self.count_fragment_drops(att.router)

    def flush_pending(self, att: Attachment, now: float) -> None:
        self.router = att.router
        for role, queue in att.router.pending.items():
            while queue:
                born, packet, offload = queue[0]
                if now - born > PENDING_MAX_AGE:
                    queue.popleft()
                    self.proc.drop("no_worker", role=role)
                    continue
                if not self.members.has_role(role):
                    break
                queue.popleft()
                name, _, _, _ = att.router.route(packet, now)
                if name is None:
                    queue.appendleft((born, packet, offload))
                    break
                if not self.forward(name, [(packet, offload)], ns=att.index):
                    queue.appendleft((born, packet, offload))
                    break

    def expire_fragments(self, att: Attachment, now: float) -> None:
        """Give up datagrams whose reassembly timer ran out; count the reassembler's drops.

        One whose first fragment came is owed ICMP Time Exceeded (fragment
        reassembly, RFC 1122 §3.3.2, RFC 8200 §4.5): that bare fragment goes
        to ``icmp``, the only way a fragment reaches a worker, and it builds
        the error.
        """
        owed = [(e.first_fragment, None) for e in att.router.reassembler.expire(now) if e.icmp_owed]
        self.count_fragment_drops(att.router)
        name = self.members.pick("icmp", b"")
        if owed and name is not None:
            self.forward(name, owed, ns=att.index)

    def count_fragment_drops(self, router: Router) -> None:
        """The reassembler's refusals (overlap, bounds, timeouts) as drop_fragment_<reason> counters."""
        reassembler = router.reassembler
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
        now = time.monotonic()
        orphans = [(now, flow, att.index) for att in self.attachments.values()
                   for flow in att.router.forget_worker(name)]
        if not was_member and not orphans:
            return
        self.log.warning("worker_lost", worker=name, why=why, detail=detail, flows=len(orphans))
        self.orphans.extend(orphans)

    def hand_out_orphans(self, now: float) -> None:
        """Ask a live tcp worker to make the dead worker's peers reset (see workers.tcp.demux)."""
        self.orphans = [(t, f, ns) for t, f, ns in self.orphans if now - t <= ORPHAN_MAX_AGE and ns in self.attachments]
        if not self.orphans:
            return
        name = self.members.pick("tcp", b"orphans")
        if name is None:
            return
        by_ns: dict[int, list[Flow]] = {}
        for _, flow, ns in self.orphans:
            by_ns.setdefault(ns, []).append(flow)
        try:
            for ns, flows in by_ns.items():
                self.bus.send_multipart([name.encode(), *messages.encode_orphans(flows, ns)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            return
        self.log.info("orphans_handed_out", worker=name, flows=len(self.orphans))
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
                    self.send_namespaces([msg.name])  # after its Welcome: a core or a device queue each
                    if msg.role in PUBLISHING_ROLES:  # it listens on the current table
                        self.send_published([msg.name])
            elif isinstance(msg, messages.Flows):
                att = self.attachments.get(msg.ns)
                if msg.name.encode() == peer and self.members.is_alive(msg.name) and att is not None:
                    att.router.update_flows(msg.name, msg.full, msg.opened, msg.closed)
            elif isinstance(msg, messages.Latency):
                if now < self.timing_until:
                    self.budget.add(msg.samples)
            elif isinstance(msg, messages.Goodbye):
                if msg.name.encode() == peer and self.members.remove(msg.name):
                    for att in self.attachments.values():
                        att.router.forget_worker(msg.name)  # it reset its own connections
                    self.log.info("worker_left", worker=msg.name)
            else:
                self.proc.drop("bus_unexpected_kind")

    # -- loop --------------------------------------------------------------------

    def run(self) -> None:
        poller = self.poller
        poller.register(self.bus, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.telemetry.inbound, zmq.POLLIN)
        poller.register(self.telemetry.outbound, zmq.POLLIN)
        poller.register(self.proc.telemetry.socket, zmq.POLLIN)
        if self.refusals is not None:
            poller.register(self.refusals, zmq.POLLIN)
        by_fd = self.by_fd
        accepting = True  # the devices are polled; False once stackctl stop began
        while not self.proc.stopper.stopping:
            if accepting and self.stop_phase is not None:  # stopping: no new packets in
                for fd in by_fd:
                    poller.unregister(fd)
                accepting = False
            self.proc.flush_logs()
            timeout = 100
            deadline = min((d for att in self.attachments.values()
                            if (d := att.router.reassembler.next_deadline()) is not None), default=None)
            if deadline is not None:
                timeout = min(timeout, max(0, int((deadline - time.monotonic()) * 1000) + 1))
            if self.shedder is not None:
                timeout = min(timeout, max(0, int((self.shedder.next_deadline() - time.monotonic()) * 1000) + 1))
            ready = dict(endpoints.poll(poller, timeout, self.proc.config.busy_poll))
            now = time.monotonic()
            self.proc.trim_heap(now)
            if self.bus in ready:
                self.read_bus(now)
            for fd in [fd for fd in ready if type(fd) is int and fd in by_fd]:
                self.read_device(by_fd[fd], now)
            if self.control in ready:
                self.read_control(now)
            if self.refusals is not None and self.refusals in ready:
                endpoints.log_refusals(self.refusals, self.log)
            if deadline is not None and deadline <= now:
                for att in list(self.attachments.values()):
                    self.expire_fragments(att, now)
            if self.shedder is not None and self.shedder.next_deadline() <= now:
                counters = self.proc.counters
                load = synfilter.Reading(counters["packets_in"], self.admission.syns_seen, self.drains,
                                         counters["device_backlogged"])
                decision = self.shedder.tick(now, load, list(self.admission.real))
                if decision is not None:
                    self.set_syn_filter(decision)
            for name in self.members.expire(now):
                self.worker_gone(name, "heartbeat_timeout")
            for att in list(self.attachments.values()):
                if any(att.router.pending.values()):
                    self.flush_pending(att, now)
            if now >= self.next_gone_check and accepting:
                self.check_namespaces(now)
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
    ctx = zmq.Context()
    ingress = Ingress(proc, ctx)
    # The namespaces at start: USTACK_ATTACH's, or (a restarted ingress) those attached when it died.
    saved = attachments.load(cfg.run_dir, ingress.stack_id, cfg.attached)
    try:
        for index, path in sorted(saved.items()) or [(0, "")]:
            try:
                ingress.attach(path, time.monotonic(), index)
            except AttachError as exc:
                if index == 0:
                    raise
                proc.log.warning("namespace_not_reattached", path=path, index=index, error=str(exc))
    except AttachError as exc:
        proc.log.error("tun_open_failed", device=cfg.tun_name, error=str(exc))
        ingress.close()
        ctx.term()
        raise SystemExit(tun.exit_status(exc.__cause__) if isinstance(exc.__cause__, tun.TunError) else 1) from None
    if ingress.shedder is not None:
        ingress.set_syn_filter(synfilter.OFF)  # a filter a previous ingress left on the device
    device = ingress.device
    proc.log.info("ingress_started", device=device.name, host=str(cfg.host_interface),
                  address=str(cfg.stack_address), host6=cfg.host_interface6 and str(cfg.host_interface6),
                  address6=cfg.stack_address6 and str(cfg.stack_address6), attach=cfg.attach or None,
                  namespaces=[att.name for att in ingress.attachments.values() if att.path] or None,
                  forward=cfg.forward, offload=hex(getattr(device, "offload_bits", 0)),
                  epoch=messages.epoch_label(ingress.epoch))
    if ingress.published.ports:
        proc.log.info("published", ports=[publishing.text(row) for row in ingress.published.rows()],
                      restored=ingress.published_restored)  # restored: this ingress was restarted
    try:
        ingress.run()
        # A clean exit: the stack stops, and its next start begins from USTACK_PUBLISH again.
        publishing.discard(cfg.run_dir)
        attachments.discard(cfg.run_dir)
    finally:
        proc.log.info("ingress_stopped", **dict(proc.counters))
        if ingress.shedder is not None:
            ingress.set_syn_filter(synfilter.OFF)  # the device may outlive us (egress holds it)
        if ingress.recent_syns >= 0:
            os.close(ingress.recent_syns)
        ingress.close()
        ctx.term()
        for att in ingress.attachments.values():
            att.close(cfg.run_dir)


if __name__ == "__main__":
    main()
