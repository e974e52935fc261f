"""The virtio-net header that travels with each packet when the TUN device has offloads.

Fields (``<linux/virtio_net.h>``, native byte order): flags, gso_type,
hdr_len, gso_size, csum_start, csum_offset. On the bus a packet's header
travels as this 6-tuple (or None when it is all zero); ``pipeline.tun``
packs and unpacks it at the device.
"""

from __future__ import annotations

import struct

VNET_HDR = struct.Struct("=BBHHHH")
NO_VNET_HDR = VNET_HDR.pack(0, 0, 0, 0, 0, 0)

NEEDS_CSUM = 1   # only the pseudo-header sum is in the checksum field: finish it
DATA_VALID = 2   # the kernel already verified the checksum
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
# The segment carries CWR: the kernel keeps it on the first of the cut segments only (RFC 3168 §6.1.2).
GSO_ECN = 0x80

Offload = tuple[int, int, int, int, int, int]

_TCP_CHECKSUM_OFFSET = 16


def checksum_vouched(offload: Offload | None) -> bool:
    """True if the device says the transport checksum needs no verifying.

    Packets the local kernel hands over with NEEDS_CSUM carry only the
    pseudo-header sum in the checksum field: verifying it would reject them.
    """
    return offload is not None and offload[0] & (NEEDS_CSUM | DATA_VALID) != 0


def tcp_offload(ip_header_len: int, tcp_header_len: int, payload_len: int, segment_size: int,
                cwr: bool = False, ipv6: bool = False) -> Offload:
    """Ask the kernel to finish the TCP checksum and, if the payload is larger than
    ``segment_size``, to cut it into segments of that size (TSO, or TSO6 over IPv6)."""
    gso = payload_len > segment_size
    gso_type = ((GSO_TCPV6 if ipv6 else GSO_TCPV4) | (GSO_ECN if cwr else 0)) if gso else GSO_NONE
    return (NEEDS_CSUM, gso_type, ip_header_len + tcp_header_len,
            segment_size if gso else 0, ip_header_len, _TCP_CHECKSUM_OFFSET)
