"""Packet capture files and filters for ``stackctl capture``.

Contract: the classic pcap format (tcpdump's, which tshark and Wireshark read),
microsecond timestamps, link type LINKTYPE_RAW (101): each record is one IP
packet exactly as it crossed the TUN device, so an offloaded 64 KB TCP
segment is one record of up to 65535 bytes. Flow filters read the IP header
(either family) once and never raise on malformed bytes (they simply do not
match).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import BinaryIO

from pipeline.wire import ipv4, ipv6
from pipeline.wire.addr import split_endpoint
from pipeline.wire.ports import PORTS_LEN, SRC_PORT_OFFSET

LINKTYPE_RAW = 101  # the packet begins with the IPv4 or IPv6 header
SNAPLEN = 65535
_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
_MAGIC = 0xA1B2C3D4  # microsecond resolution
_PORTS = struct.Struct("!HH")


class PcapWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        out.write(_GLOBAL.pack(_MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_RAW))
        out.flush()

    def write(self, when: float, packet: bytes) -> None:
        seconds = int(when)
        micros = min(999_999, int(round((when - seconds) * 1_000_000)))
        data = packet[:SNAPLEN]
        self.out.write(_RECORD.pack(seconds, micros, len(data), len(packet)))
        self.out.write(data)
        self.out.flush()  # a pipe reader (tshark -r -) sees each packet at once


class FlowFilter:
    """``ADDR:PORT`` (``[IPv6]:PORT``), ``ADDR`` or ``:PORT``: a packet or record matches when
    one of its addresses is ADDR and one of its ports is PORT (each part optional)."""

    def __init__(self, spec: str) -> None:
        try:
            addr, port = split_endpoint(spec)
            self.addr = str(ipaddress.ip_address(addr)) if addr else None
            self.port = int(port) if port else None
        except ValueError:
            raise ValueError(f"{spec!r}: expected ADDR:PORT, ADDR or :PORT") from None
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError(f"{spec!r}: port out of range")

    def matches(self, addrs: set[str], ports: set[int]) -> bool:
        return (self.addr is None or self.addr in addrs) and (self.port is None or self.port in ports)

    def matches_packet(self, packet: bytes) -> bool:
        version = packet[0] >> 4 if packet else None
        if version == 4 and len(packet) >= ipv4.HEADER_LEN:
            addrs = {str(ipaddress.IPv4Address(packet[ipv4.SRC_OFFSET:ipv4.SRC_OFFSET + ipv4.ADDRESS_LEN])),
                     str(ipaddress.IPv4Address(packet[ipv4.DST_OFFSET:ipv4.DST_OFFSET + ipv4.ADDRESS_LEN]))}
            protocol, upper = packet[ipv4.PROTOCOL_OFFSET], ipv4.header_len_of(packet)
        elif version == 6 and len(packet) >= ipv6.HEADER_LEN:
            addrs = {str(ipaddress.IPv6Address(packet[ipv6.SRC_OFFSET:ipv6.DST_OFFSET])),
                     str(ipaddress.IPv6Address(packet[ipv6.DST_OFFSET:ipv6.HEADER_LEN]))}
            # The lenient walk past any extension headers (None if they run past the end).
            found = ipv6.skip_extension_headers(memoryview(packet), packet[ipv6.NEXT_HEADER_OFFSET], ipv6.HEADER_LEN,
                                                len(packet))
            protocol, upper = found if found is not None else (ipv6.NO_NEXT_HEADER, len(packet))
        else:
            return False
        ports: set[int] = set()
        if protocol in (ipv4.PROTO_TCP, ipv4.PROTO_UDP) and len(packet) >= upper + PORTS_LEN:
            ports.update(_PORTS.unpack_from(packet, upper + SRC_PORT_OFFSET))  # TCP, UDP: ports lead the header
        return self.matches(addrs, ports)
