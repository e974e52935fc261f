"""Helpers of the service tests: a stack started for one module, and a raw TCP exchange."""

import contextlib

from tests.integration.netns import STACK_ADDR, Namespace, Stack


@contextlib.contextmanager
def running_stack(ns: Namespace, *honcho_args: str, env: dict[str, str] | None = None,
                  roles: dict[str, int] | None = None):
    """`honcho start` in ``ns`` until the body ends."""
    s = Stack(ns, *honcho_args, env=env)
    try:
        s.wait_ready(roles)
        yield s
    finally:
        s.stop()


def exchange(ns: Namespace, port: int, payload: bytes, timeout: float = 15) -> bytes:
    """Connect to the stack, send ``payload``, and return everything it sends until it closes."""
    with ns.socket() as sock:
        sock.settimeout(timeout)
        sock.connect((STACK_ADDR, port))
        sock.sendall(payload)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        return got
