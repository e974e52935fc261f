"""20 MB transfers against the kernel's TCP: into discard, out of chargen, through echo.

Into discard and out of chargen run over both families; each runs clean, with 5 % random loss in each direction, and behind a token
bucket bottleneck; each must arrive intact (length and SHA-256) in bounded
time. A socket that sees no progress for STALL seconds fails the test.
"""

import concurrent.futures
import hashlib
import socket
import time

import pytest

from tests.integration.netns import STACK_ADDR, Stack
from tests.integration.network_conditions import CONDITIONS

SIZE = 20 * 1024 * 1024
STALL = 30.0


@pytest.fixture(scope="module")
def stack(ns, offload_env):
    s = Stack(ns, env=offload_env)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def _payload() -> bytes:
    block = hashlib.sha512(b"ustack bulk").digest() * 1024  # 64 KiB, not compressible to a pattern we send
    return (block * (SIZE // len(block) + 1))[:SIZE]


def rfc864_stream(n: int) -> bytes:
    """The chargen stream, built here independently of the service's code."""
    printable = bytes(range(32, 127))
    lines = [(printable * 2)[i:i + 72] + b"\r\n" for i in range(95)]
    cycle = b"".join(lines)
    return (cycle * (n // len(cycle) + 1))[:n]


def _connect(client, port, family=None):
    sock = client.socket(family.af if family else socket.AF_INET)
    sock.settimeout(STALL)
    sock.connect((family.stack if family else STACK_ADDR, port))
    return sock


def _read_exactly_or_eof(sock, limit: int | None = None) -> bytes:
    chunks, got = [], 0
    while limit is None or got < limit:
        chunk = sock.recv(min(1 << 20, (limit - got) if limit else 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _closed_record(stack, port, after):
    def found(recs):
        return [r for r in recs if r["event"] == "tcp_closed" and r["lport"] == port and r["rport"] == after]
    stack.wait_for(lambda recs: found(recs), 30, f"tcp_closed for port {port}")
    return found(stack.records())[0]


@pytest.mark.parametrize("condition", CONDITIONS)
def test_bulk_into_discard(ns, client, stack, condition, family):
    data = _payload()
    with CONDITIONS[condition](ns):
        with _connect(client, 9, family) as sock:
            port = sock.getsockname()[1]
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""  # our FIN comes only after every byte was taken in order
    closed = _closed_record(stack, 9, port)
    assert closed["bytes_received"] == SIZE


@pytest.mark.parametrize("condition", CONDITIONS)
def test_bulk_out_of_chargen(ns, client, stack, condition, family):
    with CONDITIONS[condition](ns):
        with _connect(client, 19, family) as sock:
            got = _read_exactly_or_eof(sock, SIZE)
    assert len(got) == SIZE
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(rfc864_stream(SIZE)).hexdigest()


@pytest.mark.parametrize("condition", CONDITIONS)
def test_bulk_through_echo(ns, client, stack, condition):
    data = _payload()
    with CONDITIONS[condition](ns):
        with _connect(client, 7) as sock, concurrent.futures.ThreadPoolExecutor(1) as pool:
            reader = pool.submit(_read_exactly_or_eof, sock)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            echoed = reader.result(timeout=600)
    assert len(echoed) == SIZE
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(data).hexdigest()


def test_receiver_that_stops_reading_closes_and_reopens_the_window(client, stack):
    with _connect(client, 19) as sock:
        port = sock.getsockname()[1]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        first = _read_exactly_or_eof(sock, 1 << 20)
        time.sleep(3)  # the client pauses: its window fills and closes, ours probes
        rest = _read_exactly_or_eof(sock, 4 << 20)
    got = first + rest
    assert got == rfc864_stream(len(got)) and len(got) == 5 << 20
    closed = _closed_record(stack, 19, port)
    assert closed["zero_window_probes"] >= 1
