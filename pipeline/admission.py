"""Overload control in ingress: which TCP SYNs reach a worker (pure: no sockets, no clock).

Contract: ingress calls ``admit(segment, now)`` once per TCP segment routing
sends to a worker, with the checked view routing hands on with its route
(``pipeline.routing.Segment``: source address, flow key, TCP view; nothing
here parses the packet again), and forwards the segment only if it returns
True. Packets that carry no TCP segment (other protocols, ICMP errors about
TCP flows, which their flow's owner needs) are not asked about. Everything
that is not a SYN opening a connection is admitted at once: packets of
established flows go first, and the cost of deciding is a flags test. SYNs
are what a flood sends and what makes a worker spend (a SYN-ACK, maybe
state), so they are admitted at the rate the TCP workers can answer (RFC
4987 §3.2-3.3 on why a flood must not consume per-SYN resources):

1. a token bucket for any SYN, whose rate follows what the TCP workers
   take in: ingress tells ``forwarded`` how many packets it sent each
   worker and ``worker_report`` what the worker's heartbeat says it took
   in; the difference is the worker's backlog. Above ``BACKLOG_HIGH``
   packets the rate halves, below ``BACKLOG_LOW`` it grows by
   ``SYN_RATE_STEP`` (AIMD, once per heartbeat), between ``SYN_RATE_MIN``
   and ``syn_rate``. So a flood cannot build a standing queue in a worker
   that delays everyone's packets;
2. when it is empty, a SYN that repeats one seen ``RETRY_MIN_GAP`` to
   ``RETRY_MAX_AGE`` seconds ago (same flow key and ISN) is a
   retransmission (RFC 6298 §5, RFC 9293 §3.8.1): real clients retransmit,
   spoofed random-source floods do not. These draw on their own bucket
   (``retry_rate``), so replaying SYNs buys an attacker little;
3. a source that holds an established flow here is real (a spoofer does
   not see our SYN-ACK, so it cannot complete a handshake): its SYNs draw
   on a bucket of its own (``source_rate``) when the shared one is empty,
   so one real client cannot take it all and a flood cannot lock it out.

Every SYN shed is counted by reason through ``drop`` (``shed_syn_rate``,
``shed_retry_rate``, ``shed_source_rate``: the process adds ``drop_``).
Memory is fixed whatever arrives: the table of recent SYNs is a
direct-mapped array of ``RECENT_SLOTS`` fingerprints (a newer SYN may evict
an older one: the cost is only a missed preference), the table of real
sources holds at most ``REAL_SOURCES`` entries (oldest out first).

Workers bound their own queues: the bus sockets have a high-water mark
(``pipeline.bus.endpoints.HWM`` messages) and ingress sends without
blocking, counting ``drop_worker_full`` when a worker is behind.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable

from pipeline.ratelimit import TokenBucket
from pipeline.routing import Segment

SYN_RATE = 2000.0    # SYNs/s at most into the TCP workers (the rate starts here and adapts below it)
SYN_RATE_MIN = 200.0
SYN_RATE_STEP = 250.0  # added per heartbeat while the workers keep up
SYN_BURST = 200
BACKLOG_HIGH = 512   # packets sent to a TCP worker and not yet taken in: it is falling behind
BACKLOG_LOW = 128
RETRY_RATE = 1000.0  # retransmitted SYNs/s when the shared bucket is empty
RETRY_BURST = 100
SOURCE_RATE = 500.0  # SYNs/s from one real source when the shared bucket is empty
SOURCE_BURST = 64
RETRY_MIN_GAP = 0.5  # s; Linux retransmits a SYN after 1 s, then 3, 7, ... (RFC 6298 §2.1: 1 s)
RETRY_MAX_AGE = 32.0  # s; past this a repeat is treated as new
RECENT_SLOTS = 1 << 17  # recent SYN fingerprints kept (2 MB with their times)
REAL_SOURCES = 4096


class Admission:
    def __init__(self, is_known: Callable[[bytes], bool], drop: Callable[..., None], counters: Counter[str],
                 syn_rate: float = SYN_RATE, syn_burst: int = SYN_BURST,
                 retry_rate: float = RETRY_RATE, retry_burst: int = RETRY_BURST,
                 source_rate: float = SOURCE_RATE, source_burst: int = SOURCE_BURST) -> None:
        self.is_known = is_known  # Flow.key -> does a worker hold this flow
        self.drop = drop
        self.syns = TokenBucket(syn_rate, syn_burst)
        self.syn_rate_max = syn_rate
        self._sent: dict[str, int] = {}  # TCP worker -> packets ingress sent it
        self._offset: dict[str, int] = {}  # worker -> sent - taken at its first report (a baseline)
        self._taken: dict[str, int] = {}  # worker -> packets_in of its last report
        self.backlogs: dict[str, int] = {}
        self.retries = TokenBucket(retry_rate, retry_burst)
        self.source_rate = source_rate
        self.source_burst = source_burst
        # Recent SYNs: slot = fingerprint & mask; the fingerprint and when it was seen.
        self._recent = array("q", bytes(8 * RECENT_SLOTS))
        self._recent_at = array("d", bytes(8 * RECENT_SLOTS))
        self._mask = RECENT_SLOTS - 1
        self.real: dict[bytes, TokenBucket] = {}  # source address -> its SYN bucket (insertion order)
        self._last_real = b""
        self.counters = counters  # admitted SYNs by way: syn_admitted, syn_admitted_retry, syn_admitted_source
        self.syns_seen = 0  # opening SYNs offered, admitted or not (pipeline.synfilter reads it)

    def admit(self, segment: Segment, now: float) -> bool:
        """Forward this TCP segment (routing checked it)? Sheds only SYNs, counting why."""
        if not segment.tcp.starts_connection:
            self._learn(segment)
            return True
        self.syns_seen += 1
        if self.syns.take(now):
            self._remember(segment, now)
            self.counters["syn_admitted"] += 1
            return True
        # Overloaded: only retransmissions and real sources get in.
        if self._remember(segment, now):
            if self.retries.take(now):
                self.counters["syn_admitted_retry"] += 1
                return True
            self.drop("shed_retry_rate")
            return False
        bucket = self.real.get(segment.src)
        if bucket is None:
            self.drop("shed_syn_rate")
            return False
        if bucket.take(now):
            self.counters["syn_admitted_source"] += 1
            return True
        self.drop("shed_source_rate")
        return False

    def forwarded(self, worker: str, packets: int) -> None:
        """Ingress sent this many packets to a worker."""
        self._sent[worker] = self._sent.get(worker, 0) + packets

    def worker_report(self, worker: str, taken: int, now: float) -> None:
        """A TCP worker's heartbeat: it has taken in ``taken`` packets so far. Adapts the SYN rate."""
        sent = self._sent.get(worker, 0)
        if worker not in self._taken or taken < self._taken[worker]:
            self._offset[worker] = sent - taken  # first report, or a new process under the name
        self._taken[worker] = taken
        backlog = max(0, sent - taken - self._offset[worker])
        self.backlogs[worker] = backlog
        worst = max(self.backlogs.values())
        syns = self.syns
        if worst > BACKLOG_HIGH:
            syns.rate = max(SYN_RATE_MIN, syns.rate / 2)
        elif worst < BACKLOG_LOW:
            syns.rate = min(self.syn_rate_max, syns.rate + SYN_RATE_STEP)
        self.counters["syn_rate"] = int(syns.rate)  # shown by stackctl status

    def fingerprint(self, segment: Segment) -> int:
        """A SYN's mark in the recent-SYN table (its slot: the low bits): its flow key and ISN."""
        # hash() is salted per process (PYTHONHASHSEED): outsiders cannot aim at a slot.
        return hash((segment.key, segment.tcp.seq))

    def slot(self, segment: Segment) -> int:
        """Where a SYN goes in the recent-SYN table."""
        return self.fingerprint(segment) & self._mask

    def _remember(self, segment: Segment, now: float) -> bool:
        """Record this SYN; True if it repeats one seen a moment ago (a retransmission)."""
        mark = self.fingerprint(segment)
        slot = mark & self._mask
        age = now - self._recent_at[slot]
        if self._recent[slot] != mark or age > RETRY_MAX_AGE:
            self._recent[slot] = mark  # new, or evicting another SYN: the newest is kept
            self._recent_at[slot] = now
            return False
        return age >= RETRY_MIN_GAP  # the first sighting's time is kept across retransmissions

    def _learn(self, segment: Segment) -> None:
        """A packet of a flow a worker holds proves its source real (it completed a handshake)."""
        src = segment.src
        if src == self._last_real:
            return  # the common case, a run of one flow's packets: one comparison
        if src not in self.real:
            if not self.is_known(segment.key):  # the stack's own flow, or a relayed one (its key ends with it)
                return
            if len(self.real) >= REAL_SOURCES:
                del self.real[next(iter(self.real))]
            self.real[src] = TokenBucket(self.source_rate, self.source_burst)
        self._last_real = src
