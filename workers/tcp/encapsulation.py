"""Our end of a TCP flow, per IP family, and the IP packet around each segment we send.

Contract: sans-IO helper of the demux and its listener. It knows our address
in each family and the configuration a connection of that family gets (over
IPv6 every segment carries 20 more bytes of IP header, so the MSS offered is
MTU - 60 against IPv4's MTU - 40, RFC 9293 §3.7.1), and wraps a
``TcpSegment`` in the IP header from our side of a flow (or, in attach mode,
from the relayed flow's destination) to its peer. With device offloads the
kernel finishes the checksum and cuts a large segment to the MSS (TSO/TSO6),
so the packet goes out with the virtio-net fields that ask for that.
"""

from __future__ import annotations

import dataclasses

from pipeline.flow import Flow
from pipeline.offload import tcp_offload
from pipeline.wire.ipv4 import PROTO_TCP
from pipeline.wire.tcp import HEADER_LEN as TCP_HEADER_LEN
from pipeline.wire.tcp import Flags, TcpSegment
from workers.core import IPV6_ADDRESS_LEN, Addresses, Outgoing, ip_reply, reply_header_len
from workers.tcp.config import TcpConfig

IPV6_EXTRA_HEADER = 20  # RFC 8200 §3: 40 bytes of IP header against IPv4's 20, so MSS = MTU - 60


class Encapsulation:
    """Our address and connection configuration by family; segments into IP packets."""

    def __init__(self, address: bytes, address6: bytes | None, config: TcpConfig, offload: bool) -> None:
        self.addresses = Addresses(address, address6)
        self.config4 = config
        self.config6 = dataclasses.replace(config, mss=config.mss - IPV6_EXTRA_HEADER)
        # With device offloads, the kernel finishes our checksums and cuts large
        # segments to the MSS (TSO): connections emit up to config.max_send_segment at once.
        self.offload = offload

    def config(self, remote: bytes) -> TcpConfig:
        """The configuration of a connection with ``remote``'s family."""
        return self.config6 if len(remote) == IPV6_ADDRESS_LEN else self.config4

    def local(self, key: Flow) -> bytes:
        """Our address in ``key``: the stack's own, or a relayed flow's destination (attach mode)."""
        return key.local or self.addresses.local(key.remote)

    def packet(self, key: Flow, seg: TcpSegment, mss: int | None = None, tos: int = 0) -> Outgoing:
        """The segment in an IP packet from our side of ``key`` to its peer (``mss``: the connection's, for TSO)."""
        remote = key.remote
        local = key.local or self.addresses.local(remote)
        # The TCP header apart from the payload: ip_reply then copies the payload once.
        if not self.offload:
            return ip_reply(local, remote, PROTO_TCP, seg.payload, tos,
                            transport_header=seg.emit_header(local, remote)), None
        tcp_header_len = seg.header_len
        segment_size = (mss or self.config(remote).mss) - (tcp_header_len - TCP_HEADER_LEN)
        return (ip_reply(local, remote, PROTO_TCP, seg.payload, tos,
                         transport_header=seg.emit_header(local, remote, checksum=False)),
                tcp_offload(reply_header_len(remote), tcp_header_len, len(seg.payload), segment_size,
                            bool(seg.flags & Flags.CWR), ipv6=len(remote) == IPV6_ADDRESS_LEN))
