"""The TUN device: the only module that speaks ioctl.

Ingress reads and egress writes the same device from two independently
started processes. On Linux both open the device with ``IFF_MULTI_QUEUE``:
whichever starts first creates it, the other attaches to it. The writer then
*detaches* its queue (``TUNSETQUEUE`` + ``IFF_DETACH_QUEUE``): a detached
queue can still write, but the kernel never steers inbound flows to it and
does not learn flow affinity from its writes, so egress cannot steal or lose
traffic meant for ingress. The device lives while any queue is open, so
either process can restart while the other runs (with its address and
routes intact). Passing one descriptor over SCM_RIGHTS would also work, but
it would make one process the owner that the other must wait for.

With offloads (``USTACK_OFFLOAD=1``, the default on Linux) the device is
opened with ``IFF_VNET_HDR``: every packet read or written is preceded by a
10-byte ``virtio_net_hdr``, and the reader enables checksum and TCP
segmentation offload (``TUNSETOFFLOAD``). The kernel then hands us TCP
segments of up to 64 KB whose checksum it vouches for, and accepts 64 KB
segments with only the pseudo-header sum filled in, segmenting and
checksumming them itself. The header is a property of the device, not of a
queue, so ingress and egress must open it with the same setting.

On macOS the device is a ``utun`` kernel-control socket whose packets carry a
4-byte address-family header (2 = IPv4, 30 = IPv6). It has no queues to
attach twice, so the two processes share one open socket: each serves its
descriptor to the other over a Unix socket (SCM_RIGHTS), a newcomer first
asks its peer for the device and opens a new one only if no peer holds it,
and the device lives while either holds it. The framing and the descriptor
passing are unit-tested (the latter works the same on Linux); the device
itself is untested on real macOS.

Attach mode (``USTACK_ATTACH``, Linux): the device is created inside another
network namespace. A short-lived thread switches itself into that namespace
with ``setns`` (a network namespace is per thread), opens and sets up the
queue there, and ends; the descriptor keeps working from the process's own
namespace, where every ustack process stays and opens its real sockets.
The kernel side is configured there too (``nsenter --net``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Protocol

from pipeline.config import EX_NOPERM
from pipeline.offload import NO_VNET_HDR, VNET_HDR, Offload

# <linux/if_tun.h>
_TUNSETIFF = 0x400454CA
_TUNSETQUEUE = 0x400454D9
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IFF_MULTI_QUEUE = 0x0100
_IFF_DETACH_QUEUE = 0x0400
_IFF_VNET_HDR = 0x4000
_TUNSETOFFLOAD = 0x400454D0
_TUNSETFILTEREBPF = 0x800454E1  # _IOR('T', 225, int)
_IFREQ = struct.Struct("16sH")

# TUNSETOFFLOAD bits: CSUM, TSO4, TSO6 (required), then USO4 | USO6 where the kernel has them (>= 6.2).
_TUN_F_REQUIRED = 0x01 | 0x02 | 0x04
_TUN_F_USO = 0x20 | 0x40

# <sys/kern_control.h>, <net/if_utun.h> (macOS)
_UTUN_CONTROL_NAME = b"com.apple.net.utun_control"
_CTLIOCGINFO = 0xC0644E03
_UTUN_OPT_IFNAME = 2
_SYSPROTO_CONTROL = 2
AF_HEADER = struct.Struct("!I")
DARWIN_AF_INET = 2
DARWIN_AF_INET6 = 30

READ_SIZE = 65535 + 64
# With offloads, a packet longer than this is handed on as a view past the virtio-net header
# instead of a slice: no copy, and no aliasing (each read makes a new bytes object, never
# reused). Shorter ones are sliced: copying under 2 KB costs less than making a view
# (measured per read: 74 B 1.4 us sliced / 1.7 viewed; 16 KB 2.6 / 2.3; 64 KB 5.5 / 4.3).
# Reading into a preallocated buffer instead (os.readv into header and payload) still needs
# one copy out, since what is handed on must not alias the next read: no fewer copies.
SLICE_MAX = 2048


class TunDevice(Protocol):
    name: str

    offload: bool

    def fileno(self) -> int: ...
    def read(self) -> tuple[bytes | memoryview, Offload | None] | None:
        """One IP packet and its virtio-net header fields (None without offload metadata),
        or None when nothing is waiting (non-blocking). The packet is bytes, or a read-only
        view of bytes that nothing else holds or reuses."""
    def write(self, packet: bytes | memoryview, offload: Offload | None = None) -> None: ...
    def close(self) -> None: ...


# Without CAP_NET_ADMIN the kernel answers EPERM (TUNSETIFF) or EACCES (/dev/net/tun).
_NO_PRIVILEGE = (errno.EPERM, errno.EACCES)
NEEDS_ROOT = "the stack needs root (CAP_NET_ADMIN) to create and configure its TUN device; run it as root"


class TunError(OSError):
    """The device could not be opened or configured; the message says why."""

    @property
    def no_privilege(self) -> bool:
        return self.errno in _NO_PRIVILEGE


class LinuxTun:
    """One queue of a multi-queue Linux TUN device (IFF_TUN | IFF_NO_PI [| IFF_VNET_HDR])."""

    def __init__(self, name: str, *, writer_only: bool, offload: bool) -> None:
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in _NO_PRIVILEGE:
                raise TunError(exc.errno, f"cannot open /dev/net/tun: {exc.strerror}: {NEEDS_ROOT}") from None
            raise TunError(exc.errno, f"cannot open /dev/net/tun: {exc.strerror} "
                           "(is the tun module loaded?)") from None
        import fcntl  # Linux only

        try:
            flags = _IFF_TUN | _IFF_NO_PI | _IFF_MULTI_QUEUE | (_IFF_VNET_HDR if offload else 0)
            fcntl.ioctl(fd, _TUNSETIFF, _IFREQ.pack(name.encode(), flags))
            if writer_only:
                fcntl.ioctl(fd, _TUNSETQUEUE, _IFREQ.pack(b"", _IFF_DETACH_QUEUE))
            else:
                self.offload_bits = _enable_offloads(fd) if offload else 0
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_PRIVILEGE:
                raise TunError(exc.errno, f"TUN set-up of {name}: {exc.strerror}: {NEEDS_ROOT}") from None
            raise TunError(exc.errno, f"TUN set-up of {name}: {exc.strerror}" +
                           (" (try USTACK_OFFLOAD=0)" if offload else "")) from None
        self.name = name
        self.offload = offload
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def read(self) -> tuple[bytes | memoryview, Offload | None] | None:
        try:
            data = os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return None
        if not self.offload:
            return data, None
        if len(data) < VNET_HDR.size:
            return b"", None  # cannot happen with a sane kernel; the caller drops it as truncated
        fields = VNET_HDR.unpack_from(data)
        packet = data[VNET_HDR.size:] if len(data) <= SLICE_MAX else memoryview(data)[VNET_HDR.size:]
        # Most small packets carry an all-zero header: don't send it around.
        return packet, (fields if fields[0] or fields[1] else None)

    def write(self, packet: bytes | memoryview, offload: Offload | None = None) -> None:
        # One system call per packet: the header and the packet go out together (writev).
        if self.offload:
            os.writev(self._fd, (NO_VNET_HDR if offload is None else VNET_HDR.pack(*offload), packet))
        else:
            os.write(self._fd, packet)

    def set_filter(self, prog_fd: int) -> None:
        """Attach a loaded eBPF socket filter to the device (every queue; see pipeline.synfilter),
        replacing any; -1 takes it off. The device keeps its own reference: the caller may close
        ``prog_fd``. Raises OSError if the kernel refuses."""
        import fcntl

        fcntl.ioctl(self._fd, _TUNSETFILTEREBPF, struct.pack("i", prog_fd))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _enable_offloads(fd: int) -> int:
    """Enable checksum offload and TSO (and USO where available); return the bits accepted."""
    import fcntl

    for bits in (_TUN_F_REQUIRED | _TUN_F_USO, _TUN_F_REQUIRED):
        try:
            fcntl.ioctl(fd, _TUNSETOFFLOAD, bits)
            return bits
        except OSError:
            continue
    raise OSError(errno.EINVAL, "the kernel refused TUNSETOFFLOAD for checksum and TSO")


def utun_frame(packet: bytes) -> bytes:
    """Prefix a packet with the utun address-family header, chosen by IP version."""
    family = DARWIN_AF_INET6 if packet and packet[0] >> 4 == 6 else DARWIN_AF_INET
    return AF_HEADER.pack(family) + packet


def utun_unframe(data: bytes) -> bytes | None:
    """Strip the utun header; None for a frame too short or of another family."""
    if len(data) < AF_HEADER.size:
        return None
    (family,) = AF_HEADER.unpack_from(data)
    if family not in (DARWIN_AF_INET, DARWIN_AF_INET6):
        return None
    return data[AF_HEADER.size:]


class MacUtun:
    """A macOS utun device (untested on real macOS: see README)."""

    offload = False

    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock = sock
        self._sock.setblocking(False)
        self.name = name

    @classmethod
    def adopt(cls, fd: int) -> MacUtun:
        """The device another process opened, from its descriptor."""
        sock = socket.socket(fileno=fd)
        name = sock.getsockopt(_SYSPROTO_CONTROL, _UTUN_OPT_IFNAME, 16).rstrip(b"\0").decode()
        return cls(sock, name)

    @classmethod
    def open(cls, unit: int = 0) -> MacUtun:
        import fcntl

        sock = socket.socket(socket.PF_SYSTEM, socket.SOCK_DGRAM, _SYSPROTO_CONTROL)  # type: ignore[attr-defined]
        info = bytearray(struct.pack("I96s", 0, _UTUN_CONTROL_NAME))
        fcntl.ioctl(sock.fileno(), _CTLIOCGINFO, info)
        ctl_id = struct.unpack_from("I", info)[0]
        sock.connect((ctl_id, unit))  # unit 0: the kernel picks utunN
        name = sock.getsockopt(_SYSPROTO_CONTROL, _UTUN_OPT_IFNAME, 16).rstrip(b"\0").decode()
        return cls(sock, name)

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> tuple[bytes, Offload | None] | None:
        while True:
            try:
                data = self._sock.recv(READ_SIZE)
            except BlockingIOError:
                return None
            packet = utun_unframe(data)
            if packet is not None:
                return packet, None

    def write(self, packet: bytes, offload: Offload | None = None) -> None:
        self._sock.send(utun_frame(packet))

    def close(self) -> None:
        self._sock.close()


def serve_fd(path: str, fd: int) -> None:
    """Hand a duplicate of ``fd`` to every process that connects to ``path`` (a daemon thread)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o600)
    server.listen(4)

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            with conn:
                socket.send_fds(conn, [b"fd"], [fd])

    threading.Thread(target=serve, name="fd-server", daemon=True).start()


def fetch_fd(path: str, timeout: float) -> int | None:
    """A duplicate of the descriptor served at ``path``, or None if nobody serves it in time."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(path)
                _, fds, _, _ = socket.recv_fds(client, 16, 1)
                if fds:
                    return fds[0]
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


_CLONE_NEWNET = 0x40000000


def _in_namespace(path: str, action):  # type: ignore[no-untyped-def]
    """Run ``action()`` in a thread that has entered the network namespace at ``path``.

    ``setns`` changes only the calling thread's namespace; a thread of its own
    means the process's other threads (ZeroMQ's) never leave home.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    result: list[object] = []

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            result.append(TunError(exc.errno, f"attach: cannot open namespace {path}: {exc.strerror}"))
            return
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                result.append(TunError(err, f"attach: setns({path}): {os.strerror(err)}"))
                return
            result.append(action())
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, name="attach")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def open_device(name: str, *, writer_only: bool, offload: bool, run_dir: str, netns: str = "") -> TunDevice:
    """Open (creating if needed) the device, inside ``netns`` when attached; a writer never receives traffic."""
    if sys.platform == "linux":
        if netns:
            return _in_namespace(netns, lambda: LinuxTun(name, writer_only=writer_only, offload=offload))
        return LinuxTun(name, writer_only=writer_only, offload=offload)
    if netns:
        raise TunError(errno.ENOTSUP, "attach mode (USTACK_ATTACH) needs Linux network namespaces")
    if sys.platform == "darwin":
        mine, peer = ("utun-egress.sock", "utun-ingress.sock") if writer_only else \
                     ("utun-ingress.sock", "utun-egress.sock")
        # Egress waits for ingress to open the device; ingress only checks whether a
        # surviving egress still holds one (it restarted), else opens a new one.
        fd = fetch_fd(os.path.join(run_dir, peer), timeout=30.0 if writer_only else 0.2)
        device = MacUtun.open() if fd is None else MacUtun.adopt(fd)
        serve_fd(os.path.join(run_dir, mine), device.fileno())
        return device
    raise TunError(errno.ENOTSUP, f"no TUN support on {sys.platform}")


def exit_status(exc: TunError) -> int:
    """A process's exit status for a device error: EX_NOPERM (not restarted) when privileges
    are missing, else 1 (restarted: the device may come back)."""
    return EX_NOPERM if exc.no_privilege else 1


def configure_kernel_side(name: str, host_interface: str, mtu: int, host_interface6: str | None = None,
                          netns: str = "", default_route: bool = False) -> None:
    """Give the kernel's side of the link its addresses and bring it up (idempotent).

    Attached (``netns``), configure it inside that namespace and, with
    ``default_route``, send the namespace's default traffic (IPv4, and IPv6
    when it has an IPv6 address) through the device.
    """
    if sys.platform == "linux":
        cmds = [["ip", "link", "set", "dev", name, "mtu", str(mtu), "up"],
                ["ip", "addr", "replace", host_interface, "dev", name]]
        if host_interface6 is not None:
            # nodad: the link has one other node (us), and DAD would hold the address
            # "tentative" (unusable) for a second after every start.
            cmds.append(["ip", "-6", "addr", "replace", host_interface6, "dev", name, "nodad"])
        if netns and default_route:
            cmds.append(["ip", "route", "replace", "default", "dev", name])
            if host_interface6 is not None:
                cmds.append(["ip", "-6", "route", "replace", "default", "dev", name])
        if netns:
            # A namespace made for us (ip netns add) has its loopback down: programs there expect it up.
            cmds.insert(0, ["ip", "link", "set", "dev", "lo", "up"])
            cmds = [["nsenter", f"--net={netns}", *cmd] for cmd in cmds]
    else:
        ip, _, prefix = host_interface.partition("/")
        cmds = [["ifconfig", name, "inet", host_interface, ip, "mtu", str(mtu), "up"]]
        if host_interface6 is not None:
            cmds.append(["ifconfig", name, "inet6", host_interface6])
    for cmd in cmds:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise TunError(errno.EINVAL, f"{' '.join(cmd)}: {done.stderr.strip()}")
