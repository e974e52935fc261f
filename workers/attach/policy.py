"""Which destinations attach mode relays to, and where (pure: no sockets, no environment).

Contract: ``ForwardPolicy.target(dst)`` is the packed address a relayed
flow's upstream socket connects to, or None when the flow is refused. The
relay is not an open door into the host (issue 10): by default it refuses
the destinations where services that trust local callers live — loopback
(127.0.0.0/8, ::1), link-local and cloud metadata (169.254.0.0/16,
fe80::/10). ``deny`` adds to those; ``allow``, when given, is the only set
relayed to and overrides the deny list for what it names. ``host_alias``
(off by default, like slirp4netns's 10.0.2.2) maps one address to the
host's loopback of its family. The workers build it from the checked
settings (``pipeline.relay_config.relay_settings``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from pipeline.wire.addr import Address, Network, parse_networks

DEFAULT_DENY = parse_networks("127.0.0.0/8, ::1/128, 169.254.0.0/16, fe80::/10")
_LOOPBACK = {4: ipaddress.IPv4Address("127.0.0.1").packed, 16: ipaddress.IPv6Address("::1").packed}


def _networks(nets: Iterable[Network] | str) -> tuple[Network, ...]:
    return parse_networks(nets) if isinstance(nets, str) else tuple(nets)


class ForwardPolicy:
    """Networks and the alias as values (RelaySettings' fields), or as text (a ValueError if bad)."""

    def __init__(self, deny: Iterable[Network] | str = (), allow: Iterable[Network] | str = (),
                 host_alias: Address | str | None = None) -> None:
        self.deny = DEFAULT_DENY + _networks(deny)
        self.allow = _networks(allow)
        self.host_alias = ipaddress.ip_address(host_alias).packed if host_alias else b""

    def target(self, dst: bytes) -> bytes | None:
        """Where to connect for ``dst`` (packed), or None: refused."""
        if dst == self.host_alias:
            return _LOOPBACK[len(dst)]
        addr = ipaddress.ip_address(dst)
        if self.allow:
            return dst if any(addr in net for net in self.allow) else None
        return None if any(addr in net for net in self.deny) else dst

