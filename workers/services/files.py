"""The file system side of the HTTP service: the only code of it that touches files or the clock.

Contract: :class:`FileStore` answers for one root directory. ``lookup`` takes
URL path segments that the HTTP service already decoded and checked, and
returns an :class:`Entry` only for a regular file or a directory whose real
path (every symlink resolved) is inside the root: ``..`` segments, NUL
bytes, separators inside a segment and symlinks that lead out all give None.
``open`` returns a :class:`FileReader` for a byte range, read in chunks the
service pulls as the connection's send buffer drains, so a file is never
read whole.
"""

from __future__ import annotations

import mimetypes
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass

_TYPES = mimetypes.MimeTypes()  # the built-in table plus the system's mime.types, read once


@dataclass(frozen=True, slots=True)
class Entry:
    path: str          # real path, inside the root
    is_dir: bool
    size: int
    mtime: float
    content_type: str


class FileReader:
    """Sequential reads of ``length`` bytes from ``start`` of an open file."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        self._file = os.fdopen(fd, "rb", buffering=0)
        self._file.seek(start)
        self.remaining = length

    def read(self, max_bytes: int) -> bytes:
        """Up to max_bytes of what is left; b"" at the end (or if the file shrank under us)."""
        if self.remaining <= 0:
            return b""
        data = self._file.read(min(max_bytes, self.remaining))
        self.remaining -= len(data)
        return data

    def close(self) -> None:
        self._file.close()


class FileStore:
    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def lookup(self, segments: Sequence[str]) -> Entry | None:
        """The regular file or directory at ``segments`` below the root, or None."""
        for seg in segments:
            if seg in ("", ".", "..") or "/" in seg or "\0" in seg:
                return None
        real = os.path.realpath(os.path.join(self.root, *segments))
        if real != self.root and not real.startswith(self.root + os.sep):
            return None  # a symlink out of the root
        try:
            st = os.stat(real)
        except (OSError, ValueError):
            return None
        if stat.S_ISDIR(st.st_mode):
            return Entry(real, True, 0, st.st_mtime, "text/html; charset=utf-8")
        if not stat.S_ISREG(st.st_mode):
            return None  # devices, FIFOs, sockets are not served
        content_type, _ = _TYPES.guess_type(real, strict=False)
        return Entry(real, False, st.st_size, st.st_mtime, content_type or "application/octet-stream")

    def open(self, entry: Entry, start: int, length: int) -> FileReader | None:
        """A reader of the byte range, or None if the file cannot be opened now."""
        try:
            # O_NOFOLLOW: the real path has no symlink left; one swapped in since is refused.
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        return FileReader(fd, start, length)

    def listing(self, directory: Entry) -> list[tuple[str, bool]]:
        """(name, is a directory) of each entry, sorted; empty if it cannot be read."""
        try:
            with os.scandir(directory.path) as it:
                return sorted((e.name, e.is_dir()) for e in it)
        except OSError:
            return []

    def wall_clock(self) -> float:
        """Seconds since the epoch, for the Date header."""
        return time.time()
