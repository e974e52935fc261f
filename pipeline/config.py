"""Configuration from environment variables (honcho reads `.env`).

Every knob is documented in the README's configuration table; defaults give a
working stack with no set-up: device ``ustack0``, kernel side 10.0.0.1/24 and
fd00::1/64, stack addresses 10.0.0.2 and fd00::2 (``USTACK_IPV6=0``: IPv4 only).

A bad value is a :class:`ConfigError`. Every process checks the whole
configuration once at start (:func:`check_or_exit`) and exits with
``EX_CONFIG`` (78, sysexits.h), which the respawn wrapper does not restart:
a typo stops the stack with one message instead of a restart loop.
``python -m pipeline.config`` runs the same check for ``scripts/run``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

# sysexits.h: exit statuses that restarting cannot cure; pipeline.respawn gives up on them.
EX_NOPERM = 77   # the stack lacks root (CAP_NET_ADMIN)
EX_CONFIG = 78   # a configuration error, or another stack already runs on this device here


class ConfigError(SystemExit):
    """Settings with bad values; each problem names the variable and what it expects."""

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


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
    syn_filter: bool = True  # under a SYN flood, shed in the kernel with an eBPF filter on the device (Linux)
    busy_poll: float = 0.0  # seconds each process spins on its sockets before a blocking poll (0: never)

    @property
    def stack_addr_bytes(self) -> bytes:
        return self.stack_address.packed

    @property
    def stack_addr6_bytes(self) -> bytes | None:
        return None if self.stack_address6 is None else self.stack_address6.packed


IPV6_MIN_MTU = 1280


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


def _ipv6_addresses() -> tuple[ipaddress.IPv6Interface | None, ipaddress.IPv6Address | None]:
    """USTACK_HOST_ADDR6 and USTACK_ADDR6, checked like the IPv4 pair; (None, None) with USTACK_IPV6=0."""
    if not env_bool("USTACK_IPV6", True):
        return None, None
    host, addr = _address_pair(ipaddress.IPv6Interface, ipaddress.IPv6Address, "6", "fd00::1/64", "fd00::2")
    if addr.is_multicast or addr.is_unspecified or addr.is_loopback:
        raise ConfigError(f"USTACK_ADDR6 {addr}: not a unicast address")
    return host, addr


RUN_BASE = "/run/ustack"  # where default run directories live; stackctl list looks here


def default_run_dir(tun_name: str, attach: str = "") -> str:
    """/run/ustack/<network namespace>-<device>: a stack per namespace never meets
    another's sockets, and stackctl in the same namespace finds its own. Attached,
    /run/ustack/<ours>-<device>-attached-<theirs>: apart from a stack serving this namespace
    (its device lives elsewhere). stackctl finds either by its stack file (stacklock.live_stacks)."""
    try:
        netns = os.stat("/proc/self/ns/net").st_ino
        theirs = os.stat(attach).st_ino if attach else 0
    except OSError:  # not Linux
        return os.path.join("/tmp", f"ustack-{os.getuid()}-{tun_name}")
    name = f"{netns}-{tun_name}-attached-{theirs}" if attach else f"{netns}-{tun_name}"
    return os.path.join(RUN_BASE, name)


def attach_path(raw: str) -> str:
    """USTACK_ATTACH: a namespace name under /run/netns, or a path such as /proc/PID/ns/net."""
    if not raw:
        return ""
    path = raw if "/" in raw else os.path.join("/run/netns", raw)
    if not os.path.exists(path):
        raise ConfigError(f"USTACK_ATTACH={raw!r}: no network namespace at {path}")
    return path


def forward_policy():  # type: ignore[no-untyped-def]
    """The relay's destination policy from USTACK_FORWARD_DENY / _ALLOW and USTACK_HOST_ALIAS."""
    from workers.attach.policy import ForwardPolicy

    try:
        return ForwardPolicy(deny=env_str("USTACK_FORWARD_DENY", ""), allow=env_str("USTACK_FORWARD_ALLOW", ""),
                             host_alias=env_str("USTACK_HOST_ALIAS", ""))
    except ValueError as exc:
        raise ConfigError(f"USTACK_FORWARD_DENY/_ALLOW/USTACK_HOST_ALIAS: {exc}") from None


def published(proto: str) -> dict[int, int]:
    """USTACK_PUBLISH's ports of one protocol: port where the stack runs -> port in the namespace."""
    from workers.attach.policy import parse_publish

    try:
        return {outer: inner for p, outer, inner in parse_publish(env_str("USTACK_PUBLISH", "")) if p == proto}
    except ValueError as exc:
        raise ConfigError(f"USTACK_PUBLISH: {exc}") from None


def load() -> StackConfig:
    """Read and validate the environment: a ConfigError naming every bad value at once."""
    problems: list[str] = []

    def take(read, fallback):  # type: ignore[no-untyped-def]
        """``read()``, or ``fallback`` with its problem noted, so later checks still run."""
        try:
            return read()
        except ConfigError as exc:
            problems.extend(exc.problems)
            return fallback

    host, addr = take(lambda: _address_pair(ipaddress.IPv4Interface, ipaddress.IPv4Address, "",
                                            "10.0.0.1/24", "10.0.0.2"),
                      (ipaddress.IPv4Interface("10.0.0.1/24"), ipaddress.IPv4Address("10.0.0.2")))
    host6, addr6 = take(_ipv6_addresses, (None, None))
    tun_name = env_str("USTACK_TUN", "ustack0")
    if not 0 < len(tun_name) < 16:
        problems.append(f"USTACK_TUN {tun_name!r}: interface names are 1..15 characters")
    mtu = take(lambda: env_int("USTACK_MTU", 1500), 1500)
    if not 576 <= mtu <= 65535:
        problems.append(f"USTACK_MTU {mtu}: expected 576..65535")
    elif addr6 is not None and mtu < IPV6_MIN_MTU:
        # RFC 8200 §5: every link that carries IPv6 has an MTU of at least 1280.
        problems.append(f"USTACK_MTU {mtu}: IPv6 needs at least {IPV6_MIN_MTU} (or USTACK_IPV6=0)")
    attach = take(lambda: attach_path(env_str("USTACK_ATTACH", "")), "")
    run_dir = env_str("USTACK_RUN_DIR", default_run_dir(tun_name, attach))
    endpoints = {}
    for stage in ("ingress", "egress", "control", "telemetry", "monitor"):
        default = f"ipc://{os.path.join(run_dir, stage + '.sock')}"
        connect = env_str(f"USTACK_{stage.upper()}_ENDPOINT", default)
        bind = env_str(f"USTACK_{stage.upper()}_BIND", connect)
        for value in dict.fromkeys((connect, bind)):
            if not value.startswith(("ipc://", "tcp://")):
                problems.append(f"USTACK_{stage.upper()}_*: {value!r} is neither ipc:// nor tcp://")
            elif value.startswith("ipc://") and len(value) - 6 > 107:
                problems.append(f"{value!r}: ipc paths are limited to 107 characters (shorten USTACK_RUN_DIR)")
        endpoints[stage] = (connect, bind)
    keys_dir = env_str("USTACK_KEYS_DIR", "keys")
    reassembly_timeout = take(lambda: env_float("USTACK_REASSEMBLY_TIMEOUT", 0.0), 0.0) or None
    if reassembly_timeout is not None and not 0 < reassembly_timeout <= 120:
        problems.append(f"USTACK_REASSEMBLY_TIMEOUT {reassembly_timeout}: expected 0 < seconds <= 120")
    offload = take(lambda: env_bool("USTACK_OFFLOAD", sys.platform == "linux"), False)
    if offload and sys.platform != "linux":
        problems.append("USTACK_OFFLOAD=1: TUN offloads (virtio-net header, TSO) exist only on Linux")
    forward = take(lambda: env_bool("USTACK_FORWARD", bool(attach)), False)
    default_route = take(lambda: env_bool("USTACK_DEFAULT_ROUTE", True), True)
    syn_filter = take(lambda: env_bool("USTACK_SYN_FILTER", sys.platform == "linux"), False)
    if syn_filter and sys.platform != "linux":
        problems.append("USTACK_SYN_FILTER=1: the device's eBPF filter exists only on Linux")
    busy_poll_us = take(lambda: env_int("USTACK_BUSY_POLL", 0), 0)
    if not 0 <= busy_poll_us <= 100_000:
        problems.append(f"USTACK_BUSY_POLL={busy_poll_us}: expected 0..100000 microseconds")
    if problems:
        raise ConfigError(*problems)
    return StackConfig(
        busy_poll=busy_poll_us / 1_000_000,
        syn_filter=syn_filter,
        attach=attach,
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


# -- the whole configuration, checked once at start -------------------------------------

def _choice(name: str, default: str, choices: tuple[str, ...]) -> Callable[[], None]:
    def check() -> None:
        value = env_str(name, default).lower()
        if value not in choices:
            raise ConfigError(f"{name}={value!r}: expected {' or '.join(choices)}")
    return check


def _number(name: str, default: float, low: float, high: float, integer: bool = False) -> Callable[[], None]:
    def check() -> None:
        value = env_int(name, int(default)) if integer else env_float(name, default)
        if not low <= value <= high:
            raise ConfigError(f"{name}={value}: expected {low}..{high}")
    return check


def _boolean(name: str, default: bool) -> Callable[[], None]:
    def check() -> None:
        env_bool(name, default)
    return check


def _recv_buffer() -> None:
    # At least one full segment (MTU - 40); at most what a scaled window can advertise (RFC 7323 §2.3).
    _number("TCP_RECV_BUFFER", 1 << 20, max(576, env_int("USTACK_MTU", 1500)) - 40, 1 << 30, integer=True)()


def _netns_name() -> None:
    name = env_str("USTACK_NETNS", "ustack")
    if not name or "/" in name or name in (".", "..") or len(name) > 64:
        raise ConfigError(f"USTACK_NETNS={name!r}: expected a network namespace name")


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


def _services() -> None:
    parse_services(env_str("USTACK_SERVICES", ""))


def _http_root() -> None:
    root = env_str("USTACK_HTTP_ROOT", "")
    if root and not os.path.isdir(root):
        raise ConfigError(f"USTACK_HTTP_ROOT={root!r}: expected a directory")


# Every variable of the README's configuration table that load() does not cover. The
# tcp worker reads the TCP_* values itself; they are checked here so that every
# process (and scripts/run) rejects a typo before anything starts.
CHECKS: tuple[Callable[[], None], ...] = (
    load,
    _choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error", "critical")),
    _choice("LOG_FORMAT", "json", ("json", "console")),
    _boolean("LOG_PAYLOAD", False),
    _netns_name,
    _choice("TCP_CONGESTION", "newreno", ("newreno", "cubic")),
    _number("TCP_MSL", 30.0, 0.001, 3600.0),
    _number("TCP_DELAYED_ACK", 0.04, 0.0, 0.5),  # RFC 9293 §3.8.6.3: an ACK is delayed less than 0.5 s
    _boolean("TCP_NAGLE", True),
    _boolean("TCP_ECN", True),
    _number("TCP_FIN_WAIT2_TIMEOUT", 60.0, 0.001, 7 * 86400.0),  # "must be > 0"
    _number("TCP_KEEPALIVE", 0.0, 0.0, 7 * 86400.0),
    _number("TCP_SYN_QUEUE", 256, 1, 1 << 20, integer=True),
    _number("TCP_MAX_TIME_WAIT", 8192, 0, 1 << 24, integer=True),
    _recv_buffer,
    _number("TCP_SEND_BUFFER", 1 << 20, 1, 1 << 30, integer=True),
    _services,
    _http_root,
    _number("USTACK_HTTP_TIMEOUT", 10.0, 0.001, 86400.0),
    # Attach mode (load() checks USTACK_ATTACH, USTACK_FORWARD and USTACK_DEFAULT_ROUTE).
    forward_policy,
    lambda: published("tcp") and None,
    _number("USTACK_RELAY_CONNECT_TIMEOUT", 30.0, 0.1, 3600.0),
    _number("USTACK_UDP_IDLE", 60.0, 0.1, 86400.0),
    _number("USTACK_UDP_IDLE_DNS", 10.0, 0.1, 86400.0),
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


def missing_keys(cfg: StackConfig, role: str) -> list[str]:
    """The CURVE key files a process of ``role`` needs for its tcp:// endpoints and lacks."""
    binds = {"ingress": (cfg.ingress_bind, cfg.control_bind, cfg.telemetry_bind, cfg.monitor_bind),
             "egress": (cfg.egress_bind,)}.get(role, ())
    connects = [cfg.telemetry_endpoint]
    if role != "ingress":
        connects.append(cfg.ingress_endpoint)
    if role not in ("ingress", "egress"):
        connects.append(cfg.egress_endpoint)
    need = []
    if any(e.startswith("tcp://") for e in binds):
        need.append(os.path.join(cfg.keys_dir, "server.key_secret"))
    if any(e.startswith("tcp://") for e in connects):
        need += [os.path.join(cfg.keys_dir, "server.key"), cfg.client_key]
    return [f"CURVE key {path} is missing (tcp:// endpoints need keys: make them with scripts/keys, "
            "see USTACK_KEYS_DIR and USTACK_CLIENT_KEY)" for path in need if not os.path.isfile(path)]


def check_or_exit(who: str, role: str | None = None) -> None:
    """At process start: report configuration errors once and exit EX_CONFIG (not restarted);
    with ``role``, also the CURVE keys that role needs."""
    errors = validate_all()
    if not errors and role is not None:
        errors = missing_keys(load(), role)
    if errors:
        print(f"{who}: configuration error: " + "; ".join(errors), file=sys.stderr, flush=True)
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
    defaults = {"USTACK_ADDR": "10.0.0.2", "USTACK_NETNS": "ustack", "USTACK_TUN": "ustack0",
                "USTACK_HOST_ADDR": "10.0.0.1/24"}
    for name in args.names:
        print(f"{name}={os.environ.get(name) or defaults.get(name, '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
