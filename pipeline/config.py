"""Configuration from environment variables (honcho reads `.env`).

Every knob is documented in the README's configuration table; defaults give a
working stack with no set-up: device ``ustack0``, kernel side 10.0.0.1/24 and
fd00::1/64, stack addresses 10.0.0.2 and fd00::2 (``USTACK_IPV6=0``: IPv4 only).
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
    reassembly_timeout: float | None  # seconds for both families; None: 30 s IPv4, 60 s IPv6 (RFC 8200 §4.5)
    keys_dir: str     # CURVE keys, needed when any endpoint is tcp://
    client_key: str   # this worker's key pair (tcp:// endpoints)

    @property
    def stack_addr_bytes(self) -> bytes:
        return self.stack_address.packed

    @property
    def stack_addr6_bytes(self) -> bytes | None:
        return None if self.stack_address6 is None else self.stack_address6.packed


IPV6_MIN_MTU = 1280


def _address_pair(interface, address, suffix: str, host_default: str, addr_default: str, bad: str):
    """USTACK_HOST_ADDR<suffix> (the kernel's side) and USTACK_ADDR<suffix> (ours, inside its prefix)."""
    try:
        host = interface(env_str(f"USTACK_HOST_ADDR{suffix}", host_default))
        addr = address(env_str(f"USTACK_ADDR{suffix}", addr_default))
    except ValueError as exc:
        raise SystemExit(f"{bad}: {exc}") from None
    if addr not in host.network:
        raise SystemExit(f"USTACK_ADDR{suffix} {addr} is not inside USTACK_HOST_ADDR{suffix} {host.network}")
    if addr == host.ip:
        raise SystemExit(f"USTACK_ADDR{suffix} must differ from the kernel side's USTACK_HOST_ADDR{suffix}")
    return host, addr


def _ipv6_addresses() -> tuple[ipaddress.IPv6Interface | None, ipaddress.IPv6Address | None]:
    """USTACK_HOST_ADDR6 and USTACK_ADDR6, checked like the IPv4 pair; (None, None) with USTACK_IPV6=0."""
    if not env_bool("USTACK_IPV6", True):
        return None, None
    host, addr = _address_pair(ipaddress.IPv6Interface, ipaddress.IPv6Address, "6", "fd00::1/64", "fd00::2",
                               "bad IPv6 address configuration")
    if addr.is_multicast or addr.is_unspecified or addr.is_loopback:
        raise SystemExit(f"USTACK_ADDR6 {addr}: not a unicast address")
    return host, addr


def default_run_dir(tun_name: str) -> str:
    """/run/ustack/<network namespace>-<device>: a stack per namespace never meets
    another's sockets, and stackctl in the same namespace finds its own."""
    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:  # not Linux
        return os.path.join("/tmp", f"ustack-{os.getuid()}-{tun_name}")
    return f"/run/ustack/{netns}-{tun_name}"


def load() -> StackConfig:
    """Read and validate the environment; exit with a clear message on bad values."""
    host, addr = _address_pair(ipaddress.IPv4Interface, ipaddress.IPv4Address, "", "10.0.0.1/24", "10.0.0.2",
                               "bad address configuration")
    host6, addr6 = _ipv6_addresses()
    tun_name = env_str("USTACK_TUN", "ustack0")
    if not 0 < len(tun_name) < 16:
        raise SystemExit(f"USTACK_TUN {tun_name!r}: interface names are 1..15 characters")
    mtu = env_int("USTACK_MTU", 1500)
    if not 576 <= mtu <= 65535:
        raise SystemExit(f"USTACK_MTU {mtu}: expected 576..65535")
    if addr6 is not None and mtu < IPV6_MIN_MTU:
        # RFC 8200 §5: every link that carries IPv6 has an MTU of at least 1280.
        raise SystemExit(f"USTACK_MTU {mtu}: IPv6 needs at least {IPV6_MIN_MTU} (or USTACK_IPV6=0)")
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
    reassembly_timeout = env_float("USTACK_REASSEMBLY_TIMEOUT", 0.0) or None
    if reassembly_timeout is not None and not 0 < reassembly_timeout <= 120:
        raise SystemExit(f"USTACK_REASSEMBLY_TIMEOUT {reassembly_timeout}: expected 0 < seconds <= 120")
    offload = env_bool("USTACK_OFFLOAD", sys.platform == "linux")
    if offload and sys.platform != "linux":
        raise SystemExit("USTACK_OFFLOAD=1: TUN offloads (virtio-net header, TSO) exist only on Linux")
    return StackConfig(
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
        reassembly_timeout=reassembly_timeout,
        keys_dir=keys_dir,
        client_key=env_str("USTACK_CLIENT_KEY", os.path.join(keys_dir, "client.key_secret")),
    )
