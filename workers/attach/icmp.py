"""ICMP echo relaying for attach mode: a real echo to the real host, and only its real answer back.

Contract (sans-IO, ``workers.attach.relay``): an echo request from the namespace
to another address is sent from an unprivileged datagram ICMP socket (one
per client address, destination and identifier; the kernel gives it its
own identifier and checksum), ICMP or ICMPv6 by the destination's family, and
each echo reply that socket receives goes back to the client with the
client's identifier restored (RFC 792, RFC 4443 §4.2). A host
that does not answer gets no answer: nothing is ever made up here. A
destination the policy refuses gets ICMP administratively prohibited
(RFC 1812 §5.2.7.1) from the stack, and so does every request while the
host where the stack runs refuses us echo sockets (``net.ipv4.ping_group_range``;
counted as ``relay_ping_refused``). Flows close after ``idle`` seconds.

A flow is a ``Flow(client, identifier, 0, destination)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.flow import Flow
from workers.attach.policy import ForwardPolicy
from pipeline.wire import Malformed
from pipeline.wire import ipv6
from pipeline.wire.icmp import ECHO_REPLY, IcmpMessage, IcmpPacket
from pipeline.wire.icmpv6 import ECHO_REPLY as ECHO_REPLY6
from pipeline.wire.icmpv6 import Icmpv6Message
from pipeline.wire.ipv4 import PROTO_ICMP
from workers.attach import relay
from workers.core import Outgoing, Sink, ip_reply

IDLE = 10.0        # seconds an echo flow lives after its last request or reply
MAX_FLOWS = 1024   # open echo sockets per worker
MAX_QUOTE = 576    # bytes of the last request kept for an ICMP error's quote (RFC 1812 §4.3.2.3)


@dataclass(slots=True)
class EchoFlow:
    started: float
    last: float
    denied: bool = False
    name: str = ""  # the name our resolver learned the destination from
    requests: int = 0
    replies: int = 0
    refused: bool = False  # this host refuses us echo sockets (net.ipv4.ping_group_range)
    quote: bytes = b""     # the last request, for the ICMP error that says so


class EchoRelay(relay.DatagramFlows):
    proto = relay.ICMP

    def __init__(self, sink: Sink, address: bytes, policy: ForwardPolicy, idle: float = IDLE,
                 max_flows: int = MAX_FLOWS) -> None:
        super().__init__(sink, address, policy, idle, max_flows)

    def request(self, src: bytes, dst: bytes, msg: IcmpMessage | Icmpv6Message, packet: bytes,
                now: float) -> list[Outgoing]:
        """An echo request from ``src`` to ``dst`` (not us): relay it, or refuse it."""
        key = Flow(src, msg.identifier, 0, dst)
        flow = self.admit(key, 0, now, lambda denied: EchoFlow(now, now, denied=denied))
        if flow is None:
            return []
        if flow.refused:  # its idle time runs from the refusal: then a new socket is tried
            return self._refused(key, flow, packet)
        flow.last = now
        if flow.denied:
            return [relay.unreachable(dst, src, "admin", packet)]
        flow.requests += 1
        flow.quote = packet[:MAX_QUOTE]
        # The kernel sets its own identifier and checksum (a datagram ICMP or ICMPv6 socket).
        wire = msg.to_bytes(src, dst) if isinstance(msg, Icmpv6Message) else msg.emit()
        self.commands.append(relay.Send(key, wire))
        return []

    def upstream(self, ev: relay.Upstream, now: float) -> list[Outgoing]:
        key: Flow = ev.key  # type: ignore[assignment]
        flow = self.flows.get(key)
        if flow is not None and ev.kind == relay.REFUSED:
            flow.refused = True
            return self._refused(key, flow, flow.quote)
        if flow is None or ev.kind != relay.DATA:
            return []
        try:
            reply = IcmpPacket.checked(ev.data)
        except Malformed:
            self.sink.drop("relay_icmp_truncated")
            return []
        v6 = len(key.remote) == 16
        if reply.type != (ECHO_REPLY6 if v6 else ECHO_REPLY):
            return []
        flow.last = now
        flow.replies += 1
        # The client's identifier back in place of the socket's (RFC 792, RFC 4443 §4.2: same identifier
        # and sequence).
        rest = (key.rport << 16) | (reply.rest & 0xFFFF)
        if v6:
            answer6 = Icmpv6Message(ECHO_REPLY6, 0, rest, bytes(reply.payload)).to_bytes(key.local, key.remote)
            return [(ip_reply(key.local, key.remote, ipv6.ICMPV6, answer6), None)]
        answer = IcmpMessage(ECHO_REPLY, 0, rest, bytes(reply.payload))
        return [(ip_reply(key.local, key.remote, PROTO_ICMP, answer.emit()), None)]

    def _refused(self, key: Flow, flow: EchoFlow, packet: bytes) -> list[Outgoing]:
        """The host where the stack runs will not let us ping: say so to the client rather than
        stay silent (RFC 1812 §5.2.7.1, RFC 4443 §3.1: administratively prohibited)."""
        self.sink.counters["relay_ping_refused"] += 1
        return [relay.unreachable(key.local, key.remote, "admin", packet)]

    def expire(self, now: float) -> None:
        for key, flow in list(self.flows.items()):
            if flow.last + self.idle <= now:
                self.end(key, now, "idle")

    def next_deadline(self) -> float | None:
        return min((f.last + self.idle for f in self.flows.values()), default=None)

    def end(self, key: Flow, now: float, reason: str) -> None:
        flow = self.flows.pop(key)
        if flow.denied:
            return
        self.commands.append(relay.Close(key))
        relay.log_flow(self.sink, "icmp", key, flow.started, now, reason, name=flow.name, packets_up=flow.requests,
                       packets_down=flow.replies)

    def close(self, now: float) -> None:
        for key in list(self.flows):
            self.end(key, now, "shutdown")
