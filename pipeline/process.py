"""What every pipeline process shares: signals, logging set-up and counters."""

from __future__ import annotations

import atexit
import collections
import ctypes
import signal
import sys
import time

import structlog

from pipeline import compiled, config, log, telemetry


PARK_MAX = 15.0  # seconds a process idles after an ordered stop before it exits by itself


def _malloc_trim():  # type: ignore[no-untyped-def]
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl has none
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Give the kernel back the heap pages glibc holds free (``malloc_trim``).

    glibc keeps freed memory for reuse: after bulk connections close, their
    1 MiB buffers stay in the heap (freed, but resident; glibc raises its mmap
    threshold as mapped blocks are freed, so such buffers come from the heap).
    Returning them once a second costs well under a millisecond; mapping every
    large buffer instead (a fixed mmap threshold) was tried and halved bulk
    throughput out of chargen (each regrowth of the send buffer became mmap,
    page faults and munmap)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


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
        config.check_or_exit(config.env_str("HONCHO_PROCESS_NAME", "") or role, role)
        self.config = config.load()
        self.name = self.config.proc_name or role
        self.role = role
        # Buffered: the process's loop calls flush_logs() once per wake-up.
        self.log: structlog.typing.FilteringBoundLogger = log.setup(self.name, buffered=True)
        self.debug = log.debug_enabled()
        self.log_payload = self.debug and log.payload_wanted()
        self.stopper = Stopper()
        self.counters: collections.Counter[str] = collections.Counter()
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
