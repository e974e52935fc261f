"""What the stack's resolver learned, shared by every worker of the stack (attach mode, issue 20).

Contract: ``SharedNames`` is the ``policy.Names`` of a worker. Its own
answers (the DNS forwarder's, in the UDP worker and, over TCP, in the TCP
workers) go into its ``NameTable`` with ``learn``; ``flush`` writes that table
to ``names-<process>.msgpack`` in the stack's run directory (a new file
renamed into place). The worker shell calls ``flush`` before it sends what
one wake-up produced, so the file holding an answer's addresses is on disk
before the answer leaves: a client that connects to what it was told is
always judged by a table that already has it, whichever worker its flow
lands on. ``names_of`` reads the other processes' changed files again
whenever the directory changed since the last look, or changed so recently
that the coarse clock of file times could hide a second change (one
``stat`` per new flow otherwise).
``close`` removes the process's file.
"""

from __future__ import annotations

import contextlib
import os
import time

import msgpack

from workers.attach.policy import NameTable

PREFIX, SUFFIX = "names-", ".msgpack"
COARSE_CLOCK_NS = 50_000_000  # file times lag by up to a timer tick (1-10 ms): this much is safe


class SharedNames:
    def __init__(self, run_dir: str, process: str) -> None:
        self.run_dir = run_dir
        self.own = NameTable()
        self.path = os.path.join(run_dir, PREFIX + process + SUFFIX)
        self.dirty = False
        self.seen_dir: int | None = None  # the directory's mtime when the others' files were last read
        self.others: dict[str, tuple[tuple[int, int, int], NameTable]] = {}  # path -> (inode, mtime, size), table

    def learn(self, name: str, addresses: list[bytes], ttl: int, now: float) -> None:
        self.own.learn(name, addresses, ttl, now)
        self.dirty = True

    def flush(self) -> None:
        """Write our table if it changed: before the answers that taught it leave."""
        if not self.dirty:
            return
        self.dirty = False
        temporary = self.path + ".new"
        with open(temporary, "wb") as f:
            f.write(msgpack.packb(self.own.entries))
        os.replace(temporary, self.path)

    def names_of(self, address: bytes, now: float) -> list[str]:
        self._refresh()
        names = self.own.names_of(address, now)
        for _, table in self.others.values():
            names += table.names_of(address, now)
        return list(dict.fromkeys(names))

    def _refresh(self) -> None:
        try:
            changed = os.stat(self.run_dir).st_mtime_ns
        except OSError:
            return
        # File times come from a clock that ticks every few milliseconds: a rename in the same
        # tick as our last look leaves the time as it was, so a recent time proves nothing.
        if changed == self.seen_dir and time.time_ns() - changed > COARSE_CLOCK_NS:
            return
        self.seen_dir = changed
        current: dict[str, tuple[tuple[int, int, int], NameTable]] = {}
        with os.scandir(self.run_dir) as entries:
            for entry in entries:
                if not (entry.name.startswith(PREFIX) and entry.name.endswith(SUFFIX)) or entry.path == self.path:
                    continue
                with contextlib.suppress(OSError):
                    stat = entry.stat()
                    version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # each write is a new file
                    known = self.others.get(entry.path)
                    current[entry.path] = known if known and known[0] == version else (version, _read(entry.path))
        self.others = current

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _read(path: str) -> NameTable:
    """Another process's table; an unreadable one (being replaced, or damaged) counts as empty."""
    table = NameTable()
    with contextlib.suppress(OSError, ValueError, TypeError, msgpack.UnpackException):
        with open(path, "rb") as f:
            entries = msgpack.unpackb(f.read(), strict_map_key=False)
        if isinstance(entries, dict):
            table.entries = {a: dict(n) for a, n in entries.items() if isinstance(a, bytes) and isinstance(n, dict)}
    return table
