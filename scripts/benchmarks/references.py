"""The kernel's reference servers on 127.0.0.1, run in a namespace as ``scripts/bench --kernel-servers``
and ``scripts/bench --kernel-http DIR``.

The stack's figures are read against these: the same clients drive them over
the kernel's loopback. (The other reference, ``scripts/minimal_responder.py``,
is a script of its own.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time

from .common import CHUNK, LOOPBACK, ROOT

BENCH = ROOT / "scripts" / "bench"  # what a namespace runs to start these servers (--kernel-servers, --kernel-http)
HTTP_REF_PORT = 8080  # python -m http.server on the kernel's loopback


def rfc864(n: int) -> bytes:
    """The first n bytes of the chargen stream (RFC 864)."""
    printable = bytes(range(32, 127))
    cycle = b"".join((printable * 2)[i:i + 72] + b"\r\n" for i in range(95))
    return (cycle * (n // len(cycle) + 1))[:n]


def kernel_servers() -> None:
    """Discard (9), chargen (19) and line reverse (8000) on 127.0.0.1, one thread per connection."""
    chargen = rfc864(CHUNK)

    def discard(conn: socket.socket) -> None:
        buf = bytearray(CHUNK)
        while conn.recv_into(buf):
            pass

    def chargen_(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn.sendall(chargen)

    def line(conn: socket.socket) -> None:
        pending = b""
        while data := conn.recv(65536):
            pending += data
            *lines, pending = pending.split(b"\n")
            if lines:
                conn.sendall(b"".join(ln[::-1] + b"\n" for ln in lines))

    def serve(port: int, handler) -> None:
        lst = socket.create_server((LOOPBACK, port), backlog=4096, reuse_port=False)
        while True:
            conn, _ = lst.accept()

            def run(conn=conn):
                with conn, contextlib.suppress(OSError):
                    handler(conn)
            threading.Thread(target=run, daemon=True).start()

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    for port, handler in ((9, discard), (19, chargen_), (8000, line)):
        threading.Thread(target=serve, args=(port, handler), daemon=True).start()
    print("kernel_servers: ready", flush=True)
    while True:
        time.sleep(3600)


def kernel_http(directory: str) -> None:
    """What `python -m http.server --bind 127.0.0.1 --directory DIR` runs (ThreadingHTTPServer,
    SimpleHTTPRequestHandler), with a listen backlog of 4096 instead of socketserver's 5: with 5,
    `ab -c 50` loses SYNs and waits out the kernel's SYN backoff, which measures the backlog, not HTTP."""
    import functools
    import http.server

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 4096

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server = Server((LOOPBACK, HTTP_REF_PORT), functools.partial(Quiet, directory=directory))
    print("kernel_http: ready", flush=True)
    server.serve_forever()
