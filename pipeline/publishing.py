"""The table of published ports (attach mode) as ingress keeps it while the stack runs.

Contract: ``USTACK_PUBLISH`` is the table at start; ``stackctl publish add`` and
``remove`` change it while the stack runs, and ingress (``pipeline.ingress``)
sends the whole table to every TCP and UDP worker after each change and to
each worker that joins; the workers diff it against what they listen on
(``workers.attach.inbound``). :class:`PublishTable` checks each change -- the
text (``relay_config.parse_publish``), a port already published for its
protocol, a port in use where the stack runs (the caller's ``in_use`` probe,
:func:`port_in_use`) -- and raises :class:`PublishError` with the reason
stackctl prints. It does no I/O itself.

A restarted ingress (its respawn wrapper restarts it after a crash) keeps
the run-time table: every change is written to ``published.json`` in the run
directory with the id of the stack that wrote it (the ``stack`` file of
``pipeline.stacklock``), and an ingress that starts takes the file only if
that id is its own stack's. A fresh start of a stack has a new id, so it
begins from USTACK_PUBLISH (a file a killed stack left behind is ignored and
removed); ingress removes the file when it exits cleanly, which it does only
when the stack stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterable

from pipeline import stacklock
from pipeline.relay_config import parse_publish

FILE = "published.json"

# (protocol, port where the stack runs, port in the namespace, index of that namespace: a stack may
# be the network of several, pipeline.attachments; a port where the stack runs goes to one of them).
Row = tuple[str, int, int, int]


class PublishError(ValueError):
    """A change the table refuses; the message says why (stackctl prints it)."""


def text(row: Row) -> str:
    """The row as USTACK_PUBLISH and stackctl write it: "tcp:8080:80"."""
    return f"{row[0]}:{row[1]}:{row[2]}"


def record(row: Row, ns: str = "") -> dict[str, object]:
    """The row as stackctl's JSON and the log records say it (``ns``: the namespace's name)."""
    return {"proto": row[0], "port": row[1], "to_port": row[2], "ns": ns}


class PublishTable:
    """(protocol, port where the stack runs) -> (port in the namespace, index of the namespace)."""

    def __init__(self, rows: Iterable[Row] = ()) -> None:
        self.ports: dict[tuple[str, int], tuple[int, int]] = {(proto, port): (to_port, ns)
                                                             for proto, port, to_port, ns in rows}

    def rows(self) -> list[Row]:
        return sorted((proto, port, to_port, ns) for (proto, port), (to_port, ns) in self.ports.items())

    def add(self, item: str, in_use: Callable[[str, int], str | None], ns: int = 0) -> Row:
        """Publish ``item`` ("tcp:8080:80") into namespace ``ns``; PublishError if it is malformed,
        taken or in use."""
        proto, port, to_port = _parse(item)
        held = self.ports.get((proto, port))
        if held is not None:
            raise PublishError(f"{proto} port {port} is already published (to {held[0]}): remove it first")
        why = in_use(proto, port)
        if why is not None:
            raise PublishError(f"{proto} port {port} is in use where the stack runs: {why}")
        self.ports[(proto, port)] = (to_port, ns)
        return proto, port, to_port, ns

    def remove(self, item: str) -> Row:
        """Unpublish ``item`` ("tcp:8080:80"); PublishError unless it is published just so."""
        proto, port, to_port = _parse(item)
        held = self.ports.get((proto, port))
        if held is None:
            raise PublishError(f"{proto} port {port} is not published")
        if held[0] != to_port:
            raise PublishError(f"{proto} port {port} is published to {held[0]}, not {to_port}")
        del self.ports[(proto, port)]
        return proto, port, to_port, held[1]

    def drop_namespace(self, ns: int) -> list[Row]:
        """A namespace is detached: its ports go with it."""
        gone = [row for row in self.rows() if row[3] == ns]
        for proto, port, _, _ in gone:
            del self.ports[(proto, port)]
        return gone


def _parse(item: str) -> tuple[str, int, int]:
    try:
        return parse_publish(item)
    except ValueError as exc:
        raise PublishError(str(exc)) from None


def port_in_use(proto: str, port: int) -> str | None:
    """Why ``port`` cannot be published where this process runs (None: it can): a bind() as the
    workers' listeners make, on the dual-stack wildcard, but without SO_REUSEPORT (which would
    share the port with another listener of the same user)."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET6, kind) as probe:
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if kind == socket.SOCK_STREAM:
            # Ends of connections accepted earlier on the port (TIME-WAIT, or still open after a
            # remove) do not make it busy; a listener does (Linux).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("::", port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


# -- the file in the run directory ---------------------------------------------------------

def stack_id(run_dir: str) -> str | None:
    """The id of the stack that owns ``run_dir`` (its stack file), None if there is none."""
    try:
        with open(os.path.join(run_dir, stacklock.STACK_FILE)) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    value = holder.get("id") if isinstance(holder, dict) else None
    return value if isinstance(value, str) else None


def load(run_dir: str, stack: str | None, at_start: Iterable[Row]) -> tuple[PublishTable, bool]:
    """The table an ingress starts with, and whether it was restored: the file of this stack (a
    restarted ingress), else ``at_start`` (USTACK_PUBLISH), removing a file another stack left."""
    path = os.path.join(run_dir, FILE)
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = None
    if stack is not None and isinstance(saved, dict) and saved.get("stack") == stack:
        try:
            return PublishTable(_row(row) for row in saved.get("table", [])), True
        except (ValueError, TypeError):
            pass  # not ours after all: start afresh
    if saved is not None:
        discard(run_dir)
    return PublishTable(at_start), False


def _row(row: object) -> Row:
    if not (isinstance(row, list) and len(row) == 4 and all(isinstance(v, (str, int)) for v in row)
            and isinstance(row[3], int) and row[3] >= 0):
        raise ValueError("bad row")
    return (*parse_publish(f"{row[0]}:{row[1]}:{row[2]}"), row[3])


def save(run_dir: str, stack: str | None, table: PublishTable) -> None:
    """Write the table for a restarted ingress (atomically: a crash leaves the old file or the new)."""
    path = os.path.join(run_dir, FILE)
    temporary = path + ".new"
    with open(temporary, "w") as f:
        json.dump({"stack": stack, "table": [list(row) for row in table.rows()]}, f)
    os.replace(temporary, path)


def discard(run_dir: str) -> None:
    """The stack stops (or a stale file is found): no table to keep."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(run_dir, FILE))
