"""Wire codecs: one checked parse per protocol, then infallible values.

Every codec raises :class:`Malformed` (and nothing else) on bytes it cannot
accept; callers count the drop by ``reason`` and move on.
"""


class Malformed(ValueError):
    """Untrusted bytes failed a check; ``reason`` is a short counter name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def as_view(data: bytes | bytearray | memoryview) -> memoryview:
    """data as a memoryview (itself if it is one): views slice without copying."""
    return data if isinstance(data, memoryview) else memoryview(data)
