"""What TCP and UDP headers share: the source and destination ports open both
(RFC 9293 §3.1, RFC 768), so one view reads them for either."""

from __future__ import annotations

import struct
from typing import Final

_PORTS = struct.Struct("!HH")  # source port at offset 0, destination port at 2
_U16 = struct.Struct("!H")
SRC_PORT_OFFSET: Final = 0
DST_PORT_OFFSET: Final = 2
PORTS_LEN: Final = 4


class PortsView:
    """Base of the TCP and UDP views: a memoryview whose first four bytes are the ports."""

    __slots__ = ("buf",)

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf

    @property
    def ports(self) -> tuple[int, int]:
        """(source port, destination port)."""
        return _PORTS.unpack_from(self.buf, SRC_PORT_OFFSET)  # type: ignore[return-value]

    @property
    def port_bytes(self) -> bytes:
        """Both ports as on the wire (source then destination), as ``pipeline.flow.inbound_key`` takes them."""
        return bytes(self.buf[SRC_PORT_OFFSET:SRC_PORT_OFFSET + PORTS_LEN])

    @property
    def src_port(self) -> int:
        return _U16.unpack_from(self.buf, SRC_PORT_OFFSET)[0]

    @property
    def dst_port(self) -> int:
        return _U16.unpack_from(self.buf, DST_PORT_OFFSET)[0]
