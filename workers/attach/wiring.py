"""What a worker builds for attach mode from the checked settings, said once for the three workers.

Contract: each worker's ``__main__`` takes its ``ForwardPolicy``, its view of
the names the stack's resolver learned (``SharedNames``, None when the
resolver is off) and the outbound addresses for its shell from here.
"""

from __future__ import annotations

import socket

from pipeline.relay_config import RelaySettings
from workers.attach.learned import SharedNames
from workers.attach.policy import ForwardPolicy


def names(relays: RelaySettings, run_dir: str, process: str) -> SharedNames | None:
    return SharedNames(run_dir, process) if relays.dns else None


def policy(relays: RelaySettings, learned: SharedNames | None) -> ForwardPolicy:
    return ForwardPolicy(deny=relays.deny, allow=relays.allow, host_alias=relays.host_alias,
                         allow_names=relays.allow_names, names=learned)


def outbound(relays: RelaySettings) -> dict[int, str]:
    """Address family -> the address relayed flows leave from (USTACK_OUTBOUND_ADDR, _ADDR6)."""
    chosen = {socket.AF_INET: relays.outbound, socket.AF_INET6: relays.outbound6}
    return {family: str(address) for family, address in chosen.items() if address is not None}
