"""Structured logging: one JSON object per line on stdout (structlog).

Each record has an ISO-8601 UTC ``timestamp``, ``level``, ``event`` and
``proc`` (the honcho process name). ``LOG_FORMAT=console`` renders readable
lines for a person; ``LOG_LEVEL`` sets the level; ``LOG_PAYLOAD=1`` adds
packet payloads to the debug packet records (never otherwise). This module
takes them checked, with their defaults, from ``pipeline.config.log_settings``.
Tracebacks are rendered without local variables: those would leak packet
bytes into the logs. While someone runs ``stackctl logs``, each record is also
published (as JSON, whatever LOG_FORMAT says) on the telemetry stream.

structlog is imported here, and only here, with ``asyncio`` standing in
(:func:`_import_structlog`): structlog imports asyncio for its ``a*`` methods
only, and asyncio (with ssl, concurrent.futures, subprocess) is ~6 MB of
every process that we never use.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from typing import TYPE_CHECKING, Protocol

from pipeline import config


class _OnFirstUse(types.ModuleType):
    """Stands in for a module: the first attribute asked for imports the real one."""

    def __getattr__(self, attr: str) -> object:
        return getattr(importlib.import_module(self.__name__), attr)


def _import_structlog() -> types.ModuleType:
    """``import structlog``, its modules binding a stand-in for asyncio.

    structlog's bound loggers and its stdlib module ``import asyncio`` at the
    top, and use it only inside their async methods (``ainfo``...), which we
    never call. The stand-in is in ``sys.modules`` only while structlog is
    imported: any other ``import asyncio`` gets the real module, and so does
    structlog the moment one of its async methods asks the stand-in for
    anything."""
    if "structlog" in sys.modules or "asyncio" in sys.modules:
        return importlib.import_module("structlog")
    stand_in = _OnFirstUse("asyncio")
    sys.modules["asyncio"] = stand_in
    try:
        return importlib.import_module("structlog")
    finally:
        if sys.modules.get("asyncio") is stand_in:
            del sys.modules["asyncio"]


if TYPE_CHECKING:
    import structlog
else:
    structlog = _import_structlog()
Logger = structlog.typing.FilteringBoundLogger

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


class _StdoutLogger:
    """Writes rendered records to sys.stdout and leaves flushing to the stream's
    buffering: structlog's own loggers flush after every record."""

    def __init__(self, *args: object) -> None:
        pass

    def msg(self, message: str) -> None:
        sys.stdout.write(message + "\n")

    log = debug = info = warn = warning = error = err = critical = exception = fatal = failure = msg


class _Sink(Protocol):
    logs: bool

    def log(self, record: dict) -> None: ...


_telemetry: _Sink | None = None


def attach(sink: _Sink) -> None:
    """Also publish each record to ``sink`` (``pipeline.telemetry``) while it has readers."""
    global _telemetry
    _telemetry = sink


def _publish(logger: object, method: str, record: dict) -> dict:
    """A processor: hand the record to the telemetry stream when someone follows it."""
    sink = _telemetry
    if sink is not None and sink.logs:
        sink.log(record)
    return record


def setup(proc: str, buffered: bool = False) -> Logger:
    """Configure structlog for this process and return its bound logger.

    stdout is a pipe under honcho. Unbuffered, every record costs a system call
    (and wakes honcho): 15 % of a TCP worker's time at a few hundred connections
    a second. A process with an event loop passes ``buffered=True`` and calls
    ``flush()`` once per wake-up instead; anything else is line-buffered.
    """
    settings = config.log_settings()
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if settings.format == "json":
        processors += [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            _publish,
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors += [_publish, structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[settings.level]),
        logger_factory=_StdoutLogger,
        cache_logger_on_first_use=True,
    )
    sys.stdout.reconfigure(line_buffering=not buffered)
    return structlog.get_logger().bind(proc=proc)


def flush() -> None:
    sys.stdout.flush()


def payload_wanted() -> bool:
    """LOG_PAYLOAD=1: debug packet records carry the payload (hex, first 64 bytes)."""
    return config.log_settings().payload


def debug_enabled() -> bool:
    """True when debug records would be written; guards per-packet log work."""
    return config.log_settings().level == "debug"
