"""Published ports as the TCP and UDP relays see them: the table's changes, and where a client enters.

Contract (pure, sans-IO): :func:`ports_of` takes one protocol's ports out of
the table ingress sends (``pipeline.publishing``), and :func:`changes` says
what a relay listening on ``old`` must do to listen on ``new``: listen on
the ports that came, close the ones that went (connections accepted through
them carry on), and take the new port inside of a changed one for what is
accepted from then on.

:class:`Inside` says where a connection or datagram accepted on a published
port enters the namespace (``USTACK_PUBLISH_SOURCE``): with ``client``
(the default) from the outside client's own address and port, to the
namespace's address of the client's family -- IPv4 clients (IPv4-mapped on
the dual-stack listener) to its IPv4 address, IPv6 ones to its IPv6
address. The namespace answers the client's address through its default
route, that is through the device, and the stack takes the answer as it
takes any relayed flow's. A loopback client (which the namespace would drop
as a martian) appears as the host alias of its family (``USTACK_HOST_ALIAS``)
if set, else as the stack's own address; so do an IPv6 link-local client
and a client claiming the stack's or the namespace's own address. Without a
route back (``USTACK_DEFAULT_ROUTE=0``), without forwarding
(``USTACK_FORWARD=0``) or with ``stack``, every one enters from the
stack's IPv4 address to the namespace's IPv4 address, as before (the
namespace's answers then need no route back).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # a core never loads the settings (tests/unit/test_cores_free_of_bus.py)
    from pipeline.config import StackConfig
    from pipeline.relay_config import RelaySettings

Table = Iterable[tuple[str, int, int]]  # (protocol, port where the stack runs, port in the namespace)


def ports_of(table: Table, proto: str) -> dict[int, int]:
    """One protocol's published ports: port where the stack runs -> port in the namespace."""
    return {port: to_port for p, port, to_port in table if p == proto}


class Changes(NamedTuple):
    listen: list[int]   # ports to listen on now
    close: list[int]    # ports no longer published: their listeners close
    changed: list[int]  # ports still published, to another port inside (for new connections)


def changes(old: Mapping[int, int], new: Mapping[int, int]) -> Changes:
    """What turns listening on ``old`` into listening on ``new``."""
    return Changes(sorted(new.keys() - old.keys()), sorted(old.keys() - new.keys()),
                   sorted(port for port in new.keys() & old.keys() if new[port] != old[port]))


class Entry(NamedTuple):
    """Where one client enters the namespace."""

    src: bytes  # the source address inside: the client's, the host alias, or the stack's own
    sport: int  # the client's port; 0 when ``src`` is the stack's own address (the stack picks a port)
    dst: bytes  # the namespace's address, of the family of ``src``


@dataclass(frozen=True, slots=True)
class Inside:
    """The addresses a published flow may use inside (packed), and whether clients keep theirs."""

    namespace: bytes                 # the namespace's IPv4 address (the device's kernel side)
    stack: bytes                     # the stack's IPv4 address
    namespace6: bytes | None = None  # None: IPv6 is off
    stack6: bytes | None = None
    alias: bytes | None = None       # USTACK_HOST_ALIAS, IPv4
    alias6: bytes | None = None      # USTACK_HOST_ALIAS, IPv6
    client_source: bool = False      # USTACK_PUBLISH_SOURCE=client, with a route back

    def from_stack(self, dst: bytes) -> Entry:
        """From the stack's own address of ``dst``'s family (the stack picks the port)."""
        return Entry(self.stack6 if len(dst) == 16 and self.stack6 is not None else self.stack, 0, dst)

    def entry(self, address: str, port: int) -> Entry:
        """Where the client at ``address`` (as the dual-stack listener reports it) and ``port`` enters."""
        from_stack = Entry(self.stack, 0, self.namespace)
        if not self.client_source:
            return from_stack
        try:
            client = ipaddress.ip_address(address.partition("%")[0])  # a scope ("fe80::1%eth0") aside
        except ValueError:
            return from_stack
        if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped is not None:
            client = client.ipv4_mapped
        if isinstance(client, ipaddress.IPv4Address):
            if client.is_loopback:
                return from_stack if self.alias is None else Entry(self.alias, port, self.namespace)
            if client.packed in (self.stack, self.namespace):
                return from_stack
            return Entry(client.packed, port, self.namespace)
        if self.namespace6 is None or self.stack6 is None:
            return from_stack  # IPv6 is off inside
        if client.is_loopback or client.is_link_local or client.packed in (self.stack6, self.namespace6):
            if client.is_loopback and self.alias6 is not None:
                return Entry(self.alias6, port, self.namespace6)
            return Entry(self.stack6, 0, self.namespace6)
        return Entry(client.packed, port, self.namespace6)


def inside(cfg: StackConfig, relays: RelaySettings) -> Inside:
    """The worker's Inside from the checked settings: clients keep their addresses only when
    USTACK_PUBLISH_SOURCE=client and the namespace can answer them (a default route through the
    device, and forwarding, which brings the answers to a worker)."""
    alias = relays.host_alias
    return Inside(namespace=cfg.host_interface.ip.packed, stack=cfg.stack_addr_bytes,
                  namespace6=None if cfg.host_interface6 is None else cfg.host_interface6.ip.packed,
                  stack6=cfg.stack_addr6_bytes,
                  alias=alias.packed if alias is not None and alias.version == 4 else None,
                  alias6=alias.packed if alias is not None and alias.version == 6 else None,
                  client_source=relays.publish_source == "client" and cfg.default_route and cfg.forward)


def client_text(address: str) -> str:
    """The client's address for records: an IPv4-mapped address as the IPv4 address it is."""
    try:
        client = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped is not None:
        return str(client.ipv4_mapped)
    return address


def split_peer(peer: str) -> tuple[str, int]:
    """"address|port", as the shell reports a peer -> (address, port)."""
    address, _, port = peer.rpartition("|")
    return address, int(port)
