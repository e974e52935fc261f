"""Attach mode's settings (the ICMP, UDP and TCP workers' relays, the DNS forwarder, publishing).

Contract: :func:`relay_settings` reads and checks them from the environment,
naming every bad value in one :class:`pipeline.config.ConfigError`, like every
group of :mod:`pipeline.config` (whose ``validate_all`` checks this group too).
:func:`load` there reads USTACK_ATTACH, USTACK_FORWARD and USTACK_DEFAULT_ROUTE,
which the device needs as well. :func:`parse_publish` is the one reader of a
published port's text, for USTACK_PUBLISH and for ``stackctl publish``.
:func:`resolv_conf_servers` reads the resolvers the DNS forwarder asks: the
``nameserver`` lines of the ``resolv.conf`` of the namespace where the stack
runs, read at start. This module checks text into plain values; the workers
build their objects from those.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from dataclasses import dataclass

from pipeline.config import ConfigError, _number, _Problems, env_bool, env_str
from pipeline.wire.addr import Address, Network, parse_networks

DEFAULT_RELAY_CONNECT_TIMEOUT = 30.0  # USTACK_RELAY_CONNECT_TIMEOUT
DEFAULT_UDP_IDLE = 60.0      # USTACK_UDP_IDLE (Linux conntrack: 30 s unreplied, 120 s stream)
DEFAULT_UDP_IDLE_DNS = 10.0  # USTACK_UDP_IDLE_DNS: one question, one answer (retries come within seconds)
DEFAULT_DNS_TIMEOUT = 5.0    # USTACK_DNS_TIMEOUT: glibc's resolver waits 5 s per try (resolv.conf(5))
RESOLV_CONF = "/etc/resolv.conf"
PUBLISH_SOURCES = ("client", "stack")
# A name of USTACK_FORWARD_ALLOW_NAMES: labels of letters, digits, "-" and "_" (RFC 1123 §2.1,
# with the underscore of service names), optionally after "*." (the name's subdomains).
_NAME = re.compile(r"(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def _networks(name: str) -> tuple[Network, ...]:
    try:
        return parse_networks(env_str(name, ""))
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _address(name: str, version: int | None = None) -> Address | None:
    raw = env_str(name, "")
    try:
        address = ipaddress.ip_address(raw) if raw else None
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    if address is not None and version is not None and address.version != version:
        raise ConfigError(f"{name}={raw}: expected an IPv{version} address")
    return address


def parse_publish(item: str) -> tuple[str, int, int]:
    """"tcp:8080:80" -> ("tcp", port where the stack runs, port in the namespace); ValueError if bad."""
    parts = item.strip().split(":")
    try:
        proto, outer, inner = parts[0].lower(), int(parts[1]), int(parts[2])
        if len(parts) != 3 or proto not in ("tcp", "udp") or not (0 < outer < 65536 and 0 < inner < 65536):
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"{item.strip()!r} is not proto:port:port (proto tcp or udp, ports 1..65535)") from None
    return proto, outer, inner


def _publish() -> tuple[tuple[str, int, int], ...]:
    """USTACK_PUBLISH, "tcp:8080:80,udp:5353:53": (protocol, port where the stack runs, port in the
    namespace) each."""
    out = []
    for item in env_str("USTACK_PUBLISH", "").split(","):
        if not item.strip():
            continue
        try:
            out.append(parse_publish(item))
        except ValueError as exc:
            raise ConfigError(f"USTACK_PUBLISH: {exc}") from None
    return tuple(out)


def _allow_names() -> tuple[str, ...]:
    """USTACK_FORWARD_ALLOW_NAMES, "pkgs.example,*.example.org": names, lower case, no final dot."""
    names = []
    for item in env_str("USTACK_FORWARD_ALLOW_NAMES", "").split(","):
        name = item.strip().lower().rstrip(".")
        if not item.strip():
            continue
        if not _NAME.fullmatch(name) or len(name) > 253:
            raise ConfigError(f"USTACK_FORWARD_ALLOW_NAMES: {item.strip()!r} is not a host name or *.name")
        names.append(name)
    return tuple(names)


def resolv_conf_servers(path: str = RESOLV_CONF) -> tuple[Address, ...]:
    """The ``nameserver`` addresses of a resolv.conf (resolv.conf(5)); none if it cannot be read."""
    servers = []
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                # A scoped address ("fe80::1%eth0") names a link of this namespace only: skipped.
                if len(fields) >= 2 and fields[0] == "nameserver" and "%" not in fields[1]:
                    try:
                        servers.append(ipaddress.ip_address(fields[1]))
                    except ValueError:
                        continue
    except OSError:
        return ()
    return tuple(servers)


def _dns_servers() -> tuple[Address, ...]:
    """USTACK_DNS_SERVERS, or the nameservers of the stack's own resolv.conf."""
    raw = env_str("USTACK_DNS_SERVERS", "")
    if not raw.strip():
        return resolv_conf_servers()
    try:
        return tuple(ipaddress.ip_address(item.strip()) for item in raw.split(",") if item.strip())
    except ValueError as exc:
        raise ConfigError(f"USTACK_DNS_SERVERS: {exc}") from None


def _local(name: str, address: Address | None) -> Address | None:
    """An outbound address must be one of this namespace's: a bind() says so."""
    if address is None:
        return None
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError as exc:
            why = "not an address of this network namespace" if exc.errno == errno.EADDRNOTAVAIL else exc.strerror
            raise ConfigError(f"{name}={address}: {why}") from None
    return address


@dataclass(frozen=True)
class RelaySettings:
    """Attach mode's relay settings, checked: the workers build their ForwardPolicy and relays from them."""
    deny: tuple[Network, ...]   # refused, besides the policy's own list (loopback, link-local, metadata)
    allow: tuple[Network, ...]  # when not empty: the only destinations relayed to
    host_alias: Address | None  # reaches the loopback where the stack runs; None: off
    publish: tuple[tuple[str, int, int], ...]  # (protocol, port where the stack runs, port in the namespace)
    connect_timeout: float      # seconds an upstream TCP connect may take
    udp_idle: float             # seconds a relayed UDP flow lives without traffic
    udp_idle_dns: float         # the same for a flow to port 53
    allow_names: tuple[str, ...] = ()   # when not empty: only addresses our resolver gave for these names
    publish_source: str = "client"      # published connections come from the client's address, or the stack's
    outbound: Address | None = None     # relayed IPv4 flows leave from this address
    outbound6: Address | None = None    # and IPv6 ones from this one
    dns: bool = False                   # answer DNS on the stack's addresses (attach mode's default)
    dns_servers: tuple[Address, ...] = ()  # whom the forwarder asks
    dns_timeout: float = DEFAULT_DNS_TIMEOUT  # seconds until a query nobody answers gets SERVFAIL

    def published(self, proto: str) -> dict[int, int]:
        """USTACK_PUBLISH's ports of one protocol: port where the stack runs -> port in the namespace."""
        return {outer: inner for p, outer, inner in self.publish if p == proto}


def relay_settings() -> RelaySettings:
    """USTACK_FORWARD_*, USTACK_HOST_ALIAS, USTACK_PUBLISH*, USTACK_OUTBOUND_ADDR*, USTACK_DNS* and the
    relays' timeouts: a ConfigError naming every bad value at once."""
    p = _Problems()
    deny = p.take(_networks, "USTACK_FORWARD_DENY")
    allow = p.take(_networks, "USTACK_FORWARD_ALLOW")
    allow_names = p.take(_allow_names, fallback=())
    host_alias = p.take(_address, "USTACK_HOST_ALIAS")
    publish = p.take(_publish)
    publish_source = env_str("USTACK_PUBLISH_SOURCE", "client")
    if publish_source not in PUBLISH_SOURCES:
        p.note(f"USTACK_PUBLISH_SOURCE={publish_source!r}: expected client or stack")
    outbound = p.take(_local, "USTACK_OUTBOUND_ADDR", p.take(_address, "USTACK_OUTBOUND_ADDR", 4))
    outbound6 = p.take(_local, "USTACK_OUTBOUND_ADDR6", p.take(_address, "USTACK_OUTBOUND_ADDR6", 6))
    connect_timeout = p.take(_number, "USTACK_RELAY_CONNECT_TIMEOUT", DEFAULT_RELAY_CONNECT_TIMEOUT, 0.1, 3600.0)
    udp_idle = p.take(_number, "USTACK_UDP_IDLE", DEFAULT_UDP_IDLE, 0.1, 86400.0)
    udp_idle_dns = p.take(_number, "USTACK_UDP_IDLE_DNS", DEFAULT_UDP_IDLE_DNS, 0.1, 86400.0)
    dns = p.take(env_bool, "USTACK_DNS", bool(env_str("USTACK_ATTACH", "")))
    dns_servers = p.take(_dns_servers, fallback=())
    dns_timeout = p.take(_number, "USTACK_DNS_TIMEOUT", DEFAULT_DNS_TIMEOUT, 0.1, 60.0)
    if allow_names and not dns:
        p.note("USTACK_FORWARD_ALLOW_NAMES needs the stack's resolver (USTACK_DNS=1): only its answers "
               "say which address belongs to which name")
    p.done()
    return RelaySettings(deny=deny, allow=allow, host_alias=host_alias, publish=publish,
                         connect_timeout=connect_timeout, udp_idle=udp_idle, udp_idle_dns=udp_idle_dns,
                         allow_names=allow_names, publish_source=publish_source, outbound=outbound,
                         outbound6=outbound6, dns=dns, dns_servers=dns_servers, dns_timeout=dns_timeout)
