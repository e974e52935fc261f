"""What a worker builds for attach mode from the checked settings, said once for the three workers.

Contract: each worker's ``__main__`` takes its ``ForwardPolicy``, its view of
the names the stack's resolver learned (``SharedNames``, None when the
resolver is off), the outbound addresses for its shell and the resolver's
two doors (UDP: ``dns_forwarder``, TCP: ``dns_service``) from here. dnspython
is imported only when the resolver is on.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.relay_config import RelaySettings
from workers.attach.learned import SharedNames
from workers.attach.policy import ForwardPolicy
from workers.core import Sink

if TYPE_CHECKING:
    from workers.attach.dns import DnsForwarder
    from workers.attach.tcp import TcpRelay

DNS_PORT = 53


def names(relays: RelaySettings, run_dir: str, process: str) -> SharedNames | None:
    return SharedNames(run_dir, process) if relays.dns else None


def policy(relays: RelaySettings, learned: SharedNames | None) -> ForwardPolicy:
    return ForwardPolicy(deny=relays.deny, allow=relays.allow, host_alias=relays.host_alias,
                         allow_names=relays.allow_names, names=learned)


def outbound(relays: RelaySettings) -> dict[int, str]:
    """Address family -> the address relayed flows leave from (USTACK_OUTBOUND_ADDR, _ADDR6)."""
    chosen = {socket.AF_INET: relays.outbound, socket.AF_INET6: relays.outbound6}
    return {family: str(address) for family, address in chosen.items() if address is not None}


def dns_forwarder(relays: RelaySettings, sink: Sink, learned: SharedNames | None, mtu: int) -> DnsForwarder | None:
    """The UDP worker's resolver on port 53; None when USTACK_DNS is off."""
    if not relays.dns:
        return None
    from workers.attach.dns import DnsForwarder
    return DnsForwarder(sink, [a.packed for a in relays.dns_servers], relays.dns_timeout, learned, mtu)


def dns_service(relays: RelaySettings, sink: Sink, learned: SharedNames | None,
                relay: TcpRelay) -> Callable[[Any], Any]:
    """The TCP worker's service for port 53: each connection's queries forwarded on a connection of
    its own to the resolvers, its commands queued on ``relay`` like a relayed flow's."""
    from workers.attach.dns import DnsTcpService
    servers = [a.packed for a in relays.dns_servers]
    return lambda stream: DnsTcpService(stream, lambda cmd: relay.commands.append(cmd), sink, servers,
                                        relays.dns_timeout, learned)
