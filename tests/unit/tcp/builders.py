"""Test helpers for the TCP connection: builders that put a Connection straight into a
state (smoltcp ``socket_established()`` style), a terse segment constructor for the
remote end, and a two-connection pump with a hand-driven clock.

The builders reach each state through the public interface only (segments, time and
application calls); ``test_conn_builders.py`` checks each one against the state
reached through a full handshake, so tests may trust them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pipeline.wire.seqnum import seq_add
from pipeline.wire.tcp import NO_OPTIONS, Flags, TcpOptions, TcpSegment
from workers.tcp.config import TcpConfig
from workers.tcp.connection import Connection
from workers.tcp.options import Negotiated
from workers.tcp.events import Event

LOCAL_PORT = 80
REMOTE_PORT = 40000
T0 = 1000.0
# ISNs just below 2**32 on both sides: every test crosses the wrap.
LOCAL_ISS = 2**32 - 3
REMOTE_ISS = 2**32 - 1000

PLAIN = TcpOptions(mss=1460)  # a peer SYN with only an MSS option
FULL = TcpOptions(mss=1460, window_scale=7, sack_permitted=True, timestamp=(5000, 0))

_FLAG_LETTERS = {"S": Flags.SYN, "A": Flags.ACK, "F": Flags.FIN, "R": Flags.RST, "P": Flags.PSH}


def config(**changes: object) -> TcpConfig:
    """TcpConfig with test-friendly defaults, overridden by changes."""
    base: dict[str, object] = {"window_scaling": False, "timestamps": False, "sack": False, "ecn": False}
    base.update(changes)
    return TcpConfig(**base)  # type: ignore[arg-type]


def flags(text: str) -> Flags:
    f = Flags(0)
    for ch in text:
        f |= _FLAG_LETTERS[ch]
    return f


def seg(conn: Connection, fl: str = "A", payload: bytes = b"", *, seq: int | None = None, ack: int | None = None,
        window: int = 65535, options: TcpOptions = NO_OPTIONS) -> TcpSegment:
    """A segment from the remote end; seq defaults to conn.receiver.rcv_nxt, ack to conn.sender.snd_nxt."""
    s = conn.receiver.rcv_nxt if seq is None else seq
    a = conn.sender.snd_nxt if ack is None else ack
    return TcpSegment(conn.remote_port, conn.local_port, s, a, flags(fl), window, payload, options)


def syn(options: TcpOptions = PLAIN, iss: int = REMOTE_ISS, window: int = 65535) -> TcpSegment:
    return TcpSegment(REMOTE_PORT, LOCAL_PORT, iss, 0, Flags.SYN, window, options=options)


def elicit_ack(conn: Connection, now: float = T0) -> None:
    """The remote end repeats an old octet: RFC 9293 §3.10.7.4 first makes us ACK it."""
    conn.receive(seg(conn, "A", b"\0", seq=seq_add(conn.receiver.rcv_nxt, -1), options=_peer_options(conn)), now)


def drain(conn: Connection) -> list[Event]:
    out = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


def fire(conn: Connection) -> float:
    """Advance to the next deadline and fire it; return the new now."""
    t = conn.get_timer()
    assert t is not None, "no timer armed"
    conn.handle_timer(t)
    return t


# -- builders ---------------------------------------------------------------------------

def syn_received(cfg: TcpConfig | None = None, options: TcpOptions = PLAIN, now: float = T0) -> Connection:
    """Passive open: the real path is one call, so the builder is that call (SYN-ACK drained)."""
    c = Connection.accept(LOCAL_PORT, REMOTE_PORT, syn(options), LOCAL_ISS, cfg or config(), now)
    c.segments_to_send(now)
    drain(c)
    return c


def _peer_options(c: Connection) -> TcpOptions:
    """The timestamp option the remote end puts on its segments (if negotiated).

    TSval stays at TS.Recent; TSecr echoes nothing of ours, so no segment of a
    builder yields an RTT sample from it.
    """
    return TcpOptions(timestamp=(c.receiver.ts_recent, 1)) if c.options.timestamps else NO_OPTIONS


def _exchange(c: Connection, segment: TcpSegment, now: float) -> Connection:
    """The remote end sends segment; our answers are drained."""
    c.receive(segment, now)
    c.segments_to_send(now)
    drain(c)
    return c


def established(cfg: TcpConfig | None = None, options: TcpOptions = PLAIN, now: float = T0,
                peer_window: int = 65535) -> Connection:
    """ESTABLISHED after a passive open, nothing sent or received yet.

    Reached through the SYN-cookie path: the handshake's final ACK creates the
    connection, with the options of the peer's SYN.  A full handshake would time
    the SYN-ACK and leave an RTT sample; tests of RTO and loss probes start from
    RFC 6298 §2.1's initial RTO with no sample, and this is the public way to it.
    """
    cfg = cfg or config()
    agreed = Negotiated.from_syn(options, cfg)
    ts = (options.timestamp[0], 1) if agreed.timestamps and options.timestamp is not None else None
    ack = TcpSegment(REMOTE_PORT, LOCAL_PORT, seq_add(REMOTE_ISS, 1), seq_add(LOCAL_ISS, 1), Flags.ACK, peer_window,
                     options=TcpOptions(timestamp=ts))
    c = Connection.from_cookie(LOCAL_PORT, REMOTE_PORT, ack, LOCAL_ISS, agreed, cfg, now)
    c.segments_to_send(now)
    drain(c)
    return c


def fin_wait_1(cfg: TcpConfig | None = None, now: float = T0, **kw: object) -> Connection:
    """ESTABLISHED, then shutdown() (the half-close without a FIN-WAIT-2 timeout):
    our FIN sent, not yet acknowledged."""
    c = established(cfg, now=now, **kw)  # type: ignore[arg-type]
    c.shutdown()
    c.segments_to_send(now)
    return c


def fin_wait_2(cfg: TcpConfig | None = None, now: float = T0, **kw: object) -> Connection:
    """Our FIN acknowledged (the FIN was timed: this ACK is an RTT sample)."""
    c = fin_wait_1(cfg, now, **kw)
    return _exchange(c, seg(c, "A", options=_peer_options(c)), now)


def close_wait(cfg: TcpConfig | None = None, now: float = T0, **kw: object) -> Connection:
    """ESTABLISHED, then the peer's FIN arrived (and was acknowledged)."""
    c = established(cfg, now=now, **kw)  # type: ignore[arg-type]
    return _exchange(c, seg(c, "AF", options=_peer_options(c)), now)


def last_ack(cfg: TcpConfig | None = None, now: float = T0, **kw: object) -> Connection:
    c = close_wait(cfg, now, **kw)
    c.close()
    c.segments_to_send(now)
    return c


def closing(cfg: TcpConfig | None = None, now: float = T0, **kw: object) -> Connection:
    """Simultaneous close: our FIN sent and unacknowledged, the peer's FIN received."""
    c = fin_wait_1(cfg, now, **kw)
    return _exchange(c, seg(c, "AF", ack=c.sender.snd_una, options=_peer_options(c)), now)


def time_wait(cfg: TcpConfig | None = None, now: float = T0, **kw: object) -> Connection:
    c = fin_wait_2(cfg, now, **kw)
    return _exchange(c, seg(c, "AF", options=_peer_options(c)), now)


def snapshot(c: Connection) -> dict[str, object]:
    """The fields a builder must get right."""
    return {
        "state": c.state, "snd_una": c.sender.snd_una, "snd_nxt": c.sender.snd_nxt, "snd_wnd": c.sender.snd_wnd,
        "snd_wl1": c.sender.snd_wl1, "snd_wl2": c.sender.snd_wl2, "rcv_nxt": c.receiver.rcv_nxt, "rcv_adv": c.receiver.rcv_adv,
        "snd_wscale": c.options.snd_wscale, "rcv_wscale": c.options.rcv_wscale, "ws_ok": c.options.ws_ok, "sack_ok": c.options.sack,
        "ts_ok": c.options.timestamps, "send_mss": c.sender.send_mss, "peer_mss": c.options.peer_mss, "fin_queued": c.sender.fin_queued,
        "peer_fin": c.peer_fin, "timers": sorted(t.name for t in c.timers.armed()), "readable": c.readable,
        "send_space": c.send_space,
    }


# -- two real connections ---------------------------------------------------------------

Filter = Callable[[TcpSegment], bool]


class Pair:
    """A client and a server Connection wired back to back, delivering instantly."""

    def __init__(self, ccfg: TcpConfig | None = None, scfg: TcpConfig | None = None,
                 client_iss: int = 2**32 - 7, server_iss: int = LOCAL_ISS, now: float = T0) -> None:
        self.now = now
        self.client = Connection.connect(REMOTE_PORT, LOCAL_PORT, client_iss, ccfg or config(), now)
        first = self.client.segments_to_send(now)
        self.server = Connection.accept(LOCAL_PORT, REMOTE_PORT, first[0], server_iss, scfg or config(), now)
        self.log: list[tuple[str, TcpSegment]] = [("c", first[0])]

    def pump(self, drop: Filter | None = None, rounds: int = 1000) -> None:
        """Exchange segments until both sides are quiet (no timers fired)."""
        for _ in range(rounds):
            moved = False
            for name, src, dst in (("c", self.client, self.server), ("s", self.server, self.client)):
                for s in src.segments_to_send(self.now):
                    moved = True
                    self.log.append((name, s))
                    if drop is None or not drop(s):
                        dst.receive(s, self.now)
            if not moved:
                return
        raise AssertionError("pump did not settle")

    def advance(self, dt: float, drop: Filter | None = None) -> None:
        """Move the clock by dt, firing timers on the way."""
        end = self.now + dt
        while True:
            ts = [t for t in (self.client.get_timer(), self.server.get_timer()) if t is not None and t <= end]
            if not ts:
                break
            self.now = max(self.now, min(ts))
            for c in (self.client, self.server):
                t = c.get_timer()
                if t is not None and t <= self.now:
                    c.handle_timer(self.now)
            self.pump(drop)
        self.now = end
        self.pump(drop)

    def sent(self, who: str) -> list[TcpSegment]:
        return [s for n, s in self.log if n == who]


def payloads(segs: Iterable[TcpSegment]) -> bytes:
    return b"".join(s.payload for s in segs)
