"""Path MTU discovery against the real kernel (RFC 1191, RFC 8201).

The client sits behind a link narrower than both ends (576 for IPv4, 1280
for IPv6, see ``netns.narrow_path_client``): the stack's full-sized segments
can only get through once the kernel's ICMP errors, routed back through the
TUN device, have reached the TCP worker and lowered the connection's MSS.
"""

import hashlib
import socket

import pytest

from tests.integration.netns import Stack, narrow_path_client
from tests.integration.test_tcp_bulk import rfc864_stream

SIZE = 2 * 1024 * 1024
PATHS = {"ipv4-576": (socket.AF_INET, "10.0.0.2", 576, 576 - 40),
         "ipv6-1280": (socket.AF_INET6, "fd00::2", 1280, 1280 - 60)}


@pytest.mark.parametrize("path", PATHS)
def test_chargen_completes_over_a_narrow_link(fresh_ns, offload_env, path):
    af, address, mtu, mss = PATHS[path]
    middle, client = narrow_path_client(fresh_ns, mtu)
    stack = Stack(fresh_ns, env=offload_env)
    try:
        stack.wait_ready()
        sock = client.socket(af)
        sock.settimeout(30)
        with sock:
            sock.connect((address, 19))
            port = sock.getsockname()[1]
            got = bytearray()
            while len(got) < SIZE:
                chunk = sock.recv(1 << 20)
                assert chunk, "the stack closed early"
                got += chunk
        assert hashlib.sha256(got[:SIZE]).digest() == hashlib.sha256(rfc864_stream(SIZE)).digest()
        stack.wait_for(lambda recs: any(r["event"] == "tcp_pmtu" and r["rport"] == port for r in recs),
                       10, "the lowered path MTU in the log")
        [lowered] = [r for r in stack.records() if r["event"] == "tcp_pmtu" and r["rport"] == port]
        assert (lowered["mtu"], lowered["mss"]) == (mtu, mss)
    finally:
        stack.stop()
        client.delete()
        middle.delete()
