"""What every pipeline process shares: signals, logging set-up and counters."""

from __future__ import annotations

import collections
import signal

import structlog

from pipeline import compiled, config, log


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
        self.config = config.load()
        self.name = self.config.proc_name or role
        self.role = role
        # Buffered: the process's loop calls flush_logs() once per wake-up.
        self.log: structlog.typing.FilteringBoundLogger = log.setup(self.name, buffered=True)
        self.flush_logs = log.flush
        self.debug = log.debug_enabled()
        self.log_payload = self.debug and log.payload_wanted()
        self.stopper = Stopper()
        self.counters: collections.Counter[str] = collections.Counter()
        self.log.info("build", mode=compiled.MODE, why=compiled.REASON)  # compiled (mypyc) or pure

    def payload(self, data: bytes) -> dict[str, str]:
        """Log fields for a packet's payload: none unless LOG_PAYLOAD=1 asked for them."""
        return {"payload": bytes(data[:64]).hex()} if self.log_payload else {}

    def drop(self, reason: str, **fields: object) -> None:
        """Count a dropped packet and write one debug line saying why."""
        self.counters["drop_" + reason] += 1
        if self.debug:
            self.log.debug("drop", reason=reason, **fields)
