#!/usr/bin/env python3
"""The floor for any Python design: one process, one TUN device, no bus.

Opens its own TUN device, gives the kernel side its address, then reads one
packet at a time and answers in place:

- ICMP echo request (RFC 792) -> echo reply: swap the IPv4 addresses, set the
  type to 0 and update the ICMP checksum incrementally (RFC 1624 §3, eqn. 3);
- UDP to port 7 (RFC 862) -> the same datagram back: swap addresses and ports.
  Both swaps leave every checksum as it was (the one's-complement sum is
  commutative, and the pseudo-header holds both addresses), so nothing to fix;

and writes the packet back. Everything else is ignored. Nothing is verified
beyond what is needed to answer: this measures the cost of a Python process
reading and writing a TUN device, not of a stack. Used by ``scripts/bench``
as the reference for ping and UDP echo; run it only inside a network
namespace you made (it configures the device it creates).

    python3 scripts/minimal_responder.py [--dev usmin0] [--host 10.0.0.1/24] [--addr 10.0.0.2]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys

_TUNSETIFF = 0x400454CA      # <linux/if_tun.h>
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IFREQ = struct.Struct("16sH")
_PROTO_ICMP = 1
_PROTO_UDP = 17
_ECHO_PORT = 7
_U16 = struct.Struct("!H")


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, _TUNSETIFF, _IFREQ.pack(name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


def echo_reply_checksum(checksum: int) -> int:
    """The ICMP checksum after the type word goes from 0x0800 to 0x0000 (RFC 1624 §3, eqn. 3)."""
    # HC' = ~(~HC + ~m + m') with m = 0x0800, m' = 0x0000, in one's-complement arithmetic.
    total = (~checksum & 0xFFFF) + (~0x0800 & 0xFFFF)
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def answer(packet: bytearray, length: int, addr: bytes) -> bool:
    """Turn the request in packet[:length] into its reply in place; False when it gets no answer."""
    if length < 20 or packet[0] >> 4 != 4 or packet[16:20] != addr:
        return False
    ihl = (packet[0] & 0x0F) * 4
    proto = packet[9]
    if proto == _PROTO_ICMP:
        if length < ihl + 8 or packet[ihl] != 8 or packet[ihl + 1] != 0:
            return False
        packet[ihl] = 0
        (checksum,) = _U16.unpack_from(packet, ihl + 2)
        _U16.pack_into(packet, ihl + 2, echo_reply_checksum(checksum))
    elif proto == _PROTO_UDP:
        if length < ihl + 8 or packet[ihl + 2:ihl + 4] != b"\x00\x07":
            return False
        packet[ihl:ihl + 4] = packet[ihl + 2:ihl + 4] + packet[ihl:ihl + 2]
    else:
        return False
    packet[12:20] = packet[16:20] + packet[12:16]  # the header checksum is unchanged by the swap
    return True


def serve(fd: int, addr: bytes) -> None:
    buf = bytearray(65535)
    view = memoryview(buf)
    bufs = [buf]
    read, write = os.readv, os.write
    while True:
        n = read(fd, bufs)  # one packet per read, into the same buffer: no allocation per packet
        if answer(buf, n, addr):
            write(fd, view[:n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dev", default="usmin0")
    parser.add_argument("--host", default="10.0.0.1/24", help="the kernel side's address/prefix")
    parser.add_argument("--addr", default="10.0.0.2", help="the address answered for")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fd = open_tun(args.dev)
    subprocess.run(["ip", "addr", "add", args.host, "dev", args.dev], check=True)
    subprocess.run(["ip", "link", "set", args.dev, "up"], check=True)
    print(f"minimal_responder: ready on {args.dev} for {args.addr}", flush=True)
    try:
        serve(fd, socket.inet_aton(args.addr))
    except KeyboardInterrupt:
        pass
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
