"""Events a TCP connection hands to its application (h11 style: small frozen values).

Each is emitted at most once per condition change, not once per segment:
``DataReceived`` again only after the application has called ``recv()``, ``SendSpace``
only after ``send()`` accepted less than it was offered.
"""

from __future__ import annotations

from dataclasses import dataclass


class Event:
    """Base class of every connection event."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Connected(Event):
    """The connection reached ESTABLISHED."""


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """New bytes are waiting in the receive buffer; read them with ``recv()``."""


@dataclass(frozen=True, slots=True)
class SendSpace(Event):
    """Send-buffer space opened after ``send()`` found it full (back-pressure release)."""


@dataclass(frozen=True, slots=True)
class PeerClosed(Event):
    """The peer's FIN arrived in order: end of stream once the buffer is drained."""


@dataclass(frozen=True, slots=True)
class Closed(Event):
    """Fully closed; the connection can be dropped. reason: closed, reset, timeout, aborted."""

    reason: str
