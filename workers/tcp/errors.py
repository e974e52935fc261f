"""The error the TCP connection raises when its caller misuses it.

Kept apart from the connection so that the connection can be compiled
(mypyc cannot compile a subclass of ``RuntimeError``); import it from
:mod:`workers.tcp.connection`, which re-exports it.
"""

from __future__ import annotations


class InvalidOperation(RuntimeError):
    """The application called something the connection's state does not allow."""
