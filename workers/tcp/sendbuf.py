"""The send buffer: bytes the application queued, from the oldest unacknowledged octet on.

A single bytearray that frees its front on every ACK and grows at its end
moves its whole contents back to the start whenever the end reaches the
allocation (with 1 MiB in flight, about a megabyte moved for every 128 KiB
queued), and cutting a segment from it took two copies (slice, bytes).
Here the data lives in chunks of at most ``CHUNK`` octets that never move:
appending fills the last chunk, then starts another; an ACK drops whole
chunks and otherwise only moves an offset into the first.  Reading a
segment copies its octets once, joining two chunks when it straddles them.
"""

from __future__ import annotations

from typing import Final

CHUNK: Final = 64 * 1024


class SendBuffer:
    __slots__ = ("chunks", "head", "size")

    def __init__(self) -> None:
        self.chunks: list[bytearray] = []
        self.head = 0  # octets of chunks[0] already released
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        chunks = self.chunks
        taken = 0
        total = len(view)
        if chunks:
            tail = chunks[-1]
            room = CHUNK - len(tail)
            if room > 0:
                taken = min(room, total)
                tail += view[:taken]
        while taken < total:
            end = min(total, taken + CHUNK)
            chunks.append(bytearray(view[taken:end]))
            taken = end
        self.size += total

    def read(self, offset: int, n: int) -> bytes:
        """Octets offset .. offset + n of the buffer (the caller keeps within it)."""
        pos = offset + self.head
        chunks = self.chunks
        i = 0
        while pos >= len(chunks[i]):
            pos -= len(chunks[i])
            i += 1
        chunk = chunks[i]
        if pos + n <= len(chunk):
            return bytes(memoryview(chunk)[pos:pos + n])
        parts: list[memoryview] = []
        while n > 0:
            piece = memoryview(chunks[i])[pos:pos + n]
            parts.append(piece)
            n -= len(piece)
            pos = 0
            i += 1
        return b"".join(parts)

    def release(self, n: int) -> None:
        """Drop the first n octets (acknowledged)."""
        n = min(n, self.size)
        self.size -= n
        head = self.head + n
        chunks = self.chunks
        dropped = 0
        while dropped < len(chunks) and head >= len(chunks[dropped]):
            head -= len(chunks[dropped])
            dropped += 1
        if dropped:
            del chunks[:dropped]
        self.head = head
        if not self.size:
            self.clear()

    def clear(self) -> None:
        self.chunks.clear()
        self.head = 0
        self.size = 0
