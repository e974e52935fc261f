"""Configuration from environment variables (honcho reads `.env`): each setting's default and check.

Every knob is in the README's configuration table and is read here, in one place with
its default and what it accepts; processes take the checked values from here.
:func:`load` gives the stack's own settings (device, addresses,
endpoints, attach mode), which every process and stackctl need;
:func:`tcp_settings`, :func:`service_settings` and :func:`log_settings` (and
``pipeline.relay_config.relay_settings`` for attach mode) give those of the processes that use them. Defaults give a
working stack with no set-up: device ``ustack0``, kernel side 10.0.0.1/24 and
fd00::1/64, stack addresses 10.0.0.2 and fd00::2 (``USTACK_IPV6=0``: IPv4 only).

A bad value is a :class:`ConfigError`; each group of settings names all of its
bad values in one. Every process checks the whole configuration once at start
(:func:`check_or_exit`, every group through :func:`validate_all`) and exits with
``EX_CONFIG`` (78, sysexits.h), which the respawn wrapper does not restart:
a typo stops the stack with one message instead of a restart loop.
``python -m pipeline.config`` runs the same check for ``scripts/run``.

Read elsewhere: ``USTACK_PURE`` by pipeline/compiled.py (before anything else
is imported) and pipeline/respawn.py (which loop the wrapper runs), and
``USTACK_STACK_ID`` by pipeline/stacklock.py (any text).
This module imports nothing of ``workers``: it checks text into plain values
(networks, addresses, ports), and the workers build their objects from those.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline import stacklock

T = TypeVar("T")

# sysexits.h: exit statuses that restarting cannot cure; pipeline.respawn gives up on them.
EX_NOPERM = 77   # the stack lacks root (CAP_NET_ADMIN)
EX_CONFIG = 78   # a configuration error, or another stack already runs on this device here


class ConfigError(SystemExit):
    """Settings with bad values; each problem names the variable and what it expects."""

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class _Problems:
    """The problems of one group of settings: a bad value is noted and its fallback used,
    so that the later checks still run; ``done()`` raises them all in one ConfigError."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def take(self, read: Callable[..., T], *args: Any, fallback: Any = None) -> T:
        try:
            return read(*args)
        except ConfigError as exc:
            self.found.extend(exc.problems)
            return fallback  # type: ignore[no-any-return]

    def note(self, problem: str) -> None:
        self.found.append(problem)

    def done(self) -> None:
        if self.found:
            raise ConfigError(*self.found)


# -- reading one variable ------------------------------------------------------------------

def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number") from None


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r}: expected 1 or 0")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected an integer") from None


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(name, default).lower()
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected {' or '.join(choices)}")
    return value


def _number(name: str, default: float, low: float, high: float) -> float:
    value = env_float(name, default)
    if not low <= value <= high:  # also rejects NaN
        raise ConfigError(f"{name}={value}: expected {low}..{high}")
    return value


def _integer(name: str, default: int, low: int, high: int) -> int:
    value = env_int(name, default)
    if not low <= value <= high:
        raise ConfigError(f"{name}={value}: expected {low}..{high}")
    return value


# -- the stack: every process and stackctl ------------------------------------------------

@dataclass(frozen=True)
class StackConfig:
    tun_name: str
    host_interface: ipaddress.IPv4Interface  # the kernel's side of the link
    stack_address: ipaddress.IPv4Address     # the address this stack answers for
    host_interface6: ipaddress.IPv6Interface | None  # the kernel's IPv6 side; None: IPv6 off
    stack_address6: ipaddress.IPv6Address | None
    mtu: int
    run_dir: str
    proc_name: str  # honcho's process name (with USTACK_NAME_PREFIX); empty outside honcho
    offload: bool  # virtio-net header, checksum offload and TSO on the device (Linux)
    ingress_endpoint: str  # where workers connect (and ingress binds, unless ingress_bind says otherwise)
    ingress_bind: str
    egress_endpoint: str
    egress_bind: str
    control_endpoint: str
    control_bind: str
    telemetry_endpoint: str  # every process publishes telemetry here (ingress binds an XSUB)
    telemetry_bind: str
    monitor_endpoint: str  # stackctl subscribes to telemetry here (ingress binds an XPUB)
    monitor_bind: str
    reassembly_timeout: float | None  # seconds for both families; None: 30 s IPv4, 60 s IPv6 (RFC 8200 §4.5)
    keys_dir: str     # CURVE keys, needed when any endpoint is tcp://
    client_key: str   # this worker's key pair (tcp:// endpoints)
    attach: str = ""  # attach mode: path of the namespace the device lives in (empty: our own)
    forward: bool = False  # relay packets not addressed to the stack (attach mode's default)
    default_route: bool = True  # attach mode: route the namespace's default traffic to the device
    attached: tuple[str, ...] = ()  # attach mode: every namespace at start (``attach`` is the first)
    syn_filter: bool = True  # under a SYN flood, shed in the kernel with an eBPF filter on the device (Linux)
    busy_poll: float = 0.0  # seconds each process spins on its sockets before a blocking poll (0: never)

    @property
    def stack_addr_bytes(self) -> bytes:
        return self.stack_address.packed

    @property
    def stack_addr6_bytes(self) -> bytes | None:
        return None if self.stack_address6 is None else self.stack_address6.packed


IPV6_MIN_MTU = 1280


def _mtu() -> int:
    """USTACK_MTU as a number (load() checks its range; the TCP receive buffer's check needs it too)."""
    return env_int("USTACK_MTU", 1500)


def _address_pair(interface, address, suffix: str, host_default: str, addr_default: str):
    """USTACK_HOST_ADDR<suffix> (the kernel's side) and USTACK_ADDR<suffix> (ours, inside its prefix)."""
    host_var, addr_var = f"USTACK_HOST_ADDR{suffix}", f"USTACK_ADDR{suffix}"
    try:
        host = interface(env_str(host_var, host_default))
    except ValueError as exc:
        raise ConfigError(f"{host_var}: bad address configuration: {exc} (expected e.g. {host_default})") from None
    try:
        addr = address(env_str(addr_var, addr_default))
    except ValueError as exc:
        raise ConfigError(f"{addr_var}: bad address configuration: {exc} (expected e.g. {addr_default})") from None
    if addr not in host.network:
        raise ConfigError(f"{addr_var} {addr} is not inside {host_var} {host.network}")
    if addr == host.ip:
        raise ConfigError(f"{addr_var} must differ from the kernel side's {host_var}")
    return host, addr


def _ipv4_addresses() -> tuple[ipaddress.IPv4Interface, ipaddress.IPv4Address]:
    """USTACK_HOST_ADDR and USTACK_ADDR."""
    return _address_pair(ipaddress.IPv4Interface, ipaddress.IPv4Address, "", "10.0.0.1/24", "10.0.0.2")


def _ipv6_addresses() -> tuple[ipaddress.IPv6Interface | None, ipaddress.IPv6Address | None]:
    """USTACK_HOST_ADDR6 and USTACK_ADDR6, checked like the IPv4 pair; (None, None) with USTACK_IPV6=0."""
    if not env_bool("USTACK_IPV6", True):
        return None, None
    host, addr = _address_pair(ipaddress.IPv6Interface, ipaddress.IPv6Address, "6", "fd00::1/64", "fd00::2")
    if addr.is_multicast or addr.is_unspecified or addr.is_loopback:
        raise ConfigError(f"USTACK_ADDR6 {addr}: not a unicast address")
    return host, addr


def attach_path(raw: str) -> str:
    """One namespace of USTACK_ATTACH (or ``stackctl attach``): a name under /run/netns, or a path
    such as /proc/PID/ns/net."""
    if not raw:
        return ""
    path = raw if "/" in raw else os.path.join("/run/netns", raw)
    if not os.path.exists(path):
        raise ConfigError(f"USTACK_ATTACH={raw!r}: no network namespace at {path}")
    return path


def netns_label(path: str) -> str:
    """What records and stackctl call an attached namespace: its name under /run/netns, else its path."""
    return path[len("/run/netns/"):] if path.startswith("/run/netns/") else path


def attach_paths(raw: str) -> tuple[str, ...]:
    """USTACK_ATTACH, "a,b,c": the namespaces the stack is the network of, each once, in order."""
    paths = [attach_path(item.strip()) for item in raw.split(",") if item.strip()]
    if len(set(paths)) != len(paths):
        raise ConfigError(f"USTACK_ATTACH={raw!r}: a namespace named twice")
    return tuple(paths)


def load() -> StackConfig:
    """The stack's own settings from the environment: a ConfigError naming every bad value at once."""
    p = _Problems()
    host, addr = p.take(_ipv4_addresses, fallback=(None, None))
    host6, addr6 = p.take(_ipv6_addresses, fallback=(None, None))
    tun_name = env_str("USTACK_TUN", "ustack0")
    if not 0 < len(tun_name) < 16:
        p.note(f"USTACK_TUN {tun_name!r}: interface names are 1..15 characters")
    mtu = p.take(_mtu)
    if mtu is None:
        pass
    elif not 576 <= mtu <= 65535:
        p.note(f"USTACK_MTU {mtu}: expected 576..65535")
    elif addr6 is not None and mtu < IPV6_MIN_MTU:
        # RFC 8200 §5: every link that carries IPv6 has an MTU of at least 1280.
        p.note(f"USTACK_MTU {mtu}: IPv6 needs at least {IPV6_MIN_MTU} (or USTACK_IPV6=0)")
    attached = p.take(attach_paths, env_str("USTACK_ATTACH", ""), fallback=())
    attach = attached[0] if attached else ""  # the first: the run directory is named after it
    run_dir = env_str("USTACK_RUN_DIR", stacklock.default_run_dir(tun_name, attach))
    endpoints = {}
    for stage in ("ingress", "egress", "control", "telemetry", "monitor"):
        default = f"ipc://{os.path.join(run_dir, stage + '.sock')}"
        connect = env_str(f"USTACK_{stage.upper()}_ENDPOINT", default)
        bind = env_str(f"USTACK_{stage.upper()}_BIND", connect)
        for value in dict.fromkeys((connect, bind)):
            if not value.startswith(("ipc://", "tcp://")):
                p.note(f"USTACK_{stage.upper()}_*: {value!r} is neither ipc:// nor tcp://")
            elif value.startswith("ipc://") and len(value) - 6 > 107:
                p.note(f"{value!r}: ipc paths are limited to 107 characters (shorten USTACK_RUN_DIR)")
        endpoints[stage] = (connect, bind)
    keys_dir = env_str("USTACK_KEYS_DIR", "keys")
    reassembly_timeout = p.take(env_float, "USTACK_REASSEMBLY_TIMEOUT", 0.0) or None
    if reassembly_timeout is not None and not 0 < reassembly_timeout <= 120:
        p.note(f"USTACK_REASSEMBLY_TIMEOUT {reassembly_timeout}: expected 0 < seconds <= 120")
    offload = p.take(env_bool, "USTACK_OFFLOAD", sys.platform == "linux")
    if offload and sys.platform != "linux":
        p.note("USTACK_OFFLOAD=1: TUN offloads (virtio-net header, TSO) exist only on Linux")
    forward = p.take(env_bool, "USTACK_FORWARD", bool(attach))
    default_route = p.take(env_bool, "USTACK_DEFAULT_ROUTE", True)
    syn_filter = p.take(env_bool, "USTACK_SYN_FILTER", sys.platform == "linux")
    if syn_filter and sys.platform != "linux":
        p.note("USTACK_SYN_FILTER=1: the device's eBPF filter exists only on Linux")
    busy_poll_us = p.take(env_int, "USTACK_BUSY_POLL", 0, fallback=0)
    if not 0 <= busy_poll_us <= 100_000:
        p.note(f"USTACK_BUSY_POLL={busy_poll_us}: expected 0..100000 microseconds")
    p.done()
    return StackConfig(
        busy_poll=busy_poll_us / 1_000_000,
        syn_filter=syn_filter,
        attach=attach,
        attached=attached,
        forward=forward,
        default_route=default_route,
        tun_name=tun_name,
        host_interface=host,
        stack_address=addr,
        host_interface6=host6,
        stack_address6=addr6,
        mtu=mtu,
        run_dir=run_dir,
        # A worker's identity on the bus; the prefix keeps names unique across hosts.
        proc_name=env_str("USTACK_NAME_PREFIX", "") + env_str("HONCHO_PROCESS_NAME", ""),
        offload=offload,
        ingress_endpoint=endpoints["ingress"][0],
        ingress_bind=endpoints["ingress"][1],
        egress_endpoint=endpoints["egress"][0],
        egress_bind=endpoints["egress"][1],
        control_endpoint=endpoints["control"][0],
        control_bind=endpoints["control"][1],
        telemetry_endpoint=endpoints["telemetry"][0],
        telemetry_bind=endpoints["telemetry"][1],
        monitor_endpoint=endpoints["monitor"][0],
        monitor_bind=endpoints["monitor"][1],
        reassembly_timeout=reassembly_timeout,
        keys_dir=keys_dir,
        client_key=env_str("USTACK_CLIENT_KEY", os.path.join(keys_dir, "client.key_secret")),
    )


# -- the TCP worker ------------------------------------------------------------------------

DEFAULT_SYN_QUEUE = 256       # TCP_SYN_QUEUE
DEFAULT_MAX_TIME_WAIT = 8192  # TCP_MAX_TIME_WAIT (Linux: tcp_max_tw_buckets)

@dataclass(frozen=True)
class TcpSettings:
    """TCP_*, checked: the TCP worker builds its connections' TcpConfig and its demultiplexer from them."""
    congestion: str            # "newreno" (RFC 5681/6582) or "cubic" (RFC 9438)
    msl: float                 # seconds; TIME-WAIT lasts 2 * MSL
    delayed_ack: float         # seconds an ACK may wait
    nagle: bool
    ecn: bool
    fin_wait2_timeout: float   # seconds a closed connection waits in FIN-WAIT-2
    keepalive: float | None    # idle seconds before keepalive probes; None: off
    syn_queue: int             # half-open connections per listening port before SYN cookies
    max_time_wait: int         # connections a worker holds in TIME-WAIT
    recv_buffer: int           # the most a connection's receive buffer grows to (bytes)
    send_buffer: int           # bytes the application may queue per connection


def tcp_settings() -> TcpSettings:
    """TCP_* from the environment: a ConfigError naming every bad value at once."""
    p = _Problems()
    congestion = p.take(_choice, "TCP_CONGESTION", "newreno", ("newreno", "cubic"))
    msl = p.take(_number, "TCP_MSL", 30.0, 0.001, 3600.0)
    delayed_ack = p.take(_number, "TCP_DELAYED_ACK", 0.04, 0.0, 0.5)  # RFC 9293 §3.8.6.3: less than 0.5 s
    nagle = p.take(env_bool, "TCP_NAGLE", True)
    ecn = p.take(env_bool, "TCP_ECN", True)
    fin_wait2_timeout = p.take(_number, "TCP_FIN_WAIT2_TIMEOUT", 60.0, 0.001, 7 * 86400.0)  # "must be > 0"
    keepalive = p.take(_number, "TCP_KEEPALIVE", 0.0, 0.0, 7 * 86400.0)  # 0: off
    syn_queue = p.take(_integer, "TCP_SYN_QUEUE", DEFAULT_SYN_QUEUE, 1, 1 << 20)
    max_time_wait = p.take(_integer, "TCP_MAX_TIME_WAIT", DEFAULT_MAX_TIME_WAIT, 0, 1 << 24)
    # 1 MiB each: the pipeline's round trip is long next to a kernel's, so in-flight data
    # (not CPU) limits bulk throughput; bench: +15-20 % over 256 KiB, no gain beyond.
    # Buffers fill only as data arrives, so idle connections cost nothing for it.
    # The receive buffer holds at least one full segment (MTU - 40) and at most what a
    # scaled window can advertise (RFC 7323 §2.3); a bad USTACK_MTU is load()'s to report.
    mtu = p.take(_mtu, fallback=1500)
    recv_buffer = p.take(_integer, "TCP_RECV_BUFFER", 1 << 20, max(576, mtu) - 40, 1 << 30)
    send_buffer = p.take(_integer, "TCP_SEND_BUFFER", 1 << 20, 1, 1 << 30)
    p.done()
    return TcpSettings(congestion=congestion, msl=msl, delayed_ack=delayed_ack, nagle=nagle, ecn=ecn,
                       fin_wait2_timeout=fin_wait2_timeout, keepalive=keepalive or None, syn_queue=syn_queue,
                       max_time_wait=max_time_wait, recv_buffer=recv_buffer, send_buffer=send_buffer)


# -- services (the TCP and UDP workers) ----------------------------------------------------

DEFAULT_HTTP_TIMEOUT = 10.0  # USTACK_HTTP_TIMEOUT
_SERVICE_ENTRY = re.compile(r"(tcp|udp)/(\d{1,5})=([A-Za-z_][\w.]*):([A-Za-z_]\w*)")


def parse_services(value: str) -> list[tuple[str, int, str, str]]:
    """A USTACK_SERVICES value as (protocol, port, module, name) entries; ConfigError if malformed.

    Only the syntax: the TCP and UDP workers load the modules (workers/services/registry.py)."""
    entries: list[tuple[str, int, str, str]] = []
    seen: set[tuple[str, int]] = set()
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            continue
        m = _SERVICE_ENTRY.fullmatch(item)
        if m is None:
            raise ConfigError(f"USTACK_SERVICES entry {item!r}: expected tcp/PORT=module:Name or udp/PORT=module:Name")
        proto, port, module, name = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if not 1 <= port <= 65535:
            raise ConfigError(f"USTACK_SERVICES entry {item!r}: port {port} is not 1..65535")
        if (proto, port) in seen:
            raise ConfigError(f"USTACK_SERVICES names {proto}/{port} twice")
        seen.add((proto, port))
        entries.append((proto, port, module, name))
    return entries


def _directory(name: str) -> str:
    path = env_str(name, "")
    if path and not os.path.isdir(path):
        raise ConfigError(f"{name}={path!r}: expected a directory")
    return path


@dataclass(frozen=True)
class ServiceSettings:
    """USTACK_SERVICES and USTACK_HTTP_*, checked: workers/services/registry.py builds each worker's table."""
    entries: tuple[tuple[str, int, str, str], ...]  # the user's services: (protocol, port, module, name)
    http_root: str       # directory served over HTTP on TCP port 80; empty: no HTTP
    http_timeout: float  # seconds for a request to arrive whole, and for an idle keep-alive connection


def service_settings() -> ServiceSettings:
    """USTACK_SERVICES (its syntax) and USTACK_HTTP_*: a ConfigError naming every bad value at once."""
    p = _Problems()
    entries = p.take(parse_services, env_str("USTACK_SERVICES", ""), fallback=[])
    http_root = p.take(_directory, "USTACK_HTTP_ROOT")
    http_timeout = p.take(_number, "USTACK_HTTP_TIMEOUT", DEFAULT_HTTP_TIMEOUT, 0.001, 86400.0)
    p.done()
    return ServiceSettings(entries=tuple(entries), http_root=http_root, http_timeout=http_timeout)


# -- logs, and scripts/run's namespace ------------------------------------------------------

@dataclass(frozen=True)
class LogSettings:
    """LOG_*, checked."""
    level: str     # debug, info, warning, error or critical
    format: str    # json or console
    payload: bool  # debug packet records carry the payload (hex, first 64 bytes)


def log_settings() -> LogSettings:
    """LOG_LEVEL, LOG_FORMAT and LOG_PAYLOAD: a ConfigError naming every bad value at once."""
    p = _Problems()
    level = p.take(_choice, "LOG_LEVEL", "info", ("debug", "info", "warning", "error", "critical"))
    fmt = p.take(_choice, "LOG_FORMAT", "json", ("json", "console"))
    payload = p.take(env_bool, "LOG_PAYLOAD", False)
    p.done()
    return LogSettings(level=level, format=fmt, payload=payload)


def netns_name() -> str:
    """USTACK_NETNS: the network namespace scripts/run makes for the stack."""
    name = env_str("USTACK_NETNS", "ustack")
    if not name or "/" in name or name in (".", "..") or len(name) > 64:
        raise ConfigError(f"USTACK_NETNS={name!r}: expected a network namespace name")
    return name


# -- the whole configuration, checked once at start -------------------------------------

# Every group of settings: together, every variable of the README's configuration table
# but the two read elsewhere (module docstring). A process reads the groups it uses, but
# every process (and scripts/run) checks them all, so that a typo is rejected before
# anything starts.
def _relay_settings() -> object:
    from pipeline import relay_config  # it builds on this module's readers
    return relay_config.relay_settings()


CHECKS: tuple[Callable[[], object], ...] = (
    load,
    log_settings,
    netns_name,
    tcp_settings,
    service_settings,
    _relay_settings,
)


def validate_all() -> list[str]:
    """Every configuration error at once (empty when all is well)."""
    errors: list[str] = []
    for check in CHECKS:
        try:
            check()
        except ConfigError as exc:
            errors.extend(exc.problems)
    return list(dict.fromkeys(errors))  # each once: some settings are read by two checks (USTACK_MTU)


def check_or_exit(who: str, problems: list[str] | None = None) -> None:
    """At process start: report every bad setting (or ``problems``) once and exit EX_CONFIG (not restarted)."""
    problems = validate_all() if problems is None else problems
    if problems:
        print(f"{who}: configuration error: " + "; ".join(problems), file=sys.stderr, flush=True)
        raise SystemExit(EX_CONFIG)


def read_env_file(path: str) -> dict[str, str]:
    """NAME=value lines of a .env file the way honcho reads them (its values win over the environment)."""
    values = {}
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#") or "=" not in line:
                    continue
                name, _, value = line.partition("=")
                if name.startswith("export "):
                    continue  # honcho ignores these lines: so do we
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]
                values[name.strip()] = value
    except FileNotFoundError:
        pass
    return values


def main(argv: list[str]) -> int:
    """``python -m pipeline.config [--env-file .env] [NAME...]``: check everything; print NAME=value."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.config", description=main.__doc__)
    parser.add_argument("--env-file", help="a .env file whose values override the environment, as honcho does")
    parser.add_argument("names", nargs="*", help="settings to print as NAME=value after a successful check")
    args = parser.parse_args(argv)
    if args.env_file:
        os.environ.update(read_env_file(args.env_file))
    errors = validate_all()
    for error in errors:
        print(f"configuration error: {error}", file=sys.stderr)
    if errors:
        return EX_CONFIG
    cfg = load()
    checked = {"USTACK_ADDR": str(cfg.stack_address), "USTACK_HOST_ADDR": str(cfg.host_interface),
               "USTACK_TUN": cfg.tun_name, "USTACK_NETNS": netns_name()}
    for name in args.names:
        print(f"{name}={checked[name] if name in checked else os.environ.get(name, '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
