"""TCP services, written once against a small stream interface.

A service gets a :class:`Stream` per accepted connection and is told when the
stream is readable, writable again, or finished by the peer. Back-pressure is
explicit: ``Stream.send`` takes only what the send buffer has room for, and a
service holding unsent output stops reading, so the receive window closes
and the peer slows down instead of the worker buffering without bound.

Services: 8000 the seed's line service (each line reversed), 7 echo
(RFC 862), 9 discard (RFC 863), 17 quote of the day (RFC 865: the server
sends and closes first), 19 chargen (RFC 864).
"""

from __future__ import annotations

from typing import Protocol

from workers.services.seed import reverse_line


class Stream(Protocol):
    """What a service may do with its connection (the worker's is ``hosting.HostedStream``).

    ``send`` takes what the send buffer has room for and returns how many bytes
    it took (0: full; ``on_writable`` follows when room opens). ``close`` sends
    FIN after everything queued; ``abort`` resets at once. ``now`` is the time
    of the event being handled; ``set_timer(deadline)`` asks for one
    ``on_timer`` call at that time (None cancels).
    """

    now: float

    @property
    def readable(self) -> int:
        """Bytes received and not yet read."""
    def recv(self, max_bytes: int = -1) -> bytes: ...
    def send(self, data: bytes | bytearray | memoryview) -> int: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def set_timer(self, deadline: float | None) -> None: ...


class Service:
    """Base class: a service reacts to its stream's readiness.

    The default ending is the polite one: once the peer has finished (FIN),
    everything it sent has been read and every answer is out, close too.
    """

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.pending = b""   # output the send buffer had no room for yet
        self.eof = False     # the peer has finished sending
        self.closed = False  # we called close()

    def on_readable(self) -> None:
        """New bytes can be read."""

    def on_writable(self) -> None:
        """Send-buffer space opened up: flush held output, then resume reading."""
        if self._flush():
            self.on_readable()
        self._maybe_finish()

    def on_eof(self) -> None:
        """The peer finished sending (FIN): read what is left, then finish."""
        self.eof = True
        self.on_readable()
        self._maybe_finish()

    def on_timer(self) -> None:
        """The deadline given to ``stream.set_timer`` has come."""

    def on_closed(self) -> None:
        """The connection is gone (closed, reset, timed out or aborted); the stream is dead."""

    def write(self, data: bytes) -> bool:
        """Send or hold ``data``; True if nothing is held back."""
        self.pending += data
        return self._flush()

    def finish(self) -> None:
        """Close once held output is out (services that end the conversation themselves)."""
        self.eof = True
        self._maybe_finish()

    def _flush(self) -> bool:
        if self.pending:
            sent = self.stream.send(self.pending)
            self.pending = self.pending[sent:]
        return not self.pending

    def _maybe_finish(self) -> None:
        if self.eof and not self.closed and not self.pending and not self.stream.readable:
            self.closed = True
            self.stream.close()


class Echo(Service):
    """RFC 862: everything received is sent back."""

    def on_readable(self) -> None:
        while not self.pending:
            data = self.stream.recv()
            if not data:
                return
            self.write(data)


class Discard(Service):
    """RFC 863: everything received is thrown away."""

    def on_readable(self) -> None:
        while self.stream.recv():
            pass


# RFC 864: 72-character lines of the 95 printable ASCII characters, each line
# starting one character further along; the pattern repeats every 95 lines.
_PRINTABLE = bytes(range(32, 127))
_CHARGEN = b"".join((_PRINTABLE * 2)[i:i + 72] + b"\r\n" for i in range(95))


class Chargen(Service):
    """RFC 864: a stream of characters for as long as the peer reads; input is discarded."""

    CHUNK = 64 * 1024

    def __init__(self, stream: Stream) -> None:
        super().__init__(stream)
        self.offset = 0
        # A view: each chunk goes straight into the send buffer, not through a slice copy first.
        self._pattern = memoryview(_CHARGEN * (self.CHUNK // len(_CHARGEN) + 2))
        self.on_writable()

    def on_readable(self) -> None:
        while self.stream.recv():
            pass

    def on_writable(self) -> None:
        while not self.eof:
            chunk = self._pattern[self.offset:self.offset + self.CHUNK]
            sent = self.stream.send(chunk)
            if not sent:
                return
            self.offset = (self.offset + sent) % len(_CHARGEN)
        self._maybe_finish()


class QuoteOfTheDay(Service):
    """RFC 865: send a short message and close; input is discarded."""

    QUOTE = b"Be conservative in what you do, be liberal in what you accept from others. (RFC 761)\r\n"

    def __init__(self, stream: Stream) -> None:
        super().__init__(stream)
        self.write(self.QUOTE)
        self.finish()

    def on_readable(self) -> None:
        while self.stream.recv():
            pass


class LineReverser(Service):
    """Port 8000, the seed's service: each received line answered reversed, plus a newline.

    Lines may be split across segments any way at all; a partial line waits
    for its end. A line longer than MAX_LINE is answered in pieces rather than
    held without bound.
    """

    MAX_LINE = 64 * 1024

    def __init__(self, stream: Stream) -> None:
        super().__init__(stream)
        self.partial = b""

    def on_readable(self) -> None:
        while not self.pending:
            data = self.stream.recv()
            if not data:
                return
            buf = self.partial + data
            *lines, self.partial = buf.split(b"\n")
            if len(self.partial) > self.MAX_LINE:
                lines.append(self.partial)
                self.partial = b""
            if lines:
                self.write(b"".join(reverse_line(line) for line in lines))

    def on_eof(self) -> None:
        self.eof = True
        self.on_readable()
        if self.partial and not self.stream.readable:  # a last line without its newline is still a line
            self.write(reverse_line(self.partial))
            self.partial = b""
        self._maybe_finish()


SERVICES: dict[int, type[Service]] = {8000: LineReverser, 7: Echo, 9: Discard, 17: QuoteOfTheDay, 19: Chargen}
