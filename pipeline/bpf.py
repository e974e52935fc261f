"""The ``bpf(2)`` system call, for the programs ustack hands the kernel (Linux only).

Python has no wrapper for it, so this goes through libc's ``syscall`` with
ctypes. Two commands: ``BPF_PROG_LOAD`` (the verifier checks the program;
its log comes back in the error) and ``BPF_PROG_TEST_RUN`` (runs a loaded
socket filter on a packet in the kernel: the tests check the filter's
decisions with it, on the kernel that runs it), and ``BPF_MAP_CREATE`` for
the state a program keeps. Loading needs
``CAP_BPF``/``CAP_SYS_ADMIN`` (ingress runs as root); without it the caller
gets a ``BpfError`` and carries on without the program.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_MAP_CREATE = 0
_PROG_LOAD = 5
_PROG_TEST_RUN = 10
PROG_TYPE_SOCKET_FILTER = 1
MAP_TYPE_ARRAY = 2
_LICENSE = ctypes.create_string_buffer(b"GPL")
_LOG_SIZE = 64 * 1024
# union bpf_attr, BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, map_flags
_MAP_CREATE_ATTR = struct.Struct("=IIIII")
# BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level, log_size, log_buf (the rest 0)
_PROG_LOAD_ATTR = struct.Struct("=IIQQIIQ")
# BPF_PROG_TEST_RUN: prog_fd, retval, data_size_in, data_size_out, data_in, data_out, repeat, duration
_TEST_RUN_ATTR = struct.Struct("=IIIIQQII")
_ETH_HEADER = bytes(12)  # test runs take an Ethernet frame: zero addresses, then the EtherType


class BpfError(OSError):
    """The kernel refused; for a load, the verifier's log is in the message."""


def _syscall(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    """bpf(cmd, attr): the kernel may write results back into ``attr``."""
    nr = _SYSCALL_NR.get(platform.machine())
    if nr is None:
        raise BpfError(0, f"bpf(2): unknown system call number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf(2) command {cmd}: {os.strerror(err)}")
    return int(ret)


def create_array_map(value_size: int, entries: int) -> int:
    """An array map of ``entries`` zeroed values, keyed by a u32 index; returns its descriptor.
    Its memory is the kernel's (charged to this process's cgroup), not the process's RSS."""
    attr = _MAP_CREATE_ATTR.pack(MAP_TYPE_ARRAY, 4, value_size, entries, 0)
    return _syscall(_MAP_CREATE, ctypes.create_string_buffer(attr, len(attr)))


def load_socket_filter(insns: bytes) -> int:
    """Load a socket filter program; returns its file descriptor (the caller closes it)."""
    code = ctypes.create_string_buffer(insns, len(insns))
    log = ctypes.create_string_buffer(_LOG_SIZE)
    attr = _PROG_LOAD_ATTR.pack(PROG_TYPE_SOCKET_FILTER, len(insns) // 8, ctypes.addressof(code),
                                ctypes.addressof(_LICENSE), 1, _LOG_SIZE, ctypes.addressof(log))
    try:
        return _syscall(_PROG_LOAD, ctypes.create_string_buffer(attr, len(attr)))
    except BpfError as exc:
        verifier = log.value.decode(errors="replace").strip()
        raise BpfError(exc.errno, f"{exc.strerror}: {verifier[-2000:]}" if verifier else exc.strerror) from None


def test_run(prog_fd: int, ip_packet: bytes) -> int:
    """The program's return value for this IP packet, run once in the kernel."""
    ethertype = b"\x86\xdd" if ip_packet[:1] and ip_packet[0] >> 4 == 6 else b"\x08\x00"
    frame = ctypes.create_string_buffer(_ETH_HEADER + ethertype + ip_packet)
    attr = ctypes.create_string_buffer(
        _TEST_RUN_ATTR.pack(prog_fd, 0, len(frame.raw) - 1, 0, ctypes.addressof(frame), 0, 1, 0), _TEST_RUN_ATTR.size)
    _syscall(_PROG_TEST_RUN, attr)
    return int(_TEST_RUN_ATTR.unpack(attr.raw)[1])  # the kernel wrote retval back
