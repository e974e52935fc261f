"""The UDP services: what each port answers, as pure functions of the payload."""

from __future__ import annotations

from collections.abc import Callable

from workers.services.seed import reverse_line


def echo(payload: bytes) -> bytes:
    """Port 7, RFC 862: send back the datagram's data."""
    return payload


SERVICES: dict[int, Callable[[bytes], bytes]] = {8000: reverse_line, 7: echo}
