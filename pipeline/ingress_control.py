"""What stackctl asks ingress (its control socket), and the tables ingress keeps for the stack.

Contract: ``Control`` is the part of ``pipeline.ingress.Ingress`` that answers
the control socket's requests: ``status`` and ``flows``; the published ports
(``publish_list``/``publish_add``/``publish_remove``, ``pipeline.publishing``);
the attached namespaces (``namespaces``/``attach``/``detach``,
``pipeline.attachments``: a device and a router each, every process told the
table after each change and when it joins; one that disappears is detached);
``latency``; and the ordered stop (``stop``). Each answer is one REPLY
(``pipeline.bus.messages``); a refused change says why and changes nothing.
"""

from __future__ import annotations

import collections
import contextlib

import zmq

from pipeline import attachments, config, latency, publishing, stacklock, tun
from pipeline.attachments import Attachment, inode_of, name_of, open_attachment
from pipeline.bus import messages
from pipeline.config import StackConfig
from pipeline.membership import Membership
from pipeline.process import Process
from pipeline.routing import Router

PUBLISHING_ROLES = ("tcp", "udp")  # the workers that listen on published ports
PUBLISH_COMMANDS = ("publish_list", "publish_add", "publish_remove")  # stackctl publish list|add|remove
NAMESPACE_COMMANDS = ("namespaces", "attach", "detach")  # stackctl namespaces|attach NS|detach NS
GONE_CHECK = 1.0  # seconds between looks at whether each attached namespace still exists
STOP_WORKERS_WAIT = 5.0  # stackctl stop: seconds the workers get to reset their connections
STOP_EGRESS_WAIT = 3.0   # then seconds egress gets to write what they sent


class Control:
    # What Ingress provides (pipeline.ingress).
    proc: Process
    log: object
    bus: zmq.Socket
    control: zmq.Socket
    poller: zmq.Poller
    members: Membership
    attachments: dict[int, Attachment]
    by_fd: dict[int, Attachment]
    published: publishing.PublishTable
    stack_id: str | None
    dns: bool
    epoch: int
    started: float
    budget: latency.Budget
    timing_until: float
    orphans: list
    next_gone_check: float
    next_index: int
    stop_phase: str | None
    stop_deadline: float

    @property
    def device(self) -> tun.TunDevice:
        """The first namespace's device: the one the kernel-side SYN filter guards."""
        return self.attachments[0].device

    def new_router(self, started: float) -> Router:
        raise NotImplementedError

    # -- status and the control socket -----------------------------------------------

    def status(self, now: float) -> dict:
        routers = [att.router for att in self.attachments.values()]
        flows = sum((router.flows_by_worker() for router in routers), collections.Counter())
        return {
            "epoch": messages.epoch_label(self.epoch),
            "uptime": round(now - self.started, 3),
            "device": self.device.name,
            "address": str(self.proc.config.stack_address),
            "address6": None if self.proc.config.stack_address6 is None else str(self.proc.config.stack_address6),
            "reassembly": {"datagrams": sum(r.reassembler.datagrams for r in routers),
                           "bytes": sum(r.reassembler.bytes_held for r in routers)},
            "namespaces": self.namespace_records(),
            "processes": [{"name": self.proc.name, "role": "ingress", "heartbeat_age": 0.0,
                           "flows": sum(len(r.flows) for r in routers), "stats": dict(self.proc.counters)}] + [
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
                    reply = messages.encode_reply("ok", None, messages.flow_table(
                        [(flow, worker, att.name) for att in self.attachments.values()
                         for flow, worker in att.router.owned_flows()]))
                elif isinstance(msg, messages.Request) and msg.command in NAMESPACE_COMMANDS:
                    reply = self.namespace_command(msg.command, msg.args, now)
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
        return [self.published_record(row) for row in self.published.rows()]

    def published_record(self, row: publishing.Row) -> dict[str, object]:
        att = self.attachments.get(row[3])
        return publishing.record(row, "" if att is None else att.name)

    def publish_command(self, command: str, args: tuple[str, ...]) -> list[bytes]:
        """``publish_list``, or one change (``publish_add``/``publish_remove`` ITEM [NS]): the reply."""
        if command == "publish_list":
            return messages.encode_reply("ok", None, {"published": self.published_records()})
        if len(args) not in (1, 2):
            return messages.encode_reply("error", f"{command} takes one proto:port:port (and a namespace)", None)
        if not self.proc.config.attach:
            return messages.encode_reply("error", "ports are published only in attach mode (USTACK_ATTACH): "
                                         "this stack is no other namespace's network", None)
        att = self.find_attachment(args[1]) if len(args) == 2 else self.attachments[0]
        if att is None:
            return messages.encode_reply("error", f"{args[1]}: not a namespace this stack is attached to", None)
        try:
            if command == "publish_add":
                row = self.published.add(args[0], publishing.port_in_use, att.index)
            else:
                row = self.published.remove(args[0])
        except publishing.PublishError as exc:
            return messages.encode_reply("error", str(exc), None)  # the table is unchanged
        self.save_published()
        event = "publish_added" if command == "publish_add" else "publish_removed"
        self.log.info(event, **self.published_record(row))
        self.send_published([m.name for m in self.members.members() if m.role in PUBLISHING_ROLES])
        return messages.encode_reply("ok", None, {"changed": self.published_record(row),
                                                  "published": self.published_records()})

    def save_published(self) -> None:
        try:
            publishing.save(self.proc.config.run_dir, self.stack_id, self.published)
        except OSError as exc:  # the change holds; only a restarted ingress would not know it
            self.log.warning("publish_not_saved", error=str(exc))

    def send_published(self, names: list[str]) -> None:
        """The whole table to these workers; one that is gone gets it when it joins again."""
        frames = messages.encode_published(self.published.rows())
        for name in names:
            try:
                self.bus.send_multipart([name.encode(), *frames], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    # -- attached namespaces (stackctl attach, detach, namespaces) -----------------------

    def namespace_records(self) -> list[dict[str, object]]:
        return [att.record() for _, att in sorted(self.attachments.items())]

    def find_attachment(self, raw: str) -> Attachment | None:
        """The attachment of a namespace given as stackctl's user gives it: a name, a path or an index."""
        path = raw if "/" in raw else "/run/netns/" + raw
        for att in self.attachments.values():
            if raw in (att.name, att.path, str(att.index)) or path == att.path:
                return att
        return None

    def namespace_command(self, command: str, args: tuple[str, ...], now: float) -> list[bytes]:
        if command != "namespaces":
            if len(args) != 1:
                return messages.encode_reply("error", f"{command} takes one namespace (a name or a path)", None)
            if not self.proc.config.attach:
                return messages.encode_reply("error", "this stack is not in attach mode (USTACK_ATTACH): it is "
                                             "the network of its own namespace only", None)
            if command == "attach":
                try:
                    self.attach(config.attach_path(args[0]), now)
                except config.ConfigError as exc:
                    return messages.encode_reply("error", "; ".join(exc.problems), None)
                except AttachError as exc:
                    return messages.encode_reply("error", str(exc), None)
            else:
                att = self.find_attachment(args[0])
                if att is None:
                    return messages.encode_reply("error", f"{args[0]}: not a namespace this stack is attached to",
                                                 None)
                self.detach(att, "stackctl", now)
        return messages.encode_reply("ok", None, {"namespaces": self.namespace_records()})

    def attach(self, path: str, now: float, index: int | None = None) -> Attachment:
        """Be the network of the namespace at ``path`` too: its device, its router, every process told."""
        inode = inode_of(path) if path else None
        for att in self.attachments.values():
            if att.path == path or (inode is not None and att.inode == inode):
                raise AttachError(f"{name_of(path) or 'this namespace'}: already attached (index {att.index})")
        if index is None:
            # Never the index of a namespace detached a moment ago: egress may still be writing
            # that one's last resets under it (pipeline.egress DETACH_GRACE).
            index = next((i % messages.MAX_NAMESPACES for i in range(self.next_index, self.next_index
                          + messages.MAX_NAMESPACES) if i % messages.MAX_NAMESPACES not in self.attachments), None)
            if index is None:
                raise AttachError(f"at most {messages.MAX_NAMESPACES} namespaces")
        self.next_index = index + 1
        try:
            att = open_attachment(self.proc.config, index, path, self.new_router(now), self.dns)
        except (tun.TunError, OSError) as exc:
            raise AttachError(f"{name_of(path) or cfg_device(self.proc.config)}: {exc}") from exc
        self.attachments[index] = att
        fd = att.device.fileno()
        self.by_fd[fd] = att
        self.poller.register(fd, zmq.POLLIN)
        self.save_namespaces()
        self.log.info("namespace_attached", ns=att.name, path=path, index=index, resolv_conf=att.resolv_conf)
        self.send_namespaces([m.name for m in self.members.members()])
        return att

    def detach(self, att: Attachment, reason: str, now: float, detail: str | None = None) -> None:
        """No longer the network of ``att``'s namespace: its workers' cores reset its flows and close
        its upstream sockets, egress closes its queue, and the device goes with the last queue."""
        del self.attachments[att.index]
        fd = att.device.fileno()
        self.by_fd.pop(fd, None)
        with contextlib.suppress(KeyError):
            self.poller.unregister(fd)
        att.close(self.proc.config.run_dir)
        self.orphans = [o for o in self.orphans if o[2] != att.index]
        gone = self.published.drop_namespace(att.index)
        self.save_namespaces()
        if gone:
            self.save_published()
            self.send_published([m.name for m in self.members.members() if m.role in PUBLISHING_ROLES])
        self.send_namespaces([m.name for m in self.members.members()])
        self.log.info("namespace_detached", ns=att.name, index=att.index, reason=reason, detail=detail,
                      flows=len(att.router.flows), unpublished=[publishing.text(row) for row in gone])

    def check_namespaces(self, now: float) -> None:
        """Detach every namespace that went away (deleted, or its process ended)."""
        self.next_gone_check = now + GONE_CHECK
        for att in [a for a in self.attachments.values() if a.gone()]:
            self.detach(att, "namespace_gone", now)

    def send_namespaces(self, names: list[str]) -> None:
        frames = messages.encode_namespaces([att.row() for _, att in sorted(self.attachments.items())])
        for name in names:
            try:
                self.bus.send_multipart([name.encode(), *frames], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def save_namespaces(self) -> None:
        """For a restarted ingress: which namespaces under which index (like the published ports)."""
        try:
            attachments.save(self.proc.config.run_dir, self.stack_id,
                             [(att.index, att.path) for att in self.attachments.values()])
        except OSError as exc:
            self.log.warning("namespaces_not_saved", error=str(exc))
        with contextlib.suppress(OSError):  # stackctl --netns finds the stack by any of them
            stacklock.set_served(self.proc.config.run_dir, [att.path for att in self.attachments.values() if att.path])

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


def cfg_device(cfg: StackConfig) -> str:
    return f"device {cfg.tun_name}"


class AttachError(Exception):
    """A namespace that cannot be attached; the message says why (stackctl prints it)."""


