"""The worker process shell: ZeroMQ I/O and timers around a sans-IO core.

The loop (STYLE.md §2): poll the ingress socket with a timeout that ends at
the core's next deadline or the next heartbeat, feed every packet that
arrived to the core, fire due timers, and push what the core returns to
egress. Besides packets it speaks the membership protocol: a heartbeat with
the worker's counters every HEARTBEAT_INTERVAL (and the ports its services
want steered by client, which the worker's ``__main__`` passes in: ingress
then sends every connection of one client to such a port to one worker),
the flows it holds whenever they change (all of them when ingress welcomes
it, which is how a restarted ingress learns who owns what), and resets for
the flows of a dead worker when ingress hands them over. A core that relays flows (attach mode,
``workers.attach.relay``) also gets its commands carried out on real sockets
(``workers.attach.upstream``) whose descriptors share the poll, and is fed what
they report. Nothing protocol-specific lives here.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import zmq

from pipeline import latency
from pipeline.bus import endpoints, messages
from pipeline.config import netns_label
from pipeline.process import Process
from workers.core import Outgoing, Sink, WorkerCore
from workers.attach.learned import SharedNames
from workers.attach.upstream import Upstreams

MAX_DRAIN = 64  # bus messages (each up to messages.MAX_BATCH packets) handled per wake-up
LATENCY_REPORT = 0.2  # seconds between latency samples sent to ingress, while there are some


def sink(proc: Process, ns: str = "") -> Sink:
    """The process's counters and logger as a core's sink (heartbeats read the same counters); the
    core of an attached namespace ``ns`` logs every record with ``ns`` (issue 21)."""
    return Sink(proc.counters, proc.log.bind(ns=ns) if ns else proc.log, proc.debug, proc.log_payload)


class Space:
    """One attached namespace as a worker holds it: its own core, and the real sockets of its relays."""

    __slots__ = ("index", "name", "core", "upstreams", "out")

    def __init__(self, index: int, name: str, core: WorkerCore, upstreams: Upstreams | None) -> None:
        self.index = index
        self.name = name
        self.core = core
        self.upstreams = upstreams
        self.out: list[Outgoing] = []  # for egress, from this wake-up


def namespaces_at_start(proc: Process) -> dict[int, str]:
    """USTACK_ATTACH's namespaces under the indexes ingress gives them at a fresh start (NAMESPACES,
    which ingress sends once we have joined, corrects a restart's); our own namespace alone if none."""
    return {i: netns_label(path) for i, path in enumerate(proc.config.attached)} or {0: ""}


def run(proc: Process, make_core: Callable[[int, str], WorkerCore], steered: frozenset[int] = frozenset(),
        outbound: dict[int, str] | None = None, names: SharedNames | None = None) -> None:
    """Serve one core per attached namespace (``make_core(index, name)``; one, for our own namespace,
    when not attached) until stopped. Attach mode: ``outbound``, the address relayed flows leave
    from per family; ``names``, what the stack's resolver learned (written out before each send)."""
    ctx = zmq.Context()
    cfg = proc.config
    if cfg.ingress_endpoint.startswith("ipc://") or cfg.egress_endpoint.startswith("ipc://"):
        endpoints.ensure_run_dir(cfg.run_dir)
    inbox = endpoints.worker_dealer(ctx, cfg, proc.name)
    outbox = endpoints.worker_push(ctx, cfg)
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    poller.register(proc.telemetry.socket, zmq.POLLIN)  # stackctl's requests (see pipeline.telemetry)
    spaces: dict[int, Space] = {}
    published: tuple[messages.PublishedPort, ...] = ()  # the last table ingress sent

    def open_space(index: int, name: str) -> Space:
        core = make_core(index, name)
        # Relaying cores (attach mode) get real sockets, polled beside the bus.
        upstreams = Upstreams(poller, outbound) if hasattr(core, "relay_commands") else None
        space = spaces[index] = Space(index, name, core, upstreams)
        publish(space)
        return space

    def publish(space: Space) -> None:
        """The published ports into its namespace: a relaying core listens on them."""
        set_published = getattr(space.core, "set_published", None)
        if set_published is not None:
            set_published([row[:3] for row in published if row[3] == space.index], time.monotonic())

    def close_space(space: Space) -> None:
        """Its namespace is detached: every connection reset, every upstream socket closed."""
        del spaces[space.index]
        send(space.core.close(time.monotonic()), None, space.index)
        if space.upstreams is not None:
            send(carry_out(space.core, space.upstreams), None, space.index)
            space.upstreams.close_all()
        space.core.flow_changes()  # ingress forgot the namespace's flows with it
        log.info("namespace_closed", ns=space.name, index=space.index)

    for index, name in namespaces_at_start(proc).items():
        open_space(index, name)
    if hasattr(next(iter(spaces.values())).core, "connection_table"):
        proc.telemetry.on_conns(lambda: [dict(record, ns=space.name) for space in list(spaces.values())
                                         for record in space.core.connection_table(time.monotonic())])  # type: ignore[attr-defined]
    stop_asked = False  # stackctl stop: finish, say goodbye, then idle until the stack is stopped
    log = proc.log
    counters = proc.counters
    heartbeat_seq = 0
    next_heartbeat = 0.0
    timing_until = 0.0  # stamped packets came recently: measure the upstream stage too
    samples: latency.Samples = {}  # latency budget samples (pipeline.latency), until sent to ingress
    next_report = 0.0
    log.info("worker_started", role=proc.role)

    def send(packets: list[Outgoing], stamps: list[float | None] | None = None, ns: int = 0) -> None:
        """Everything for egress from one wake-up for one namespace, in as few messages as MAX_BATCH
        allows; ``stamps`` (pipeline.latency) get the time it leaves."""
        if stamps is not None:
            stamps = [*stamps, time.monotonic()]
        for start in range(0, len(packets), messages.MAX_BATCH):
            batch = packets[start:start + messages.MAX_BATCH]
            try:
                # Large frames zero-copy (endpoints.ZERO_COPY_MIN): TSO segments out of chargen.
                outbox.send_multipart(messages.encode_packets(batch, stamps, ns), flags=zmq.NOBLOCK, copy=False)
                counters["packets_out"] += len(batch)
            except zmq.Again:  # egress gone or far behind: the peers' TCP retransmits
                proc.drop("egress_full", packets=len(batch))

    def tell_ingress(frames: list[bytes]) -> None:
        try:
            inbox.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # ingress is away: the next heartbeat and its welcome put things right

    try:
        while not proc.stopper.stopping and not stop_asked:
            proc.flush_logs()
            now = time.monotonic()
            if now >= next_heartbeat:
                stats: dict[str, int] = dict(counters)
                for space in spaces.values():
                    for key, value in space.core.stats().items():
                        stats[key] = stats.get(key, 0) + value
                tell_ingress(messages.encode_heartbeat(proc.name, proc.role, heartbeat_seq, stats, steered))
                heartbeat_seq += 1
                next_heartbeat = now + messages.HEARTBEAT_INTERVAL
            proc.trim_heap(now)  # what closed connections' buffers left in the heap
            wake = next_heartbeat
            for space in spaces.values():
                deadline = space.core.next_deadline()
                if deadline is not None and deadline < wake:
                    wake = deadline
            if samples:
                wake = min(wake, next_report)
            timeout_ms = max(0, int((wake - now) * 1000) + 1)
            stamps: list[float | None] | None = None  # the first stamped input's, for what goes out
            ready = endpoints.poll(poller, timeout_ms, cfg.busy_poll)
            if ready and (len(ready) > 1 or ready[0][0] is not inbox):
                for space in spaces.values():
                    upstreams = space.upstreams
                    if upstreams is None:
                        continue
                    reported = [ev for fd, flags in ready if fd in upstreams.by_fd for ev in upstreams.ready(fd, flags)]
                    if reported:
                        now = time.monotonic()
                        if upstreams.timing:  # an upstream answer: its way to the namespace starts here
                            stamps = [None, None, now]
                        space.out += space.core.handle_upstream(reported, now)  # type: ignore[attr-defined]
            if ready:
                # Drain what is waiting before touching timers: one wake-up, many packets,
                # and what they cause goes to egress together.
                # Bounded: under overload the inbox never empties, and heartbeats and timers must still run.
                for _, msg in itertools.islice(endpoints.drain(inbox, proc.drop), MAX_DRAIN):
                    if isinstance(msg, messages.Packets):
                        counters["packets_in"] += len(msg.items)
                        space = spaces.get(msg.ns)
                        if space is None:  # detached meanwhile
                            proc.drop("unknown_namespace", ns=msg.ns, packets=len(msg.items))
                            continue
                        now = time.monotonic()
                        if msg.stamps is not None:  # someone measures (stackctl latency)
                            latency.merge(samples, latency.arrival(msg.stamps, now))
                            if stamps is None:
                                stamps = [*msg.stamps[:2], now]
                            timing_until = now + latency.ARMED_FOR
                        handle = space.core.handle_packet
                        out = space.out
                        for data, offload in msg.items:
                            out += handle(data, now, offload)
                    elif isinstance(msg, messages.Welcome):
                        for space in spaces.values():
                            space.core.flow_changes()  # superseded by the full list
                            tell_ingress(messages.encode_flows(proc.name, True, space.core.flows(), [], space.index))
                        log.info("welcomed", epoch=msg.label)
                    elif isinstance(msg, messages.Orphans):
                        space = spaces.get(msg.ns)
                        if space is not None:
                            space.out += space.core.reset_orphans(msg.flows, time.monotonic())
                    elif isinstance(msg, messages.Stop):
                        stop_asked = True
                    elif isinstance(msg, messages.Published):
                        # The published ports (attach mode): each namespace's relays listen on its
                        # own, their commands carried out below like any other.
                        published = msg.table
                        for space in spaces.values():
                            publish(space)
                    elif isinstance(msg, messages.Namespaces):
                        wanted = {index: name for index, name, _ in msg.table}
                        for space in [sp for sp in spaces.values() if wanted.get(sp.index) != sp.name]:
                            close_space(space)
                        for index, name in wanted.items():
                            if index not in spaces:
                                open_space(index, name)
                    else:
                        proc.drop("bus_unexpected_kind")
            now = time.monotonic()
            for space in spaces.values():
                core = space.core
                deadline = core.next_deadline()
                if deadline is not None and deadline <= now:
                    space.out += core.handle_timer(now)
                if space.upstreams is not None:
                    space.upstreams.timing = now < timing_until
                    space.out += carry_out(core, space.upstreams)
                    if space.upstreams.waits:
                        latency.merge(samples, {"upstream": space.upstreams.waits})
                        space.upstreams.waits = []
            if samples and now >= next_report:
                tell_ingress(messages.encode_latency(proc.name, samples))
                samples = {}
                next_report = now + LATENCY_REPORT
            # Flows first: a connection we open (a published port's) is announced before its SYN
            # leaves, so ingress routes the answer to us.
            for space in spaces.values():
                opened, closed = space.core.flow_changes()
                if opened or closed:
                    tell_ingress(messages.encode_flows(proc.name, False, opened, closed, space.index))
            if names is not None:
                names.flush()  # an answer's addresses are on disk before the answer leaves
            for space in spaces.values():
                if space.out:
                    send(space.out, stamps, space.index)
                    space.out = []
        for space in list(spaces.values()):
            send(space.core.close(time.monotonic()), None, space.index)
            if space.upstreams is not None:
                carry_out(space.core, space.upstreams)
                space.upstreams.close_all()
        tell_ingress(messages.encode_goodbye(proc.name))
        if stop_asked:
            log.info("worker_parked", **dict(proc.counters))
            proc.park()
    finally:
        if names is not None:
            names.close()
        log.info("worker_stopped", **dict(proc.counters))
        inbox.close()
        outbox.close()
        ctx.term()


def carry_out(core: WorkerCore, upstreams: Upstreams) -> list[Outgoing]:
    """Run a relaying core's commands on its sockets until it has none left; the packets that causes."""
    out: list[Outgoing] = []
    while commands := core.relay_commands():  # type: ignore[attr-defined]
        reported = upstreams.execute(commands)
        if reported:
            out += core.handle_upstream(reported, time.monotonic())  # type: ignore[attr-defined]
    return out
