"""Which destinations attach mode relays to, and where (pure: no sockets, no environment).

Contract: ``ForwardPolicy.decide(dst, now)`` is a ``Verdict``: the packed
address a relayed flow's upstream socket connects to (None when the flow is
refused, with the reason), and the name the destination was learned from.
The relay is not an open door into the host (issue 10): by default it
refuses the destinations where services that trust local callers live —
loopback (127.0.0.0/8, ::1), link-local and cloud metadata (169.254.0.0/16,
fe80::/10). ``deny`` adds to those; ``allow``, when given, is the only set
relayed to and overrides the deny list for what it names. ``host_alias``
(off by default, like slirp4netns's 10.0.2.2) maps one address to the
host's loopback of its family.

Names (issue 20): ``names`` is what the stack's own resolver learned
(``NameTable``: each address with the names it was an answer for, until the
answer's TTL plus ``NAME_GRACE``). With ``allow_names`` set, a destination
must also have been learned for one of those names ("pkgs.example" exactly,
"*.example.org" any name below example.org); the address lists still apply.
The workers build the policy from the checked settings
(``pipeline.relay_config.relay_settings``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import NamedTuple, Protocol

from pipeline.wire.addr import Address, Network, parse_networks

DEFAULT_DENY = parse_networks("127.0.0.0/8, ::1/128, 169.254.0.0/16, fe80::/10")
_LOOPBACK = {4: ipaddress.IPv4Address("127.0.0.1").packed, 16: ipaddress.IPv6Address("::1").packed}
# Seconds an address stays allowed after its answer's TTL ran out: a client's connection attempts
# (happy eyeballs, retries) may come a little after the answer that named the address expired.
NAME_GRACE = 30.0
MAX_LEARNED = 4096  # addresses a name table holds; beyond, the one expiring first makes room

# Why a flow is refused (the ``reason`` of its relay_denied record).
DENIED_NETWORK = "denied_network"    # the deny list (loopback, link-local, metadata, USTACK_FORWARD_DENY)
NOT_ALLOWED = "not_in_allow_list"    # USTACK_FORWARD_ALLOW does not name it
NAME_UNKNOWN = "name_unknown"        # USTACK_FORWARD_ALLOW_NAMES: our resolver never gave this address
NAME_NOT_ALLOWED = "name_not_allowed"  # it did, but for no allowed name


class Verdict(NamedTuple):
    target: bytes | None  # where to connect; None: refused
    reason: str = ""      # why refused
    name: str = ""        # the name the address was learned from ("" if none)


class Names(Protocol):
    """What the stack's resolver learned: the names ``address`` was an answer for, still valid at ``now``."""

    def names_of(self, address: bytes, now: float) -> list[str]: ...


class NameTable:
    """Addresses and the names they answered for, each until TTL + NAME_GRACE (bounded)."""

    def __init__(self, limit: int = MAX_LEARNED) -> None:
        self.limit = limit
        self.entries: dict[bytes, dict[str, float]] = {}  # address -> name -> expiry

    def learn(self, name: str, addresses: list[bytes], ttl: int, now: float) -> None:
        expires = now + ttl + NAME_GRACE
        for address in addresses:
            names = self.entries.get(address)
            if names is None:
                if len(self.entries) >= self.limit:
                    self._make_room(now)
                names = self.entries[address] = {}
            names[name] = max(expires, names.get(name, 0.0))

    def names_of(self, address: bytes, now: float) -> list[str]:
        names = self.entries.get(address)
        return [] if not names else [name for name, expires in names.items() if expires > now]

    def _make_room(self, now: float) -> None:
        for address in [a for a, names in self.entries.items() if max(names.values()) <= now]:
            del self.entries[address]
        if len(self.entries) >= self.limit:
            del self.entries[min(self.entries, key=lambda a: max(self.entries[a].values()))]


def name_allowed(name: str, patterns: Iterable[str]) -> bool:
    """``name`` (lower case, no final dot) matches "host.example" exactly or "*.example" below it."""
    return any(name == p or (p.startswith("*.") and name.endswith(p[1:])) for p in patterns)


def _networks(nets: Iterable[Network] | str) -> tuple[Network, ...]:
    return parse_networks(nets) if isinstance(nets, str) else tuple(nets)


class ForwardPolicy:
    """Networks and the alias as values (RelaySettings' fields), or as text (a ValueError if bad)."""

    def __init__(self, deny: Iterable[Network] | str = (), allow: Iterable[Network] | str = (),
                 host_alias: Address | str | None = None, allow_names: Iterable[str] = (),
                 names: Names | None = None) -> None:
        self.deny = DEFAULT_DENY + _networks(deny)
        self.allow = _networks(allow)
        self.host_alias = ipaddress.ip_address(host_alias).packed if host_alias else b""
        self.allow_names = tuple(allow_names)
        self.names = names

    def decide(self, dst: bytes, now: float) -> Verdict:
        """Where to connect for ``dst`` (packed), or why not."""
        learned = self.names.names_of(dst, now) if self.names is not None else []
        if self.allow_names:
            allowed = [n for n in learned if name_allowed(n, self.allow_names)]
            if not allowed:
                return Verdict(None, NAME_NOT_ALLOWED if learned else NAME_UNKNOWN, learned[0] if learned else "")
            learned = allowed
        name = learned[0] if learned else ""
        if dst == self.host_alias:
            return Verdict(_LOOPBACK[len(dst)], name=name)
        addr = ipaddress.ip_address(dst)
        if self.allow:
            if any(addr in net for net in self.allow):
                return Verdict(dst, name=name)
            return Verdict(None, NOT_ALLOWED, name)
        if any(addr in net for net in self.deny):
            return Verdict(None, DENIED_NETWORK, name)
        return Verdict(dst, name=name)
