"""The parts a short connection never uses are built only when first needed.

A connection starts without its SACK scoreboard and RACK state (``sack_recovery.py``); the
first SACK block builds the scoreboard, a SACK connection's first transmission builds
RACK.  (The receiver's reassembly queue is built by the receiver; where it is built late
too, the same scripts cover it: ``build_everything`` builds it early when it is absent.)

The property: hypothesis drives two connections through random scripts -- data both
ways, segments delivered out of order (reassembly), dropped (SACK blocks, RACK, fast
recovery, timeouts) or duplicated, time advanced, applications reading -- once as they
are built and once with every part built with the connection, the old way.  Both runs
must put the same segments on the wire and end in the same sequence state, and every
byte sent must arrive in order, once the link stops losing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.wire.tcp import Flags, TcpOptions, TcpSegment
from tests.unit.tcp.builders import FULL, LOCAL_PORT, PLAIN, REMOTE_PORT, T0, config, established, seg
from workers.tcp.connection import Connection, State
from workers.tcp.events import Closed
from workers.tcp.rack import Rack
from workers.tcp.reassembly import ReassemblyQueue
from workers.tcp.sack_recovery import SackRecovery
from workers.tcp.scoreboard import SackScoreboard

MSS = 100
CLIENT_ISS = 2**32 - 700   # both sides cross the sequence wrap within the first kilobyte
SERVER_ISS = 2**32 - 300


def _sack(c: Connection) -> SackRecovery | None:
    """The SACK recovery, which holds the lazy parts (a NewReno connection has none)."""
    rec = c.sender.recovery
    return rec if isinstance(rec, SackRecovery) else None


def build_everything(c: Connection) -> None:
    """Build every lazily built part now: the connection as it was before they were lazy."""
    rec = _sack(c)
    if rec is not None:
        rec.need_scoreboard()
        rec.need_rack()
    if getattr(c.receiver, "reasm", None) is None:
        c.receiver.reasm = ReassemblyQueue(c.config.recv_buffer)


def built(c: Connection) -> dict[str, bool]:
    rec = _sack(c)
    return {"scoreboard": rec is not None and rec.scoreboard is not None, "rack": rec is not None and rec.rack is not None}


def state(c: Connection) -> tuple:
    """What must not differ between the two runs: the TCB, the timers, the counters, and what
    the scoreboard and RACK hold (one not built yet reads as a new one; RACK's positions
    depend on where it was anchored, so it is compared by what they mean)."""
    rec = _sack(c)
    rack = (rec.rack if rec is not None else None) or Rack(c.sender.snd_una)
    sb = (rec.scoreboard if rec is not None else None) or SackScoreboard()
    return (c.state, c.sender.snd_una, c.sender.snd_nxt, c.receiver.rcv_nxt, c.receiver.rcv_adv, c.sender.snd_wnd, c.sender.cc.cwnd, c.sender.cc.ssthresh, c.sender.recovery.in_fast_recovery,
            c.retransmissions, c.timeouts, c.fast_retransmits, c.loss_probes, c.lost_retransmissions,
            c.ooo_segments, c.dup_acks, sorted(t.name for t in c.timers.armed()), c.get_timer(),
            sb.ranges(), sb.sacked_bytes, rack.lost_below(), rack.xmit_ts, rack.rtt, rack.min_rtt,
            rack.reordering_seen, rack.reo_wnd_mult, rack.reo_wnd_persist,
            [(rack.seq(r.start), rack.seq(r.end), r.xmit_ts, r.xmit_count) for r in rack.rtx])


@dataclass
class Run:
    """Two connections and the link between them, driven by one script."""

    client: Connection
    server: Connection
    now: float
    queues: dict[str, list[TcpSegment]] = field(default_factory=lambda: {"c2s": [], "s2c": []})
    wire: list[tuple[str, TcpSegment]] = field(default_factory=list)
    trace: list[tuple] = field(default_factory=list)
    sent: dict[str, bytearray] = field(default_factory=lambda: {"c": bytearray(), "s": bytearray()})
    got: dict[str, bytearray] = field(default_factory=lambda: {"c": bytearray(), "s": bytearray()})
    first_built: dict[str, int] = field(default_factory=dict)  # part -> step at which it appeared
    ended: dict[str, str] = field(default_factory=dict)  # side -> why its connection closed

    def side(self, name: str) -> Connection:
        return self.client if name == "c" else self.server

    def collect(self) -> None:
        """Everything both sides want to send goes onto the link; their events are noted."""
        for name, direction in (("c", "c2s"), ("s", "s2c")):
            c = self.side(name)
            for s in c.segments_to_send(self.now):
                self.wire.append((direction, s))
                self.queues[direction].append(s)
            while (ev := c.next_event()) is not None:
                if isinstance(ev, Closed):
                    self.ended[name] = ev.reason

    def deliver(self, direction: str, index: int) -> None:
        queue = self.queues[direction]
        if queue:
            s = queue.pop(index % len(queue))
            (self.server if direction == "c2s" else self.client).receive(s, self.now)
        self.collect()

    def wait(self, dt: float) -> None:
        """Advance the clock by dt, firing every timer on the way (the link holds what they send)."""
        end = self.now + dt
        while True:
            due = [t for t in (self.client.get_timer(), self.server.get_timer()) if t is not None and t <= end]
            if not due:
                break
            self.now = max(self.now, min(due))
            for c in (self.client, self.server):
                t = c.get_timer()
                if t is not None and t <= self.now:
                    c.handle_timer(self.now)
            self.collect()
        self.now = end

    def send(self, name: str, n: int) -> None:
        c = self.side(name)
        if c.state not in (State.ESTABLISHED, State.CLOSE_WAIT) or c.sender.fin_queued:
            return
        data = bytes((len(self.sent[name]) + i) * 7 % 251 for i in range(n))
        taken = c.send(data)
        self.sent[name] += data[:taken]
        self.collect()

    def read(self, name: str) -> None:
        self.got[name] += self.side(name).recv()
        self.collect()

    def carry(self, direction: str, fates: list[str], delay: float = 0.0) -> None:
        """What is on the link meets its fate after ``delay`` (timers fire meanwhile), in order:
        delivered, lost, duplicated, or held back to arrive after everything sent later (out of
        order).  Segments without a fate are delivered; what the deliveries make the other side
        send waits for the next round."""
        if delay:
            self.wait(delay)
        queue, self.queues[direction] = self.queues[direction], []
        receiver = self.server if direction == "c2s" else self.client
        held = []
        for i, s in enumerate(queue):
            fate = fates[i] if i < len(fates) else "deliver"
            if fate == "hold":
                held.append(s)
                continue
            if fate == "drop":
                continue
            receiver.receive(s, self.now)
            if fate == "dup":
                receiver.receive(s, self.now)
        self.collect()
        self.queues[direction] += held

    def step(self, rnd: dict, index: int) -> None:
        """One round: an application sends, each direction of the link carries what it holds,
        time passes (timers fire), and maybe the applications read."""
        who, n = rnd["send"]
        if n:
            self.send(who, n)
        self.carry("c2s", rnd["c2s"], rnd["delay"])
        self.carry("s2c", rnd["s2c"], rnd["delay"])
        if rnd["wait"]:
            self.wait(rnd["wait"])
        if rnd["read"]:
            self.read("c")
            self.read("s")
        self.note(index)

    def note(self, index: int) -> None:
        for name in ("c", "s"):
            for part, yes in built(self.side(name)).items():
                if yes:
                    self.first_built.setdefault(f"{name}.{part}", index)
        self.trace.append((self.now, state(self.client), state(self.server)))

    def settle(self, rounds: int = 400) -> None:
        """The link stops losing: deliver everything, read everything, fire timers until quiet."""
        for _ in range(rounds):
            for direction in ("c2s", "s2c"):
                while self.queues[direction]:
                    self.deliver(direction, 0)
            self.read("c")
            self.read("s")
            if self.queues["c2s"] or self.queues["s2c"]:
                continue
            deadlines = [t for t in (self.client.get_timer(), self.server.get_timer()) if t is not None]
            quiet = all(c.sender.snd_una == c.sender.snd_nxt and not c.sender.has_unsent() for c in (self.client, self.server))
            if quiet or not deadlines:
                return
            self.wait(min(deadlines) - self.now)
        raise AssertionError("the connections did not settle")


def start(sack: bool, eager: bool) -> Run:
    """A handshake over a perfect link, every part built with the connection if eager."""
    cfg = config(sack=sack, timestamps=sack, window_scaling=True, nagle=False, mss=MSS, msl=1.0,
                 recv_buffer=8 * 1024, send_buffer=16 * 1024)
    client = Connection.connect(REMOTE_PORT, LOCAL_PORT, CLIENT_ISS, cfg, T0)
    if eager:
        build_everything(client)
    [syn] = client.segments_to_send(T0)
    server = Connection.accept(LOCAL_PORT, REMOTE_PORT, syn, SERVER_ISS, cfg, T0)
    if eager:
        build_everything(server)
    else:
        assert built(client) == built(server) == {"scoreboard": False, "rack": False}
    run = Run(client, server, T0)
    run.wire.append(("c2s", syn))
    run.collect()
    run.carry("s2c", [])
    run.carry("c2s", [])
    run.note(-1)
    assert client.state is State.ESTABLISHED and server.state is State.ESTABLISHED
    return run


def play(script: list[dict], sack: bool, close: bool, eager: bool) -> Run:
    run = start(sack, eager)
    for i, rnd in enumerate(script):
        run.step(rnd, i)
    run.settle()
    if close and run.client.state is State.ESTABLISHED and run.server.state is State.ESTABLISHED:
        run.client.close()
        run.server.close()
        run.collect()
        run.settle()
        run.wait(10.0)  # TIME-WAIT (2 MSL = 2 s) ends
    run.trace.append((run.now, state(run.client), state(run.server)))
    return run


sides = st.sampled_from(["c", "s"])
fates = st.lists(st.sampled_from(["deliver", "drop", "hold", "dup"]), max_size=30)
rounds = st.fixed_dictionaries({
    "send": st.tuples(sides, st.integers(0, 3000)),
    "c2s": fates,
    "s2c": fates,
    "delay": st.sampled_from([0.0, 0.001, 0.01, 0.05]),  # one way: RTTs, so RACK's reordering window
    "wait": st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 1.5, 4.0]),  # RACK, PTO, delayed ACK, RTO
    "read": st.booleans(),
})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=st.lists(rounds, min_size=1, max_size=25), sack=st.booleans(), close=st.booleans())
def test_parts_built_late_change_nothing_on_the_wire(script, sack, close):
    lazy = play(script, sack, close, eager=False)
    eager = play(script, sack, close, eager=True)
    for part, step in lazy.first_built.items():
        event(f"{part} built {'midway' if step >= 0 else 'in the handshake'}")
    for counter in ("ooo_segments", "fast_retransmits", "timeouts", "loss_probes", "lost_retransmissions"):
        if getattr(lazy.client, counter) or getattr(lazy.server, counter):
            event(counter)
    assert lazy.wire == eager.wire
    assert lazy.trace == eager.trace
    assert lazy.got == eager.got and lazy.ended == eager.ended
    c, s = lazy.client, lazy.server
    # Every byte arrives in order, exactly once: what each side read is a prefix of what the
    # other sent -- all of it unless a connection gave up (a script may drop retransmissions
    # until the retries run out).
    assert bytes(lazy.got["s"]) == bytes(lazy.sent["c"])[:len(lazy.got["s"])]
    assert bytes(lazy.got["c"]) == bytes(lazy.sent["s"])[:len(lazy.got["c"])]
    if set(lazy.ended.values()) <= {"closed"}:
        assert lazy.got["s"] == lazy.sent["c"] and lazy.got["c"] == lazy.sent["s"]
    else:
        event("a connection gave up")
    if c.state is State.ESTABLISHED and s.state is State.ESTABLISHED:
        # Sequence state agrees across the quiet link (RFC 9293 §3.3.1).
        assert c.sender.snd_una == c.sender.snd_nxt == s.receiver.rcv_nxt
        assert s.sender.snd_una == s.sender.snd_nxt == c.receiver.rcv_nxt
    if not sack:
        assert built(c) == built(s) == {"scoreboard": False, "rack": False}  # never needed


# -- when each part is built ----------------------------------------------------------------

SACK_CFG = dict(sack=True, nagle=False)


def test_a_half_open_connection_builds_none_of_them():
    cfg = config(sack=True, timestamps=True, window_scaling=True)
    syn = TcpSegment(REMOTE_PORT, LOCAL_PORT, 1000, 0, Flags.SYN, 65535, options=FULL)
    c = Connection.accept(LOCAL_PORT, REMOTE_PORT, syn, SERVER_ISS, cfg, T0)
    c.segments_to_send(T0)
    assert c.state is State.SYN_RECEIVED and built(c) == {"scoreboard": False, "rack": False}


def test_a_connection_that_only_receives_in_order_builds_none_of_them():
    c = established(config(**SACK_CFG), options=TcpOptions(mss=1460, sack_permitted=True))
    c.receive(seg(c, "AP", b"in order"), T0 + 0.1)
    c.segments_to_send(T0 + 0.1)
    assert c.recv() == b"in order" and built(c) == {"scoreboard": False, "rack": False}


def test_rack_comes_with_the_first_transmission_and_the_scoreboard_with_the_first_sack_block():
    c = established(config(**SACK_CFG), options=TcpOptions(mss=1460, sack_permitted=True))
    c.send(b"x" * 3 * 1460)
    first, second, third = c.segments_to_send(T0)
    assert built(c) == {"scoreboard": False, "rack": True}
    c.receive(seg(c, "A", ack=first.seq, options=TcpOptions(sack_blocks=((second.seq, third.seq),))), T0 + 0.1)
    assert built(c) == {"scoreboard": True, "rack": True} and c.sender.recovery.scoreboard.sacked_bytes == 1460
    c.segments_to_send(T0 + 0.1)
    # The whole flight acknowledged: the scoreboard is empty, and stays built.
    c.receive(seg(c, "A", ack=c.sender.snd_nxt), T0 + 0.2)
    assert c.sender.snd_una == c.sender.snd_nxt and c.sender.recovery.scoreboard.sacked_bytes == 0


def test_without_sack_loss_and_timeouts_build_neither():
    c = established(config(nagle=False), options=PLAIN)
    c.send(b"y" * 4 * 1460)
    first, *rest = c.segments_to_send(T0)
    for _ in range(3):  # three duplicate ACKs: NewReno fast retransmit (RFC 6582)
        c.receive(seg(c, "A", ack=first.seq), T0 + 0.1)
    out = c.segments_to_send(T0 + 0.1)
    assert out[0].seq == first.seq and c.sender.recovery.in_fast_recovery
    t = c.get_timer()
    c.handle_timer(t)
    c.segments_to_send(t)
    assert c.timeouts == 1 and built(c) == {"scoreboard": False, "rack": False}
