"""A seeded network simulation for TCP (after smoltcp's ``tests/netsim.rs``).

Two ``Connection``s talk through a ``Channel`` that loses, duplicates, delays and
reorders segments, all driven by one ``random.Random(seed)`` and a simulated clock, so a
failing seed replays exactly.  Every segment crosses the wire codec (``emit`` then
``parse_tcp``) so options are exercised as bytes.  Applications on both ends send a
payload, read what arrives (optionally slowly, to close the window), then close.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
from dataclasses import dataclass, field

from pipeline.wire.seqnum import seq_add
from pipeline.wire.tcp import Flags, TcpSegment, parse_tcp
from workers.tcp.config import TcpConfig
from workers.tcp.connection import Connection, State
from workers.tcp.events import Closed, PeerClosed

CLIENT_ADDR = bytes([10, 0, 0, 1])
SERVER_ADDR = bytes([10, 0, 0, 2])
CLIENT_PORT, SERVER_PORT = 50000, 7


@dataclass
class Link:
    """Impairments of one direction."""

    loss: float = 0.0        # probability a segment vanishes
    duplicate: float = 0.0   # probability a segment is delivered twice
    delay: float = 0.01      # one-way base delay, seconds
    jitter: float = 0.0      # extra uniform delay in [0, jitter): reorders segments
    segment_size: int | None = None  # TSO: larger payloads are cut into pieces of this size, each lost on its own


@dataclass
class Endpoint:
    """A connection plus its application: a payload to send, bytes received, a read rate."""

    name: str
    conn: Connection
    payload: bytes
    read_chunk: int = -1            # bytes per read; -1 reads everything at once
    read_interval: float = 0.0      # a slow reader reads only this often
    sent: int = 0
    received: bytearray = field(default_factory=bytearray)
    eof: bool = False
    closed_reason: str | None = None
    close_called: bool = False
    next_read: float = 0.0


class Simulation:
    def __init__(self, seed: int, client_cfg: TcpConfig, server_cfg: TcpConfig, c2s: Link, s2c: Link,
                 client_payload: bytes, server_payload: bytes, slow_reader: tuple[int, float] | None = None) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.links = {"client": c2s, "server": s2c}
        self._queue: list[tuple[float, int, str, bytes]] = []  # (time, tiebreak, destination, wire bytes)
        self._tiebreak = 0
        self.delivered = self.dropped = self.duplicated = 0
        client_iss = 2**32 - self.rng.randrange(1, 200_000)  # both ISNs near the wrap
        server_iss = 2**32 - self.rng.randrange(1, 200_000)
        cconn = Connection.connect(CLIENT_PORT, SERVER_PORT, client_iss, client_cfg, self.now)
        self.client = Endpoint("client", cconn, client_payload)
        self.server: Endpoint | None = None
        self._server_cfg, self._server_iss = server_cfg, server_iss
        self._server_payload = server_payload
        self._slow_reader = slow_reader
        self._flush(self.client)

    # -- the wire ---------------------------------------------------------------------------

    def _transmit(self, sender: Endpoint, seg: TcpSegment) -> None:
        link = self.links[sender.name]
        size = link.segment_size
        if size is not None and len(seg.payload) > size:
            # What a NIC (or the kernel behind a TUN device) does with a TSO segment:
            # same header, consecutive sequence numbers, FIN and PSH on the last piece only.
            payload, last = seg.payload, len(seg.payload) - size
            for off in range(0, len(payload), size):
                flags = seg.flags if off >= last else seg.flags & ~(Flags.FIN | Flags.PSH)
                self._transmit_one(sender, link, dataclasses.replace(
                    seg, seq=seq_add(seg.seq, off), flags=flags, payload=payload[off:off + size]))
            return
        self._transmit_one(sender, link, seg)

    def _transmit_one(self, sender: Endpoint, link: Link, seg: TcpSegment) -> None:
        src, dst = (CLIENT_ADDR, SERVER_ADDR) if sender.name == "client" else (SERVER_ADDR, CLIENT_ADDR)
        wire = seg.emit(src, dst)
        to = "server" if sender.name == "client" else "client"
        copies = 1
        if self.rng.random() < link.loss:
            self.dropped += 1
            copies = 0
        elif self.rng.random() < link.duplicate:
            self.duplicated += 1
            copies = 2
        for _ in range(copies):
            at = self.now + link.delay + self.rng.random() * link.jitter
            self._tiebreak += 1
            heapq.heappush(self._queue, (at, self._tiebreak, to, wire))

    def _deliver(self, to: str, wire: bytes) -> None:
        src, dst = (CLIENT_ADDR, SERVER_ADDR) if to == "server" else (SERVER_ADDR, CLIENT_ADDR)
        seg = parse_tcp(wire, src, dst)
        self.delivered += 1
        if to == "server":
            if self.server is None:
                if not seg.syn or seg.ack_flag:
                    return  # nothing listening for it yet
                conn = Connection.accept(SERVER_PORT, CLIENT_PORT, seg, self._server_iss, self._server_cfg, self.now)
                self.server = Endpoint("server", conn, self._server_payload)
                if self._slow_reader:
                    self.server.read_chunk, self.server.read_interval = self._slow_reader
                return
            self.server.conn.receive(seg, self.now)
        else:
            self.client.conn.receive(seg, self.now)

    # -- the applications ---------------------------------------------------------------------

    def _app(self, ep: Endpoint) -> None:
        conn = ep.conn
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, PeerClosed):
                ep.eof = True
            elif isinstance(ev, Closed):
                ep.closed_reason = ev.reason
        if conn.state is State.CLOSED:
            ep.received += conn.recv()
            return
        if self.now >= ep.next_read:
            data = conn.recv(ep.read_chunk)
            ep.received += data
            if ep.read_interval:
                ep.next_read = self.now + ep.read_interval
        if conn.state in (State.ESTABLISHED, State.CLOSE_WAIT) and not ep.close_called:
            if ep.sent < len(ep.payload):
                ep.sent += conn.send(memoryview(ep.payload)[ep.sent:ep.sent + 50_000])
            if ep.sent == len(ep.payload):
                ep.close_called = True
                conn.close()

    def _flush(self, ep: Endpoint) -> None:
        for seg in ep.conn.segments_to_send(self.now):
            self._transmit(ep, seg)

    def _endpoints(self) -> list[Endpoint]:
        return [self.client] if self.server is None else [self.client, self.server]

    def _deadline(self) -> float | None:
        times = [self._queue[0][0]] if self._queue else []
        for ep in self._endpoints():
            t = ep.conn.get_timer()
            if t is not None:
                times.append(t)
            if ep.read_interval and ep.conn.readable:
                times.append(ep.next_read)
        return min(times) if times else None

    def run(self, limit: float = 600.0) -> None:
        """Run until both connections are closed, nothing is left to do, or the time limit."""
        while True:
            for ep in self._endpoints():
                self._app(ep)
                self._flush(ep)
            if all(ep.conn.state is State.CLOSED for ep in self._endpoints()) and self.server is not None:
                return
            t = self._deadline()
            if t is None or t > limit:
                return
            self.now = max(self.now, t)
            while self._queue and self._queue[0][0] <= self.now:
                _, _, to, wire = heapq.heappop(self._queue)
                self._deliver(to, wire)
            for ep in self._endpoints():
                due = ep.conn.get_timer()
                if due is not None and due <= self.now:
                    ep.conn.handle_timer(self.now)
