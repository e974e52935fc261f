"""One TCP flow as seen from the stack: the one form routing, workers, the bus and stackctl share.

Contract: a ``Flow`` is a frozen ``(remote, rport, lport, local)`` value (a
NamedTuple, so it hashes and compares like the plain tuple it replaces).
``remote`` is the peer's packed address: 4 bytes for IPv4, 16 for IPv6, so
a second family fits without a new type. ``local`` is empty for a flow to
the stack's own address and the packed destination address for a flow the
stack relays in attach mode (the same client port may reach two
destinations at once, so the destination is part of the flow). ``key`` is
the routing key: the remote address bytes, then both ports in network
order, the remote's first, as an incoming segment carries them, then
``local``; the key lengths (8, 20 for local flows, 12, 36 for relayed ones)
differ per family and kind, so keys never collide. ``bus()``/``from_bus()``
are the msgpack-ready list form (``local`` appended only when set); the
message layout around it stays in ``pipeline.bus.messages``.

Keys are built here and nowhere else: ``flow_key`` from a flow's values,
``inbound_key`` from a segment that arrived (its source and its ports as
the wire has them: no ints made on the hot path), ``outbound_key`` from one
we sent (an ICMP error quotes it). ``client_key`` and ``local_port`` read a
key for steering: every connection of one client to a steered port shares a
worker (``pipeline.routing``).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

_PORTS = struct.Struct("!HH")
_PORT = struct.Struct("!H")
_ADDRESS_LENGTHS = (4, 16)
# Key length -> remote address length: local flows (8, 20), relayed flows (12, 36).
_REMOTE_LENGTH_BY_KEY = {8: 4, 20: 16, 12: 4, 36: 16}
_LOCAL_KEY_LENGTHS = (8, 20)  # the stack's own flows (no relayed destination): IPv4, IPv6


def flow_key(remote: bytes, rport: int, lport: int, local: bytes = b"") -> bytes:
    """The routing key of the flow (remote, rport, lport, local): what ``Flow.key`` is."""
    return remote + _PORTS.pack(rport, lport) + local


def inbound_key(src: bytes, ports: bytes, relayed: bytes = b"") -> bytes:
    """The key of the flow an arriving segment belongs to: its source address, its ports as the
    wire has them (source then destination, ``PortsView.port_bytes``), the relayed destination
    (attach mode; empty for the stack's own address)."""
    return src + ports + relayed


def outbound_key(dst: bytes, ports: bytes) -> bytes:
    """The key of the stack's own flow a segment we sent belongs to (an ICMP error quotes it):
    its destination, then its ports as the wire has them (``ports[:4]``: ours, then the peer's)."""
    return dst + ports[2:4] + ports[0:2]


def local_port(key: bytes) -> int:
    """The local port of a key of the stack's own flows; -1 for a relayed flow's key."""
    if len(key) not in _LOCAL_KEY_LENGTHS:
        return -1
    return _PORT.unpack_from(key, len(key) - _PORT.size)[0]


def client_key(key: bytes) -> bytes:
    """(remote address, local port) of a key of the stack's own flows: the same for every
    connection of one client to one port."""
    return key[:-_PORTS.size] + key[-_PORT.size:]


class Flow(NamedTuple):
    remote: bytes  # the peer's address, packed (4 or 16 bytes)
    rport: int     # the peer's port
    lport: int     # our port
    local: bytes = b""  # the relayed destination's address (attach mode); empty: the stack's own

    @property
    def key(self) -> bytes:
        """The routing key: remote address, remote port, local port, relayed destination."""
        return flow_key(self.remote, self.rport, self.lport, self.local)

    @classmethod
    def from_key(cls, key: bytes) -> Flow:
        n = _REMOTE_LENGTH_BY_KEY[len(key)]
        rport, lport = _PORTS.unpack_from(key, n)  # named: mypy cannot count a starred tuple
        return cls(bytes(key[:n]), rport, lport, bytes(key[n + _PORTS.size:]))

    def bus(self) -> list[object]:
        """The flow as a msgpack array: [remote, rport, lport] (+ [local] when relayed)."""
        return [self.remote, self.rport, self.lport, self.local] if self.local else \
            [self.remote, self.rport, self.lport]

    @classmethod
    def from_bus(cls, item: object) -> Flow:
        """A flow from its bus form; ValueError if it is not one."""
        if not (isinstance(item, list) and len(item) in (3, 4) and isinstance(item[0], bytes)
                and len(item[0]) in _ADDRESS_LENGTHS and is_port(item[1]) and is_port(item[2])):
            raise ValueError("bad_flow")
        local = item[3] if len(item) == 4 else b""
        if local and not (isinstance(local, bytes) and len(local) == len(item[0])):
            raise ValueError("bad_flow")
        return cls(item[0], item[1], item[2], local)


def is_port(value: object) -> bool:
    """A port number (an int, not a bool, in 0..65535)."""
    return type(value) is int and 0 <= value <= 0xFFFF
