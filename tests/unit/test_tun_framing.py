"""The macOS utun framing, with a fake socket (the real path is untested on macOS)."""

from pipeline import tun


class FakeSocket:
    def __init__(self, incoming):
        self.incoming = list(incoming)
        self.sent = []

    def setblocking(self, flag):
        pass

    def recv(self, n):
        if not self.incoming:
            raise BlockingIOError
        return self.incoming.pop(0)

    def send(self, data):
        self.sent.append(data)

    def fileno(self):
        return 99

    def close(self):
        pass


V4 = bytes([0x45]) + bytes(19)
V6 = bytes([0x60]) + bytes(39)


def test_frame_adds_family_by_ip_version():
    assert tun.utun_frame(V4)[:4] == b"\x00\x00\x00\x02"
    assert tun.utun_frame(V6)[:4] == b"\x00\x00\x00\x1e"


def test_unframe_rejects_short_and_unknown_family():
    assert tun.utun_unframe(b"\x00\x00") is None
    assert tun.utun_unframe(b"\x00\x00\x00\x07" + V4) is None
    assert tun.utun_unframe(b"\x00\x00\x00\x02" + V4) == V4


def test_device_reads_skip_bad_frames_and_writes_framed():
    sock = FakeSocket([b"\x00", b"\x00\x00\x00\x1e" + V6])
    dev = tun.MacUtun(sock, "utun7")
    assert dev.read() == (V6, None)
    assert dev.read() is None
    dev.write(V4)
    assert sock.sent == [b"\x00\x00\x00\x02" + V4]


def test_vnet_header_layout_matches_linux():
    from pipeline.offload import GSO_TCPV4, NEEDS_CSUM, VNET_HDR, tcp_offload

    assert VNET_HDR.size == 10
    off = tcp_offload(20, 32, 10_000, 1448)
    assert off == (NEEDS_CSUM, GSO_TCPV4, 52, 1448, 20, 16)
    assert tcp_offload(20, 20, 100, 1460)[1:4] == (0, 40, 0)  # fits one segment: no GSO


def test_descriptor_passing_shares_one_open_file(tmp_path):
    """What macOS egress and ingress use to share one utun socket; SCM_RIGHTS works alike on Linux."""
    import socket

    ours, theirs = socket.socketpair()
    path = str(tmp_path / "utun-ingress.sock")
    tun.serve_fd(path, ours.fileno())
    fd = tun.fetch_fd(path, timeout=2.0)
    assert fd is not None and fd != ours.fileno()
    shared = socket.socket(fileno=fd)
    shared.send(b"through the passed descriptor")
    assert theirs.recv(100) == b"through the passed descriptor"
    assert tun.fetch_fd(str(tmp_path / "nobody.sock"), timeout=0.1) is None
    for s in (ours, theirs, shared):
        s.close()


# IPv6 on utun: address family 30 (AF_INET6 in macOS <sys/socket.h>).


def _ipv6_packets() -> list[bytes]:
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop

    return [
        bytes(IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(id=1, seq=2, data=b"x" * 56)),
        bytes(IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / UDP(dport=7) / b"e"),
    ]


def test_ipv6_packets_round_trip_through_family_30():
    from pipeline.wire import ipv6

    for packet in _ipv6_packets():
        framed = tun.utun_frame(packet)
        assert framed[:4] == tun.AF_HEADER.pack(tun.DARWIN_AF_INET6) == b"\x00\x00\x00\x1e"
        assert tun.utun_unframe(framed) == packet
        assert ipv6.parse(tun.utun_unframe(framed)).error is None


def test_other_systems_ipv6_family_numbers_are_not_macos():
    # AF_INET6 is 10 on Linux, 24 on OpenBSD/NetBSD, 28 on FreeBSD: only 30 is macOS's.
    packet = _ipv6_packets()[0]
    for family in (10, 24, 28):
        assert tun.utun_unframe(tun.AF_HEADER.pack(family) + packet) is None
    # The header is network byte order: 30 little-endian is another number.
    assert tun.utun_unframe(b"\x1e\x00\x00\x00" + packet) is None


def test_device_reads_mixed_families_and_frames_ipv6_fragments():
    from pipeline.fragments import fragment_ipv6

    v6 = _ipv6_packets()
    sock = FakeSocket([b"\x00\x00\x00\x1e" + v6[0], b"\x00\x00\x00\x1c" + v6[1], b"\x00\x00\x00\x02" + V4,
                       b"\x00\x00\x00\x1e" + v6[1]])
    dev = tun.MacUtun(sock, "utun3")
    assert dev.read() == (v6[0], None)
    assert dev.read() == (V4, None)  # the FreeBSD-numbered frame was skipped
    assert dev.read() == (v6[1], None)
    assert dev.read() is None
    big = bytes(v6[0][:4]) + (3000 - 40).to_bytes(2, "big") + v6[0][6:40] + bytes(3000 - 40)
    fragments = fragment_ipv6(big, 1280, ident=7)
    for fragment in fragments:
        dev.write(fragment)
    assert [frame[:4] for frame in sock.sent] == [b"\x00\x00\x00\x1e"] * len(fragments)
    assert [frame[4:] for frame in sock.sent] == fragments


def test_a_frame_of_only_the_family_header_is_an_empty_packet():
    # recv() of exactly 4 bytes: nothing for ingress to parse; its checked parse counts it as truncated.
    assert tun.utun_unframe(b"\x00\x00\x00\x1e") == b""


def _linux_tun_over(fd: int, offload: bool) -> tun.LinuxTun:
    """A LinuxTun whose descriptor is one end of a datagram socket pair (one read, one packet, as on TUN)."""
    device = tun.LinuxTun.__new__(tun.LinuxTun)
    device.name, device.offload, device._fd = "pair0", offload, fd
    return device


def test_linux_reads_drop_the_vnet_header_and_large_packets_are_fresh_views():
    import socket

    from pipeline.offload import VNET_HDR

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    b.setblocking(False)
    with a, b:
        device = _linux_tun_over(b.fileno(), offload=True)
        gso = (1, 1, 52, 1448, 20, 16)
        small = V4 + b"s" * 100
        large1, large2 = V4 + b"1" * 60000, V4 + b"2" * 60000
        a.send(VNET_HDR.pack(0, 0, 0, 0, 0, 0) + small)
        a.send(VNET_HDR.pack(*gso) + large1)
        a.send(VNET_HDR.pack(*gso) + large2)
        first, second, third = device.read(), device.read(), device.read()
        assert device.read() is None  # nothing waiting: non-blocking
        assert first == (small, None) and type(first[0]) is bytes  # short: sliced
        assert isinstance(second[0], memoryview) and second[1] == gso  # long: a view, no copy
        # Each read's view is of its own bytes: the next read changed nothing in it.
        assert bytes(second[0]) == large1 and bytes(third[0]) == large2
        a.send(large1)
        assert _linux_tun_over(b.fileno(), offload=False).read() == (large1, None)
