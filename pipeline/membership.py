"""Which workers are alive, and which one owns a flow.

Workers announce themselves with heartbeats (their honcho name and role);
nothing is configured. A worker silent for HEARTBEAT_TIMEOUT, or one ZeroMQ
reports unreachable, is forgotten. A flow goes to the live worker of its role
with the highest rendezvous score for the flow key, so each flow has one owner
and a worker joining or leaving moves only its own share of flows.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field


@dataclass
class Member:
    name: str
    role: str
    last_seen: float
    stats: dict[str, int] = field(default_factory=dict)  # from its latest heartbeat
    seq: int = -1  # its latest heartbeat's sequence number
    seed: int = field(init=False)

    def __post_init__(self) -> None:
        self.seed = zlib.crc32(self.name.encode()) << 32


_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """The splitmix64 finalizer: crc32 alone is linear, so scores would correlate across workers."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Membership:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._members: dict[str, Member] = {}
        self._by_role: dict[str, list[Member]] = {}

    def seen(self, name: str, role: str, now: float, seq: int = 0,
             stats: dict[str, int] | None = None) -> str | None:
        """Record a heartbeat. Returns "joined" for a worker not known before,
        "restarted" for a known name whose heartbeat count started again (a new
        process under the old name), None otherwise."""
        member = self._members.get(name)
        event = None
        if member is None or member.role != role:
            member = self._members[name] = Member(name, role, now)
            self._reindex()
            event = "joined"
        elif seq <= member.seq:
            event = "restarted"
        member.last_seen = now
        member.seq = seq
        if stats is not None:
            member.stats = stats
        return event

    def remove(self, name: str) -> bool:
        if self._members.pop(name, None) is None:
            return False
        self._reindex()
        return True

    def expire(self, now: float) -> list[str]:
        """Forget workers whose last heartbeat is older than the timeout."""
        dead = [m.name for m in self._members.values() if now - m.last_seen > self.timeout]
        for name in dead:
            del self._members[name]
        if dead:
            self._reindex()
        return dead

    def is_alive(self, name: str) -> bool:
        return name in self._members

    def has_role(self, role: str) -> bool:
        return bool(self._by_role.get(role))

    def pick(self, role: str, key: bytes) -> str | None:
        """The owner of ``key`` among live workers of ``role`` (rendezvous hashing)."""
        members = self._by_role.get(role)
        if not members:
            return None
        if len(members) == 1:
            return members[0].name
        h = zlib.crc32(key)
        return max(members, key=lambda m: _mix64(h ^ m.seed)).name

    def members(self) -> list[Member]:
        return [self._members[n] for n in sorted(self._members)]

    def _reindex(self) -> None:
        by_role: dict[str, list[Member]] = {}
        for m in self._members.values():
            by_role.setdefault(m.role, []).append(m)
        self._by_role = by_role
