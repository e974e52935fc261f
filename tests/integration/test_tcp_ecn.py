"""ECN (RFC 3168) against the kernel's TCP with net.ipv4.tcp_ecn=1.

The router namespace marks Congestion Experienced on a share of the
forwarded ECT(0) packets, in the direction the data flows. Into discard: the
kernel's data arrives marked and our receiver must echo ECE until its CWR.
Out of chargen: only if we send data as ECT(0) can the router mark it, and
only if the kernel then sees CE does it echo ECE back to our sender, which
must react (once per window) without losing a byte.
"""

import hashlib
import socket

import pytest

from tests.integration.network_conditions import ce_marks
# The stack without debug logging, as the bulk tests run it.
from tests.integration.test_tcp_bulk import (  # noqa: F401 (stack is a fixture)
    _closed_record, _connect, _payload, _read_exactly_or_eof, rfc864_stream, stack)

SIZE = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def ecn_client(client):
    client.run("sysctl", "-qw", "net.ipv4.tcp_ecn=1")  # ask for ECN on active opens (RFC 3168 §6.1.1)
    return client


def test_ce_marks_on_incoming_data_are_echoed(ns, ecn_client, stack):
    data = _payload()[:SIZE]
    with ce_marks(ns, 5), _connect(ecn_client, 9) as sock:
        port = sock.getsockname()[1]
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    closed = _closed_record(stack, 9, port)
    assert closed["bytes_received"] == SIZE
    assert closed["ce_received"] > 0  # the kernel sent ECT(0) data: ECN was negotiated


def test_our_data_is_ect_and_the_kernels_ece_is_honoured(ns, ecn_client, stack):
    with ce_marks(ns, 5), _connect(ecn_client, 19) as sock:
        port = sock.getsockname()[1]
        got = _read_exactly_or_eof(sock, SIZE)
    assert hashlib.sha256(got).digest() == hashlib.sha256(rfc864_stream(SIZE)).digest()
    closed = _closed_record(stack, 19, port)
    assert closed["ece_received"] > 0  # CE was set on our ECT(0) data and echoed back
