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
