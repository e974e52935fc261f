"""Which workers are alive, and which one owns a flow.

Workers announce themselves with heartbeats (their honcho name and role);
nothing is configured. A worker silent for HEARTBEAT_TIMEOUT, or one ZeroMQ
reports unreachable, is forgotten. A flow goes to the live worker of its role
with the highest rendezvous score for the flow key, so each flow has one owner
and a worker joining or leaving moves only its own share of flows.

A heartbeat may also name the ports the worker wants steered by client (its
services declare them): ``steered_ports(role)`` is every such port of the
live workers of a role, and ``pick_steered`` chooses among the workers that
announced the port, by a key the caller makes the same for all of one
client's connections (``pipeline.flow.client_key``).
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
    steered: frozenset[int] = frozenset()  # ports it wants steered by client (from its heartbeats)
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
        self._steered: dict[str, frozenset[int]] = {}  # role -> ports its live workers steer by client
        self._steering: dict[tuple[str, int], list[Member]] = {}  # (role, port) -> the workers steering it

    def seen(self, name: str, role: str, now: float, seq: int = 0,
             stats: dict[str, int] | None = None, steered: frozenset[int] = frozenset()) -> str | None:
        """Record a heartbeat (with the ports the worker steers by client). Returns "joined"
        for a worker not known before, "restarted" for a known name whose heartbeat count
        started again (a new process under the old name), None otherwise."""
        member = self._members.get(name)
        event = None
        if member is None or member.role != role:
            member = self._members[name] = Member(name, role, now, steered=steered)
            self._reindex()
            event = "joined"
        elif seq <= member.seq:
            event = "restarted"
        if member.steered != steered:
            member.steered = steered
            self._reindex()
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
        return _rendezvous(members, key)

    def steered_ports(self, role: str) -> frozenset[int]:
        """The ports live workers of ``role`` announced as steered by client."""
        return self._steered.get(role, _NONE)

    def pick_steered(self, role: str, port: int, key: bytes) -> str | None:
        """The owner of ``key`` among live workers of ``role`` that steer ``port`` (rendezvous hashing)."""
        members = self._steering.get((role, port))
        return _rendezvous(members, key) if members else None

    def members(self) -> list[Member]:
        return [self._members[n] for n in sorted(self._members)]

    def _reindex(self) -> None:
        by_role: dict[str, list[Member]] = {}
        steering: dict[tuple[str, int], list[Member]] = {}
        for m in self._members.values():
            by_role.setdefault(m.role, []).append(m)
            for port in m.steered:
                steering.setdefault((m.role, port), []).append(m)
        self._by_role = by_role
        self._steering = steering
        self._steered = {role: frozenset(p for r, p in steering if r == role) for role in by_role}


_NONE: frozenset[int] = frozenset()


def _rendezvous(members: list[Member], key: bytes) -> str:
    """The member with the highest rendezvous score for ``key``."""
    if len(members) == 1:
        return members[0].name
    h = zlib.crc32(key)
    return max(members, key=lambda m: _mix64(h ^ m.seed)).name
