"""What TCP and UDP headers share: the source and destination ports open both
(RFC 9293 §3.1, RFC 768), so one view reads them for either."""

from __future__ import annotations

import struct

_PORTS = struct.Struct("!HH")  # source port at offset 0, destination port at 2
_U16 = struct.Struct("!H")
_SRC_PORT = 0
_DST_PORT = 2


class PortsView:
    """Base of the TCP and UDP views: a memoryview whose first four bytes are the ports."""

    __slots__ = ("buf",)

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf

    @property
    def ports(self) -> tuple[int, int]:
        """(source port, destination port)."""
        return _PORTS.unpack_from(self.buf, _SRC_PORT)  # type: ignore[return-value]

    @property
    def port_bytes(self) -> bytes:
        """Both ports as on the wire (source then destination): the tail of a ``Flow.key``."""
        return bytes(self.buf[_SRC_PORT:_DST_PORT + 2])

    @property
    def src_port(self) -> int:
        return _U16.unpack_from(self.buf, _SRC_PORT)[0]

    @property
    def dst_port(self) -> int:
        return _U16.unpack_from(self.buf, _DST_PORT)[0]
