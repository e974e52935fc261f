"""One TCP flow as seen from the stack: the one form routing, workers, the bus and stackctl share.

Contract: a ``Flow`` is a frozen ``(remote, rport, lport)`` value (a
NamedTuple, so it hashes and compares like the plain tuple it replaces).
``remote`` is the peer's packed address: 4 bytes for IPv4, 16 for IPv6, so
a second family fits without a new type. ``key`` is the routing key: the
address bytes, then both ports in network order, as an incoming segment
carries them (ingress builds it as ``src + view.port_bytes``); the lengths
differ per family, so keys of two families never collide.
``bus()``/``from_bus()`` are the msgpack-ready list form; the message layout
around it stays in ``pipeline.bus.messages``.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

_PORTS = struct.Struct("!HH")
_ADDRESS_LENGTHS = (4, 16)


class Flow(NamedTuple):
    remote: bytes  # the peer's address, packed (4 or 16 bytes)
    rport: int     # the peer's port
    lport: int     # our port

    @property
    def key(self) -> bytes:
        """The routing key: remote address, remote port, local port."""
        return self.remote + _PORTS.pack(self.rport, self.lport)

    @classmethod
    def from_key(cls, key: bytes) -> Flow:
        n = len(key) - _PORTS.size
        return cls(bytes(key[:n]), *_PORTS.unpack_from(key, n))

    def bus(self) -> list[object]:
        """The flow as a msgpack array: [remote, rport, lport]."""
        return [self.remote, self.rport, self.lport]

    @classmethod
    def from_bus(cls, item: object) -> Flow:
        """A flow from its bus form; ValueError if it is not one."""
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], bytes)
                and len(item[0]) in _ADDRESS_LENGTHS and _is_port(item[1]) and _is_port(item[2])):
            raise ValueError("bad_flow")
        return cls(item[0], item[1], item[2])


def _is_port(value: object) -> bool:
    return type(value) is int and 0 <= value <= 0xFFFF
