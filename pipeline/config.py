"""Configuration from environment variables (honcho reads `.env`).

Every knob is documented in the README's configuration table; defaults give a
working stack with no set-up: device ``ustack0``, kernel side 10.0.0.1/24,
stack address 10.0.0.2.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: expected a number") from None


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name}={raw!r}: expected 1 or 0")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: expected an integer") from None


@dataclass(frozen=True)
class StackConfig:
    tun_name: str
    host_interface: ipaddress.IPv4Interface  # the kernel's side of the link
    stack_address: ipaddress.IPv4Address     # the address this stack answers for
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
    keys_dir: str     # CURVE keys, needed when any endpoint is tcp://
    client_key: str   # this worker's key pair (tcp:// endpoints)
    attach: str = ""  # attach mode: path of the namespace the device lives in (empty: our own)
    forward: bool = False  # relay packets not addressed to the stack (attach mode's default)
    default_route: bool = True  # attach mode: route the namespace's default traffic to the device

    @property
    def stack_addr_bytes(self) -> bytes:
        return self.stack_address.packed


def default_run_dir(tun_name: str) -> str:
    """/run/ustack/<network namespace>-<device>: a stack per namespace never meets
    another's sockets, and stackctl in the same namespace finds its own."""
    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:  # not Linux
        return os.path.join("/tmp", f"ustack-{os.getuid()}-{tun_name}")
    return f"/run/ustack/{netns}-{tun_name}"


EX_CONFIG = 78  # sysexits.h: a configuration error; the respawn wrapper does not restart on it


def config_error(message: str) -> SystemExit:
    """A bad setting: say which on stderr and exit with EX_CONFIG (78), not a crash to retry."""
    print(f"ustack: {message}", file=sys.stderr, flush=True)
    return SystemExit(EX_CONFIG)


def attach_path(raw: str) -> str:
    """USTACK_ATTACH: a namespace name under /run/netns, or a path such as /proc/PID/ns/net."""
    if not raw:
        return ""
    path = raw if "/" in raw else os.path.join("/run/netns", raw)
    if not os.path.exists(path):
        raise config_error(f"USTACK_ATTACH={raw!r}: no network namespace at {path}")
    return path


def forward_policy():  # type: ignore[no-untyped-def]
    """The relay's destination policy from USTACK_FORWARD_DENY / _ALLOW and USTACK_HOST_ALIAS."""
    from pipeline.forwarding import ForwardPolicy

    try:
        return ForwardPolicy(deny=env_str("USTACK_FORWARD_DENY", ""), allow=env_str("USTACK_FORWARD_ALLOW", ""),
                             host_alias=env_str("USTACK_HOST_ALIAS", ""))
    except ValueError as exc:
        raise config_error(f"USTACK_FORWARD_DENY/_ALLOW/USTACK_HOST_ALIAS: {exc}") from None


def published(proto: str) -> dict[int, int]:
    """USTACK_PUBLISH's ports of one protocol: port where the stack runs -> port in the namespace."""
    from pipeline.forwarding import parse_publish

    try:
        return {outer: inner for p, outer, inner in parse_publish(env_str("USTACK_PUBLISH", "")) if p == proto}
    except ValueError as exc:
        raise config_error(f"USTACK_PUBLISH: {exc}") from None


def load() -> StackConfig:
    """Read and validate the environment; exit with a clear message on bad values."""
    try:
        host = ipaddress.IPv4Interface(env_str("USTACK_HOST_ADDR", "10.0.0.1/24"))
        addr = ipaddress.IPv4Address(env_str("USTACK_ADDR", "10.0.0.2"))
    except ValueError as exc:
        raise SystemExit(f"bad address configuration: {exc}") from None
    if addr not in host.network:
        raise SystemExit(f"USTACK_ADDR {addr} is not inside USTACK_HOST_ADDR {host.network}")
    if addr == host.ip:
        raise SystemExit("USTACK_ADDR must differ from the kernel side's USTACK_HOST_ADDR")
    tun_name = env_str("USTACK_TUN", "ustack0")
    if not 0 < len(tun_name) < 16:
        raise SystemExit(f"USTACK_TUN {tun_name!r}: interface names are 1..15 characters")
    mtu = env_int("USTACK_MTU", 1500)
    if not 576 <= mtu <= 65535:
        raise SystemExit(f"USTACK_MTU {mtu}: expected 576..65535")
    run_dir = env_str("USTACK_RUN_DIR", default_run_dir(tun_name))
    endpoints = {}
    for stage in ("ingress", "egress", "control"):
        default = f"ipc://{os.path.join(run_dir, stage + '.sock')}"
        connect = env_str(f"USTACK_{stage.upper()}_ENDPOINT", default)
        bind = env_str(f"USTACK_{stage.upper()}_BIND", connect)
        for value in (connect, bind):
            if not value.startswith(("ipc://", "tcp://")):
                raise SystemExit(f"USTACK_{stage.upper()}_*: {value!r} is neither ipc:// nor tcp://")
            if value.startswith("ipc://") and len(value) - 6 > 107:
                raise SystemExit(f"{value!r}: ipc paths are limited to 107 characters (shorten USTACK_RUN_DIR)")
        endpoints[stage] = (connect, bind)
    keys_dir = env_str("USTACK_KEYS_DIR", "keys")
    offload = env_bool("USTACK_OFFLOAD", sys.platform == "linux")
    if offload and sys.platform != "linux":
        raise SystemExit("USTACK_OFFLOAD=1: TUN offloads (virtio-net header, TSO) exist only on Linux")
    attach = attach_path(env_str("USTACK_ATTACH", ""))
    try:
        forward = env_bool("USTACK_FORWARD", bool(attach))
        default_route = env_bool("USTACK_DEFAULT_ROUTE", True)
    except SystemExit as exc:
        raise config_error(str(exc.code)) from None
    return StackConfig(
        attach=attach,
        forward=forward,
        default_route=default_route,
        tun_name=tun_name,
        host_interface=host,
        stack_address=addr,
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
        keys_dir=keys_dir,
        client_key=env_str("USTACK_CLIENT_KEY", os.path.join(keys_dir, "client.key_secret")),
    )
