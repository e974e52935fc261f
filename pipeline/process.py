"""What every pipeline process shares: signals, logging set-up and counters."""

from __future__ import annotations

import atexit
import collections
import ctypes
import signal
import sys
import time

from pipeline import compiled, config, log, telemetry
from pipeline.bus import endpoints


PARK_MAX = 15.0  # seconds a process idles after an ordered stop before it exits by itself


# glibc's mallopt parameters (malloc.h) and the values every process runs with.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
HEAP_TOP_KEPT = 64 << 20   # free heap top that free() leaves in place (glibc: 128 KiB)
MMAP_THRESHOLD = 4 << 20   # blocks this big or bigger are mapped on their own (glibc: 128 KiB, rising)
HEAP_TRIM_INTERVAL = 1.0   # seconds between returns of free heap pages to the kernel


def _libc():  # type: ignore[no-untyped-def]
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # glibc; not musl
    except OSError:
        return None


_LIBC = _libc()


def tune_malloc() -> None:
    """Keep freed heap memory for reuse between trims, instead of faulting it in again.

    With glibc's defaults, a packet path that allocates and frees 64 KiB
    buffers (TSO segments) keeps growing and shrinking the heap top: every
    free that leaves more than 128 KiB at the top gives it back (brk), and the
    next allocation faults the pages in again, zeroed. Page faults were a fifth
    of the TCP worker's and a quarter of egress's time out of chargen, and
    these two settings raised bulk out of chargen by ~40 % in one run of
    ``scripts/bench --only bulk``. Memory still goes back once a second
    (:meth:`Process.trim_heap`), so an idle process stays small.
    """
    if _LIBC is not None:
        _LIBC.mallopt(_M_TRIM_THRESHOLD, HEAP_TOP_KEPT)
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_free_memory() -> None:
    """Give the kernel back the heap pages glibc holds free (``malloc_trim``).

    After bulk connections close, their buffers stay in the heap (freed, but
    resident). Returning them once a second costs well under a millisecond."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class Stopper:
    """Turns SIGTERM (honcho's stop) and SIGINT (Ctrl-C) into a flag the loop polls."""

    def __init__(self) -> None:
        self.stopping = False
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True


class Process:
    """Configuration, logger, stop flag and drop/traffic counters of one process."""

    def __init__(self, role: str) -> None:
        # All of it, once: a bad value stops this process with EX_CONFIG, which is not restarted.
        who = config.env_str("HONCHO_PROCESS_NAME", "") or role
        config.check_or_exit(who)
        self.config = config.load()
        config.check_or_exit(who, endpoints.missing_keys(self.config, role))
        self.name = self.config.proc_name or role
        self.role = role
        # Buffered: the process's loop calls flush_logs() once per wake-up.
        self.log: log.Logger = log.setup(self.name, buffered=True)
        self.debug = log.debug_enabled()
        self.log_payload = self.debug and log.payload_wanted()
        self.stopper = Stopper()
        tune_malloc()
        self._next_trim = 0.0
        self.counters: collections.Counter[str] = collections.Counter()
        compiled.decide()  # normally done already, by the first hot module imported
        self.log.info("build", mode=compiled.MODE, why=compiled.REASON)  # compiled (mypyc) or pure
        # Log records, packet copies and connection tables for stackctl, while it asks.
        self.telemetry = telemetry.Publisher(self.config, self.name, role, self.counters)
        log.attach(self.telemetry)
        atexit.register(self.telemetry.close)

    def park(self, most: float = PARK_MAX) -> None:
        """Done after an ordered stop: idle (keeping sockets open) until SIGTERM, at most ``most`` s.

        Exiting at once would make honcho stop the stack before the later stages finished."""
        deadline = time.monotonic() + most
        while not self.stopper.stopping and time.monotonic() < deadline:
            self.flush_logs()
            time.sleep(0.05)

    def trim_heap(self, now: float) -> None:
        """Once per wake-up: at most every HEAP_TRIM_INTERVAL, return free heap pages to the kernel."""
        if now >= self._next_trim:
            self._next_trim = now + HEAP_TRIM_INTERVAL
            release_free_memory()

    def flush_logs(self) -> None:
        """Once per wake-up of the process's loop: write buffered records, take telemetry requests."""
        self.telemetry.service()
        log.flush()

    def payload(self, data: bytes) -> dict[str, str]:
        """Log fields for a packet's payload: none unless LOG_PAYLOAD=1 asked for them."""
        return {"payload": bytes(data[:64]).hex()} if self.log_payload else {}

    def drop(self, reason: str, **fields: object) -> None:
        """Count a dropped packet and write one debug line saying why."""
        self.counters["drop_" + reason] += 1
        if self.debug:
            self.log.debug("drop", reason=reason, **fields)
