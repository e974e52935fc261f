"""The latency budget: how long each stage of the pipeline holds a packet (``stackctl latency``).

Contract. While someone measures (``stackctl latency`` arms ingress for
``ARMED_FOR`` seconds, and nothing is stamped otherwise: free when nobody
asks), ingress stamps each PACKETS message it sends with the time it read
the burst and the time it sent it. The worker that takes it samples the
first two stages at once (:func:`arrival`: a relayed request may cause no
packet back for a while) and stamps what it sends to egress with the
input's stamps, when it took them and when it sent; egress samples the
rest when it has written that (:func:`departure`). A relaying worker adds
the ``upstream`` stage (a request sent on a real socket to its first
answer). Egress and the workers send their samples to ingress, which keeps
the last ``KEEP`` of each stage (:class:`Budget`). Output a worker makes by
itself (a timer, an upstream answer) starts its stamps at the worker.

Stamps are ``time.monotonic()`` of processes on one host (CLOCK_MONOTONIC
is one clock for the whole machine); workers on other hosts have clocks of
their own, and their hops mean nothing. Samples are whole microseconds.
"""

from __future__ import annotations

from collections import deque

# In the order a packet meets them; "total" is read to written, "upstream" a relayed request's wait.
STAGES = ("ingress", "to_worker", "worker", "to_egress", "egress", "total", "upstream")
KEEP = 4096  # samples per stage: percentiles over the recent past, memory bounded
ARMED_FOR = 30.0  # seconds ingress stamps after each stackctl latency request
MAX_STAMPS = 4  # ingress read, ingress sent, worker took, worker sent

Samples = dict[str, list[int]]


def _us(seconds: float) -> int:
    return max(0, round(seconds * 1_000_000))  # never negative: clocks of one host, rounding aside


def arrival(stamps: list[float | None], took: float) -> Samples:
    """A worker's samples for a message from ingress stamped [read, sent], taken at ``took``."""
    read, sent = (list(stamps) + [None, None])[:2]
    if read is None or sent is None:
        return {}
    return {"ingress": [_us(sent - read)], "to_worker": [_us(took - sent)]}


def departure(stamps: list[float | None], received: float, written: float) -> Samples:
    """Egress's samples for one stamped message: ``stamps`` as the worker sent them
    ([read, ingress sent, worker took, worker sent], the first two None for output the
    worker made itself), ``received`` and ``written`` egress's own times."""
    read, _, took, out = (list(stamps) + [None] * MAX_STAMPS)[:MAX_STAMPS]
    found: Samples = {}
    if read is not None:
        found["total"] = [_us(written - read)]
    if took is not None and out is not None:
        found["worker"] = [_us(out - took)]
    if out is not None:
        found["to_egress"] = [_us(received - out)]
    found["egress"] = [_us(written - received)]
    return found


def merge(into: Samples, more: Samples) -> None:
    for stage, values in more.items():
        into.setdefault(stage, []).extend(values)


def _percentile(ordered: list[int], fraction: float) -> int:
    """Nearest rank: the smallest sample with at least ``fraction`` of them at or below it."""
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


class Budget:
    """The last KEEP samples of each stage, as ingress gathers them from egress and the workers."""

    def __init__(self, keep: int = KEEP) -> None:
        self.samples: dict[str, deque[int]] = {stage: deque(maxlen=keep) for stage in STAGES}
        self.counts = dict.fromkeys(STAGES, 0)

    def add(self, samples: Samples) -> None:
        for stage, values in samples.items():
            kept = self.samples.get(stage)
            if kept is not None:  # a stage this version does not know: ignored
                kept.extend(values)
                self.counts[stage] += len(values)

    def clear(self) -> None:
        for stage in STAGES:
            self.samples[stage].clear()
            self.counts[stage] = 0

    def summary(self) -> dict[str, dict[str, int]]:
        """{stage: {p50_us, p99_us, count}} for every stage that has samples, in pipeline order."""
        out = {}
        for stage in STAGES:
            kept = sorted(self.samples[stage])
            if kept:
                out[stage] = {"p50_us": _percentile(kept, 0.5), "p99_us": _percentile(kept, 0.99),
                              "count": self.counts[stage]}
        return out
