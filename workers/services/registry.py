"""Which service answers on which port: one table of built-ins plus the user's ``USTACK_SERVICES``.

``USTACK_SERVICES="tcp/9000=mymodule:MyService,udp/9001=mymodule:MyDatagram"``
names classes (or functions) importable from ``PYTHONPATH``; each TCP or UDP
worker loads them at start-up, next to the built-ins, through the same
table. What each kind of entry must be:

- ``tcp/PORT=module:Name``: ``Name(stream)`` is called once per accepted
  connection and returns the connection's service (normally a subclass of
  ``workers.services.tcp.Service``; README "Writing a service").
- ``udp/PORT=module:Name``: called with each datagram's payload, returns the
  reply's payload or None for no reply. A class is instantiated once per
  worker, without arguments, and its instance is what gets called.

Every process checks the syntax at start with the rest of the configuration
(``pipeline.config.parse_services``). What only loading can tell — a module
or name that cannot be loaded, a port a built-in already serves — stops the
TCP or UDP worker with one message on stderr and exit status 78 (EX_CONFIG),
which the respawn wrapper does not restart.
"""

from __future__ import annotations

import importlib
import os
import resource
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from pipeline.config import EX_CONFIG, ConfigError, env_str, parse_services
from workers.services import tcp as tcp_services
from workers.services import udp as udp_services

__all__ = ["EX_CONFIG", "ConfigError", "config_exit", "load", "parse", "services", "services_or_exit"]
parse = parse_services  # the syntax is checked with the rest of the configuration (pipeline/config.py)


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


def builtin_tcp(env: Mapping[str, str]) -> dict[int, Callable[[Any], tcp_services.Service]]:
    """The built-in TCP services of one worker (README "Services")."""
    from workers.services.iperf3 import Iperf3Server

    table: dict[int, Callable[[Any], tcp_services.Service]] = dict(tcp_services.SERVICES)
    table[5201] = Iperf3Server(cpu=process_cpu_seconds)  # one per worker: it holds the test running there
    root = env.get("USTACK_HTTP_ROOT", "")
    if root:
        from workers.services.files import FileStore
        from workers.services.httpd import REQUEST_TIMEOUT, HttpServer

        raw = env.get("USTACK_HTTP_TIMEOUT", str(REQUEST_TIMEOUT))
        try:
            timeout = float(raw)
        except ValueError:
            raise ConfigError(f"USTACK_HTTP_TIMEOUT={raw!r}: expected seconds") from None
        if not timeout > 0:
            raise ConfigError(f"USTACK_HTTP_TIMEOUT={raw!r}: expected more than 0 seconds")
        if not os.path.isdir(root):
            raise ConfigError(f"USTACK_HTTP_ROOT={root!r} is not a directory")
        table[80] = HttpServer(FileStore(root), request_timeout=timeout)
    return table


def builtin_udp(env: Mapping[str, str]) -> dict[int, Callable[[bytes], bytes | None]]:
    return dict(udp_services.SERVICES)


def services(proto: str, env: Mapping[str, str] | None = None) -> dict[int, Callable[..., Any]]:
    """Every service of ``proto`` ("tcp" or "udp") on its port: built-ins, then the user's; ConfigError if bad."""
    env = os.environ if env is None else env
    table = builtin_tcp(env) if proto == "tcp" else builtin_udp(env)
    for entry_proto, port, module, name in parse(env.get("USTACK_SERVICES", "")):
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


def services_or_exit(proto: str) -> dict[int, Callable[..., Any]]:
    """services(proto) for a worker's start-up: a configuration error ends the process with status 78."""
    try:
        return services(proto)
    except ConfigError as exc:
        config_exit(str(exc))


def _describe(obj: object) -> str:
    return getattr(obj, "__name__", type(obj).__name__)
