"""Which destinations attach mode relays to, and where (pure: no sockets, no environment).

Contract: ``ForwardPolicy.target(dst)`` is the packed address a relayed
flow's upstream socket connects to, or None when the flow is refused. The
relay is not an open door into the host (issue 10): by default it refuses
the destinations where services that trust local callers live — loopback
(127.0.0.0/8, ::1), link-local and cloud metadata (169.254.0.0/16,
fe80::/10). ``deny`` adds to those; ``allow``, when given, is the only set
relayed to and overrides the deny list for what it names. ``host_alias``
(off by default, like slirp4netns's 10.0.2.2) maps one address to the
host's loopback of its family.
"""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_DENY = ("127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10")
_LOOPBACK = {4: ipaddress.IPv4Address("127.0.0.1").packed, 16: ipaddress.IPv6Address("::1").packed}


def parse_networks(raw: str) -> tuple[Network, ...]:
    """A comma-separated CIDR list; ValueError naming the bad entry."""
    nets = []
    for item in raw.split(","):
        item = item.strip()
        if item:
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not an address or CIDR network") from None
    return tuple(nets)


class ForwardPolicy:
    def __init__(self, deny: str = "", allow: str = "", host_alias: str = "") -> None:
        self.deny = parse_networks(",".join(DEFAULT_DENY)) + parse_networks(deny)
        self.allow = parse_networks(allow)
        self.host_alias = ipaddress.ip_address(host_alias).packed if host_alias else b""

    def target(self, dst: bytes) -> bytes | None:
        """Where to connect for ``dst`` (packed), or None: refused."""
        if dst == self.host_alias:
            return _LOOPBACK[len(dst)]
        addr = ipaddress.ip_address(dst)
        if self.allow:
            return dst if any(addr in net for net in self.allow) else None
        return None if any(addr in net for net in self.deny) else dst


def parse_publish(raw: str) -> tuple[tuple[str, int, int], ...]:
    """USTACK_PUBLISH, "tcp:8080:80,udp:5353:53": (protocol, port where the stack runs, port in the
    namespace) each; ValueError naming the bad entry."""
    out = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        try:
            proto, outer, inner = parts[0].lower(), int(parts[1]), int(parts[2])
            if len(parts) != 3 or proto not in ("tcp", "udp") or not (0 < outer < 65536 and 0 < inner < 65536):
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(f"{item!r} is not proto:port:port (proto tcp or udp, ports 1..65535)") from None
        out.append((proto, outer, inner))
    return tuple(out)
