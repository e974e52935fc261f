"""What a short TCP connection costs the demultiplexer: a micro-benchmark, not a test.

``USTACK_PURE=1 .venv/bin/python -m scripts.benchmarks.tcp_core [N] [--profile] [--structlog]``
(from the repository's root) drives N connections through ``TcpDemux`` in-process, each one
SYN -> SYN-ACK -> ACK -> a line -> its echo -> the client's FIN -> our FIN -> the last ACK
(port 7, RFC 862 echo), for a peer offering only an MSS and for one offering what Linux
offers (window scaling, SACK, timestamps), and prints

- the time per connection inside ``handle_packet`` (best of a few rounds; the client's
  side -- building and parsing its packets -- is not counted), and of the SYN alone;
- the time of ``handle_timer`` for a delayed ACK (lines to the discard port, RFC 863);
- the log records per connection, by level;
- the memory (tracemalloc) per half-open connection (SYN-RECEIVED) and per idle
  ESTABLISHED one: the whole demux's growth per connection (its tables, the service and
  the connection), and the connection alone;
- with ``--profile``, the cProfile top entries of the same sequence (handle_packet only).

The log is a stand-in that only counts records, unless ``--structlog``: then the worker's
own (``pipeline.log.setup``, JSON) writes them to /dev/null -- what rendering costs in
the worker, without honcho's side of the pipe.

Run it interpreted (``USTACK_PURE=1``); mypyc compiles the TCP core, so a compiled
build's numbers differ (the shape of what a connection builds does not).
"""

from __future__ import annotations

import collections
import cProfile
import gc
import pstats
import sys
import time
import tracemalloc

from pipeline.config import DEFAULT_MAX_TIME_WAIT, DEFAULT_SYN_QUEUE
from pipeline.wire.ipv4 import PROTO_TCP, Ipv4Header, build_ipv4, parse_ipv4
from pipeline.wire.seqnum import seq_add
from pipeline.wire.tcp import Flags, TcpOptions, TcpSegment, parse_tcp
from workers.core import Sink
from workers.tcp.config import TcpConfig
from workers.tcp.connection import Connection, State
from workers.tcp.demux import TcpDemux

US, PEER = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1])
PORT = 7
LINE = b"GET / HTTP/1.0 and some more text\n"
PEERS = {
    "mss only": TcpOptions(mss=1460),
    "linux-like": TcpOptions(mss=1460, window_scale=7, sack_permitted=True, timestamp=(1000, 0)),
}


class CountingLog:
    """A structlog stand-in that only counts records (the real one costs a process hop)."""

    def __init__(self) -> None:
        self.records: collections.Counter[tuple[str, str]] = collections.Counter()

    def bind(self, **_fields: object) -> CountingLog:
        return self

    def info(self, event: str, **_fields: object) -> None:
        self.records["info", event] += 1

    def debug(self, event: str, **_fields: object) -> None:
        self.records["debug", event] += 1

    def warning(self, event: str, **_fields: object) -> None:
        self.records["warning", event] += 1

    error = exception = warning


REAL_LOG: object = None  # --structlog: the worker's logger


def new_demux() -> tuple[TcpDemux, CountingLog]:
    log = CountingLog()
    logger = log if REAL_LOG is None else REAL_LOG
    return TcpDemux(Sink(collections.Counter(), logger), US, TcpConfig(), secret=b"s" * 32,
                    syn_queue_limit=DEFAULT_SYN_QUEUE, max_time_wait=DEFAULT_MAX_TIME_WAIT), log


def packet(seg: TcpSegment) -> bytes:
    return build_ipv4(Ipv4Header(src=PEER, dst=US, protocol=PROTO_TCP), seg.emit(PEER, US))


def segments(out: list) -> list[TcpSegment]:
    result = []
    for pkt, _offload in out:
        ip, payload = parse_ipv4(pkt)
        result.append(parse_tcp(payload, ip.src, ip.dst, verify_checksum=False))
    return result


class Client:
    """The peer's side, kept by hand: sequence numbers and the timestamp echo."""

    def __init__(self, demux: TcpDemux, sport: int, offer: TcpOptions, now: float,
                 prof: cProfile.Profile | None = None) -> None:
        self.demux, self.sport, self.offer, self.prof = demux, sport, offer, prof
        self.dport = PORT
        self.seq, self.ack, self.tsval, self.echo = 1000, 0, 1000, 0
        self.now = now
        self.spent = 0.0  # seconds inside the demux

    def send(self, flags: Flags, payload: bytes = b"", options: TcpOptions | None = None) -> list[TcpSegment]:
        if options is None:
            options = TcpOptions(timestamp=(self.tsval, self.echo)) if self.offer.timestamp else TcpOptions()
        seg = TcpSegment(self.sport, self.dport, self.seq, self.ack, flags, 65535, payload, options)
        self.seq = seq_add(self.seq, len(payload) + (1 if flags & (Flags.SYN | Flags.FIN) else 0))
        self.tsval += 1
        pkt = packet(seg)
        prof = self.prof
        if prof is not None:
            prof.enable()
        t = time.perf_counter()
        out = self.demux.handle_packet(pkt, self.now)
        self.spent += time.perf_counter() - t
        if prof is not None:
            prof.disable()
        got = segments(out)
        for s in got:
            self.ack = seq_add(s.seq, s.seg_len)
            if s.options.timestamp:
                self.echo = s.options.timestamp[0]
        return got

    def open(self) -> None:
        [synack] = self.send(Flags.SYN, options=self.offer)
        assert synack.flags == Flags.SYN | Flags.ACK
        assert self.send(Flags.ACK) == []

    def exchange_and_close(self) -> None:
        echoed = self.send(Flags.ACK | Flags.PSH, LINE)
        assert b"".join(s.payload for s in echoed) == LINE, echoed
        [fin] = self.send(Flags.ACK | Flags.FIN)  # the echo service closes when we do
        assert fin.fin
        assert self.send(Flags.ACK) == []


def short_connections(n: int, offer: TcpOptions, rounds: int = 5) -> tuple[float, CountingLog]:
    best = float("inf")
    log = CountingLog()
    for _ in range(rounds):
        demux, log = new_demux()
        spent = 0.0
        for i in range(n):
            c = Client(demux, 10000 + i, offer, 100.0 + i * 0.001)
            c.open()
            c.exchange_and_close()
            spent += c.spent
        assert not demux.connections
        best = min(best, spent)
    return best / n, log


def syn_only(n: int, offer: TcpOptions, rounds: int = 5) -> float:
    """Seconds per SYN answered (a new connection in SYN-RECEIVED), the queue never full."""
    best = float("inf")
    for _ in range(rounds):
        demux, _ = new_demux()
        demux.syn_queue_limit = n + 1
        spent = 0.0
        for i in range(n):
            c = Client(demux, 10000 + i, offer, 100.0)
            c.send(Flags.SYN, options=offer)
            spent += c.spent
        best = min(best, spent)
    return best / n


def delayed_acks(n: int, offer: TcpOptions, rounds: int = 5) -> float | None:
    """Seconds per connection in handle_timer firing a delayed ACK (lines to the discard port:
    the first one's read opens the window beyond the SYN's 64 KiB, a window update at once;
    the second one waits for its ACK).  None if that one is ACKed at once too (without window
    scaling every read opens the window by more than two segments when the buffer is larger
    than 64 KiB, and sends a window update)."""
    best = float("inf")
    for _ in range(rounds):
        demux, _ = new_demux()
        for i in range(n):
            c = Client(demux, 10000 + i, offer, 100.0)
            c.dport = 9  # discard: nothing to answer, the ACK waits for its timer
            c.open()
            c.send(Flags.ACK | Flags.PSH, LINE)
            c.send(Flags.ACK | Flags.PSH, LINE)
        deadline = demux.next_deadline()
        if deadline is None:
            return None
        t = time.perf_counter()
        out = demux.handle_timer(deadline)
        spent = time.perf_counter() - t
        assert len(out) == n, len(out)
        best = min(best, spent)
    return best / n


def idle_established(n: int, offer: TcpOptions) -> float:
    """Bytes per idle ESTABLISHED connection, the whole demux's growth (service included)."""
    demux, _ = new_demux()
    Client(demux, 9999, offer, 99.0).open()  # the first connection's one-off allocations
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    clients = []
    for i in range(n):
        c = Client(demux, 10000 + i, offer, 100.0)
        c.open()
        clients.append(c)
    del clients
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert all(c.state is State.ESTABLISHED for c in demux.connections.values())
    return (after - before) / n


def half_open(n: int, offer: TcpOptions) -> float:
    """Bytes per connection in SYN-RECEIVED (what a SYN costs until its queue is full)."""
    demux, _ = new_demux()
    demux.syn_queue_limit = n + 2
    Client(demux, 9999, offer, 99.0).send(Flags.SYN, options=offer)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        Client(demux, 10000 + i, offer, 100.0).send(Flags.SYN, options=offer)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert all(c.state is State.SYN_RECEIVED for c in demux.connections.values())
    return (after - before) / n


def connection_alone(n: int, offer: TcpOptions) -> float:
    """Bytes per ESTABLISHED Connection object, built by accept() and the final ACK."""
    cfg = TcpConfig()
    syn = TcpSegment(40000, PORT, 1000, 0, Flags.SYN, 65535, options=offer)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    conns = []
    for i in range(n):
        c = Connection.accept(PORT, 40000, syn, 5000 + i, cfg, 100.0)
        c.segments_to_send(100.0)
        ts = TcpOptions(timestamp=(1001, 100000)) if offer.timestamp else TcpOptions()  # echoes our TSval
        c.receive(TcpSegment(40000, PORT, 1001, seq_add(5000 + i, 1), Flags.ACK, 65535, options=ts), 100.0)
        c.segments_to_send(100.0)
        while c.next_event() is not None:
            pass
        conns.append(c)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert all(c.state is State.ESTABLISHED for c in conns)
    return (after - before) / n


def profile(n: int, offer: TcpOptions, top: int = 25) -> None:
    """cProfile of handle_packet alone (the client's side is not profiled)."""
    demux, _ = new_demux()
    prof = cProfile.Profile()
    for i in range(n):
        c = Client(demux, 10000 + i, offer, 100.0 + i * 0.001, prof)
        c.open()
        c.exchange_and_close()
    stats = pstats.Stats(prof, stream=sys.__stdout__)
    stats.sort_stats("tottime").print_stats(top)


def say(line: str) -> None:
    print(line, file=sys.__stdout__, flush=True)


def main(argv: list[str]) -> None:
    global REAL_LOG
    n = int(next((a for a in argv if a.isdigit()), "2000"))
    from pipeline import compiled
    say(f"build: {compiled.MODE} ({compiled.REASON}); {n} connections"
          + ("; the worker's structlog to /dev/null" if "--structlog" in argv else "; log records counted only"))
    if "--structlog" in argv:
        import os

        from pipeline import log as pipeline_log
        sys.stdout.flush()
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the records go nowhere; results to __stdout__)
        REAL_LOG = pipeline_log.setup("tcp.1", buffered=True)
    for name, offer in PEERS.items():
        if "--profile" in argv:
            say(f"== profile, peer offering {name}")
            profile(n, offer)
            continue
        per_conn, log = short_connections(n, offer)
        records = {key: count / n for key, count in log.records.items()}
        say(f"== peer offering {name}")
        say(f"  open + line + close: {per_conn * 1e6:7.1f} us per connection inside handle_packet")
        say(f"  SYN -> SYN-ACK alone: {syn_only(n, offer) * 1e6:7.1f} us per SYN")
        fired = delayed_acks(n, offer)
        say("  delayed ACK fired by handle_timer: "
            + ("none (ACKed at once)" if fired is None else f"{fired * 1e6:7.1f} us per connection"))
        if REAL_LOG is None:
            say("  log records per connection: "
                  + ", ".join(f"{lvl} {ev} {c:g}" for (lvl, ev), c in sorted(records.items())))
        say(f"  half-open (SYN-RECEIVED), whole demux: {half_open(n, offer):7.0f} bytes per connection")
        say(f"  idle ESTABLISHED, whole demux: {idle_established(n, offer):7.0f} bytes per connection")
        say(f"  idle ESTABLISHED, Connection alone: {connection_alone(n, offer):7.0f} bytes per connection")


if __name__ == "__main__":
    main(sys.argv[1:])
