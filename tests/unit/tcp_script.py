"""Scripted TCP exchanges, run by tests/unit/test_compiled.py in a process of each build.

``python -m tests.unit.tcp_script N`` drives N seeded scenarios and prints, as
JSON, which build ran and for each scenario what went over the wire: a client
``Connection`` and the ``TcpDemux`` (with its services) exchange segments over
a link that loses packets, from a SYN through data both ways, loss and repair
to the close.  Every choice comes from the seed, so two processes agree
exactly when the code behaves the same; the client's ISN is anywhere in the
sequence space, often just below the wrap.  A process of its own per build
keeps the compiled and the interpreted classes apart (the services and the
shell are not compiled and hold the classes they imported).
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
import sys

import structlog

from pipeline import compiled
from pipeline.config import DEFAULT_MAX_TIME_WAIT, DEFAULT_SYN_QUEUE
from pipeline.wire.ipv4 import PROTO_TCP, Ipv4Header, build_ipv4, parse_ipv4
from pipeline.wire.tcp import parse_tcp
from workers.core import Sink
from workers.tcp.config import TcpConfig
from workers.tcp.connection import Connection, State
from workers.tcp.demux import TcpDemux

PEER, US = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
PORTS = (7, 7, 8000, 19, 17, 9, 4444)  # echo, line reverser, chargen, quote, discard, closed


def scenario(seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    isn = rng.choice([rng.randrange(2**32), 2**32 - rng.randrange(1, 3000)])
    return {"isn": isn, "port": rng.choice(PORTS), "size": rng.choice([1, 700, 5000, 40000]),
            "loss": rng.choice([0.0, 0.03, 0.1, 0.25]), "sack": rng.random() < 0.7,
            "cc": rng.choice(["newreno", "cubic"]), "seed": seed}


def run(s: dict) -> dict[str, object]:
    rng = random.Random(s["seed"])
    cfg = TcpConfig(mss=1000, sack=s["sack"], timestamps=s["sack"], congestion=s["cc"], max_retries=5, msl=1.0)
    demux = TcpDemux(Sink(collections.Counter(), structlog.get_logger()), US, cfg, secret=b"s" * 32,
                     syn_queue_limit=DEFAULT_SYN_QUEUE, max_time_wait=DEFAULT_MAX_TIME_WAIT)
    now = 1000.0
    client = Connection.connect(40000, s["port"], s["isn"], cfg, now)
    data = random.Random(s["seed"] + 1).randbytes(s["size"]) if s["port"] != 8000 else b"line\n" * (s["size"] // 5 + 1)
    sent = 0
    wire = hashlib.sha256()
    packets = 0
    got = bytearray()

    def to_client(out: list) -> None:
        nonlocal packets
        for packet, _offload in out:
            wire.update(b"s" + bytes(packet))
            packets += 1
            if rng.random() >= s["loss"]:
                ip, payload = parse_ipv4(packet)
                client.receive(parse_tcp(payload, ip.src, ip.dst), now)

    for _ in range(3000):
        app = client.state is State.ESTABLISHED or client.state is State.CLOSE_WAIT
        if app and sent < len(data) and client.send_space:
            sent += client.send(data[sent:sent + 10000])
        if app and sent >= len(data) and not client.sender.fin_queued and (s["port"] != 19 or len(got) > 30000):
            client.close()
        while segs := client.segments_to_send(now):
            for seg in segs:
                raw = seg.emit(PEER, US)
                wire.update(b"c" + raw)
                packets += 1
                if rng.random() >= s["loss"]:
                    packet = build_ipv4(Ipv4Header(src=PEER, dst=US, protocol=PROTO_TCP), raw)
                    to_client(demux.handle_packet(packet, now))
        got += client.recv()
        deadlines = [t for t in (client.get_timer(), demux.next_deadline()) if t is not None]
        if not deadlines:
            if client.state in (State.ESTABLISHED, State.CLOSE_WAIT) and not client.sender.fin_queued:
                continue  # the application still has something to do
            break
        now = max(now, min(deadlines))
        client.handle_timer(now)
        to_client(demux.handle_timer(now))
    counters = {name: getattr(client, name) for name in (
        "segments_in", "segments_out", "retransmissions", "timeouts", "fast_retransmits", "loss_probes",
        "bytes_acked", "bytes_received", "invalid_segments")}
    return {"wire": wire.hexdigest(), "packets": packets, "got": hashlib.sha256(got).hexdigest(), "got_len": len(got),
            "state": client.state.value, "client": counters, "demux": dict(demux.sink.counters),
            "stats": demux.stats(), "end": now}


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    n = int(sys.argv[1])
    print(json.dumps({"mode": compiled.MODE, "runs": [run(scenario(seed)) for seed in range(n)]}))


if __name__ == "__main__":
    main()
