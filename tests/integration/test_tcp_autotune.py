"""Receive-buffer autotuning against the kernel's TCP: the window the stack advertises follows
what its application reads.

A fast sender into discard (port 9, which reads everything at once) sees the stack's window
grow well past the initial buffer, within TCP_RECV_BUFFER; a sender into a service that reads
a little per tick (a user service loaded from a temporary module) sees it stay at the initial
buffer however much it pushes through. Both see the window scale chosen from the maximum.
The stack's window is read where the kernel keeps it: tcpi_snd_wnd of the client's socket
(what ``ss -ti`` prints as snd_wnd). Only windows are compared, never speeds.
"""

import os
import socket
import struct
import textwrap
import time

import pytest

from tests.integration.netns import ROOT, STACK_ADDR
from tests.integration.svc_clients import running_stack
from workers.tcp.config import INITIAL_RECV_BUFFER
from workers.tcp.options import window_shift

RECV_BUFFER = 1 << 20  # TCP_RECV_BUFFER (its default): the most a connection may grow to
TRICKLE_PORT = 9100
# A reader of 2000 bytes per 10 ms tick: far less per round trip than half the initial buffer.
SERVICE = textwrap.dedent('''
    from workers.services.tcp import Service

    class Trickle(Service):
        """Reads 2000 bytes every 10 ms and throws them away."""

        def __init__(self, stream):
            super().__init__(stream)
            stream.set_timer(stream.now + 0.01)

        def on_timer(self):
            self.stream.recv(2000)
            self.stream.set_timer(self.stream.now + 0.01)
''')
GIVE_UP = 120.0  # seconds: only so that a broken stack fails instead of hanging


@pytest.fixture(scope="module")
def stack(ns, offload_env, tmp_path_factory):
    mod_dir = tmp_path_factory.mktemp("autotune")
    (mod_dir / "ustack_autotune_svc.py").write_text(SERVICE)
    env = {**offload_env, "TCP_RECV_BUFFER": str(RECV_BUFFER), "PYTHONPATH": os.pathsep.join([str(mod_dir), str(ROOT)]),
           "USTACK_SERVICES": f"tcp/{TRICKLE_PORT}=ustack_autotune_svc:Trickle"}
    with running_stack(ns, env=env) as s:
        yield s


def tcp_info(sock: socket.socket) -> tuple[int, int, int]:
    """The stack's window as the kernel last took it (tcpi_snd_wnd, scaled), the shift the
    stack announced (tcpi_snd_wscale) and the bytes it acknowledged (tcpi_bytes_acked)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512)
    assert len(info) >= 232, "this kernel's tcp_info is too old to have tcpi_snd_wnd"
    # <linux/tcp.h> struct tcp_info: the wscales share byte 6 (snd in the low nibble),
    # tcpi_bytes_acked is the u64 at 120, tcpi_snd_wnd the u32 at 228.
    return struct.unpack_from("<I", info, 228)[0], info[6] & 0x0F, struct.unpack_from("<Q", info, 120)[0]


def _connect(ns, port: int) -> socket.socket:
    sock = ns.socket()
    sock.settimeout(30)
    sock.connect((STACK_ADDR, port))
    return sock


def _reset(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): unread data at the stack is simply dropped."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _acked(sock: socket.socket, n: int) -> tuple[int, int, int]:
    """tcp_info once the stack has acknowledged n bytes (discard has read them by then)."""
    deadline = time.monotonic() + GIVE_UP
    while (info := tcp_info(sock))[2] < n:
        assert time.monotonic() < deadline, f"stuck at {info}"
        time.sleep(0.01)
    return info


def test_fast_reader_gets_a_window_that_grows_toward_the_maximum(ns, stack):
    with _connect(ns, 9) as sock:
        sock.sendall(b"x" * 1000)
        first, shift, _ = _acked(sock, 1000)
        # RFC 7323 §2.3: the scale comes from the maximum (the initial buffer alone would need 1) ...
        assert shift == window_shift(RECV_BUFFER) == 5
        assert first <= INITIAL_RECV_BUFFER  # ... and the buffer starts small
        block = os.urandom(1 << 20)
        for _ in range(32):
            sock.sendall(block)
        window, _, _ = _acked(sock, 1000 + 32 * len(block))
    # Discard reads everything at once: the last ACK offers the whole buffer, grown.
    assert 4 * INITIAL_RECV_BUFFER <= window <= RECV_BUFFER


def test_slow_reader_keeps_the_initial_window(ns, stack):
    sock = _connect(ns, TRICKLE_PORT)
    try:
        sock.setblocking(False)
        block = os.urandom(64 * 1024)
        windows = []
        deadline = time.monotonic() + GIVE_UP
        # Push until eight initial buffers' worth went into the slow reader's connection.
        while (info := tcp_info(sock))[2] < 8 * INITIAL_RECV_BUFFER:
            assert time.monotonic() < deadline, f"stuck at {info}"
            windows.append(info[0])
            try:
                sock.send(block)
            except BlockingIOError:
                time.sleep(0.005)
        assert info[1] == window_shift(RECV_BUFFER)  # the same scale as the fast reader's ...
        assert 0 < max(windows) <= INITIAL_RECV_BUFFER  # ... but the window stayed at the initial buffer
    finally:
        _reset(sock)
