"""UDP echoes per second (port 7, RFC 862): the stack against the minimal responder, 1 and 64 in flight."""

from __future__ import annotations

import socket
import struct
import time

from tests.integration.netns import STACK_ADDR, Namespace

from .common import MINIMAL_ADDR, BenchError, family, median, say
from .run import Run


def udp_echo_rate(ns: Namespace, addr: str, inflight: int, seconds: float) -> dict:
    """Echoes per second to UDP port 7 keeping `inflight` requests outstanding.

    Each reply sends the next request. If nothing comes back for 50 ms the
    outstanding requests count as lost and the window is refilled. The socket
    is blocking with SO_RCVTIMEO, so each echo costs the client two system
    calls (Python's own timeouts would add a poll() per receive).
    """
    sock = ns.socket(family(addr), socket.SOCK_DGRAM)
    with sock:
        sock.connect((addr, 7))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 0, 50_000))
        payload, buf = bytes(64), bytearray(2048)
        send, recv_into, clock = sock.send, sock.recv_into, time.perf_counter
        got = refills = 0
        start = clock()
        end = start + seconds
        for _ in range(inflight):
            send(payload)
        while True:
            try:
                recv_into(buf)
            except BlockingIOError:  # SO_RCVTIMEO expired
                refills += 1
                if clock() >= end:
                    break
                for _ in range(inflight):
                    send(payload)
                continue
            got += 1
            if clock() >= end:
                break
            send(payload)
        elapsed = clock() - start
    if got == 0:
        raise BenchError(f"udp echo {addr}: no reply")
    return {"rate": got / elapsed, "replies": got, "stalls": refills}


def measure_udp(run: Run) -> None:
    """Echoes per second with 1 and 64 in flight, alternating the targets in each repetition."""
    targets = {"ustack": (run.stack_ns, STACK_ADDR), "minimal_responder": (run.min_ns, MINIMAL_ADDR)}
    for ns, addr in targets.values():
        udp_echo_rate(ns, addr, 8, 0.2)  # warm up
    for inflight in (1, 64):
        reps: dict[str, list[dict]] = {k: [] for k in targets}
        for _ in range(run.s.repetitions):
            for who, (ns, addr) in targets.items():
                reps[who].append(udp_echo_rate(ns, addr, inflight, run.s.udp_seconds))
        for who, r in reps.items():
            run.raw[f"udp{inflight}_{who}"] = {"rate": median([x["rate"] for x in r]), "repetitions": r}
            say(f"  udp echo, {inflight} in flight, {who}: {run.raw[f'udp{inflight}_{who}']['rate']:.0f}/s")
