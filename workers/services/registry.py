"""Which service answers on which port: one table of built-ins plus the user's ``USTACK_SERVICES``.

``USTACK_SERVICES="tcp/9000=mymodule:MyService,udp/9001=mymodule:MyDatagram"``
names classes (or functions) importable from ``PYTHONPATH``; each TCP or UDP
worker loads them at start-up, next to the built-ins, through the same
table. What each kind of entry must be:

- ``tcp/PORT=module:Name``: ``Name(stream)`` is called once per accepted
  connection and returns the connection's service (normally a subclass of
  ``workers.services.tcp.Service``; README "Writing a service"). One whose
  connections from one client must share a worker declares
  ``steer_by_client = True`` (as iperf3's does); ``steered_ports`` lists
  those ports, and the TCP worker announces them to ingress.
- ``udp/PORT=module:Name``: called with each datagram's payload, returns the
  reply's payload or None for no reply. A class is instantiated once per
  worker, without arguments, and its instance is what gets called.

Every process checks the syntax, and ``USTACK_HTTP_ROOT`` and
``USTACK_HTTP_TIMEOUT`` for the built-in HTTP server, at start with the rest of
the configuration (``pipeline.config.service_settings``); the workers hand the
checked values in. What only loading can tell — a module or name that cannot
be loaded, a port a built-in already serves — stops the TCP or UDP worker
with one message on stderr and exit status 78 (EX_CONFIG), which the respawn
wrapper does not restart.
"""

from __future__ import annotations

import importlib
import resource
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from pipeline.config import EX_CONFIG, ConfigError, ServiceSettings, env_str
from workers.services import tcp as tcp_services
from workers.services import udp as udp_services

__all__ = ["EX_CONFIG", "ConfigError", "config_exit", "load", "services", "services_or_exit", "steered_ports"]


def config_exit(message: str) -> NoReturn:
    """Stop this process for a configuration error: the message on stderr, exit status 78 (not restarted)."""
    who = env_str("HONCHO_PROCESS_NAME", "") or "ustack"
    print(f"{who}: configuration error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EX_CONFIG)


def load(module: str, name: str) -> Any:
    """The object ``module:name``; ConfigError (with the reason) if it cannot be had."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # any import-time failure of the user's module is a configuration error
        raise ConfigError(f"USTACK_SERVICES: cannot import {module!r}: {type(exc).__name__}: {exc}") from None
    try:
        obj = getattr(mod, name)
    except AttributeError:
        raise ConfigError(f"USTACK_SERVICES: module {module!r} has no {name!r}") from None
    if not callable(obj):
        raise ConfigError(f"USTACK_SERVICES: {module}:{name} is not a class or function")
    return obj


def process_cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process (iperf3 reports the server's CPU use)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


class OnFirstConnection:
    """A built-in TCP service made on its port's first connection, its module imported then:
    iperf3's is ~1 MB of every TCP worker, most of which never runs a test. Made once, then kept
    (it holds what runs on its port). What the table is asked before that (``steer_by_client``,
    the name in messages) it says itself."""

    def __init__(self, name: str, make: Callable[[], Callable[[Any], tcp_services.Service]],
                 steer_by_client: bool = False) -> None:
        self.__name__ = name
        self.steer_by_client = steer_by_client
        self._make = make
        self._service: Callable[[Any], tcp_services.Service] | None = None

    def __call__(self, stream: Any) -> tcp_services.Service:
        if self._service is None:
            self._service = self._make()
        return self._service(stream)


def _iperf3() -> Callable[[Any], tcp_services.Service]:
    from workers.services.iperf3 import Iperf3Server

    return Iperf3Server(cpu=process_cpu_seconds)  # one per worker: it holds the test running there


def builtin_tcp(settings: ServiceSettings) -> dict[int, Callable[[Any], tcp_services.Service]]:
    """The built-in TCP services of one worker (README "Services")."""
    table: dict[int, Callable[[Any], tcp_services.Service]] = dict(tcp_services.SERVICES)
    table[5201] = OnFirstConnection("Iperf3Server", _iperf3, steer_by_client=True)  # as Iperf3Server declares
    if settings.http_root:
        from workers.services.files import FileStore
        from workers.services.httpd import HttpServer

        table[80] = HttpServer(FileStore(settings.http_root), request_timeout=settings.http_timeout)
    return table


def builtin_udp() -> dict[int, Callable[[bytes], bytes | None]]:
    return dict(udp_services.SERVICES)


def services(proto: str, settings: ServiceSettings) -> dict[int, Callable[..., Any]]:
    """Every service of ``proto`` ("tcp" or "udp") on its port: built-ins, then the user's; ConfigError if bad."""
    table = builtin_tcp(settings) if proto == "tcp" else builtin_udp()
    for entry_proto, port, module, name in settings.entries:
        if entry_proto != proto:
            continue
        if port in table:
            raise ConfigError(f"USTACK_SERVICES: {proto}/{port} is already served by the built-in "
                              f"{_describe(table[port])}")
        obj = load(module, name)
        if proto == "udp" and isinstance(obj, type):
            try:
                obj = obj()
            except Exception as exc:
                raise ConfigError(f"USTACK_SERVICES: {module}:{name}() failed: {type(exc).__name__}: {exc}") from None
        table[port] = obj
    return table


def services_or_exit(proto: str, settings: ServiceSettings) -> dict[int, Callable[..., Any]]:
    """services() for a worker's start-up: a configuration error ends the process with status 78."""
    try:
        return services(proto, settings)
    except ConfigError as exc:
        config_exit(str(exc))


def steered_ports(table: dict[int, Callable[..., Any]]) -> frozenset[int]:
    """The ports of ``table`` whose service declares ``steer_by_client = True``: every connection of
    one client address to such a port must reach the same worker (iperf3's test is a control
    connection plus data connections). The worker announces them to ingress in its heartbeats."""
    return frozenset(port for port, service in table.items() if getattr(service, "steer_by_client", False) is True)


def _describe(obj: object) -> str:
    return getattr(obj, "__name__", type(obj).__name__)
