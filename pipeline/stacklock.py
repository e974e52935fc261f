"""One stack per device per network namespace, and who supervises it.

Contract: every process of a stack runs under ``pipeline.respawn``, which
*joins* the stack before starting its child and *leaves* it when it exits.
Joining takes a shared ``flock`` on the run directory (one per namespace and
device, see :func:`default_run_dir`); the file ``stack`` in it names the
stack that holds it: its supervisor's pid and start time (honcho, or systemd).
A process whose supervisor is another stack's is refused with
:class:`StackBusy`: it would otherwise take over the first stack's ipc sockets
and worker names (a second ``bind`` to an ipc path silently wins). A run
directory nobody holds a lock on is stale (a stack that was killed): the first
joiner empties it and takes it over. The last process to leave removes it.
Check-and-set happens under an exclusive ``flock`` on the parent directory,
so joiners and leavers never race.

The stack file also lists every namespace the stack serves (attach mode,
by path and inode): :func:`set_served` rewrites that list atomically each
time a namespace is attached or detached while the stack runs, so
``stackctl --netns NS`` and ``stackctl list`` find a stack by any of them.

The supervisor is also what the wrapper watches: when it is gone, or when its
stdout has no reader any more (``honcho start | jq`` after jq exits: honcho
dies of a broken pipe but waits for its children), the stack stops.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import stat
import time
from collections.abc import Iterable

STACK_FILE = "stack"
_STACK_TMP = STACK_FILE + ".tmp-"  # set_served's file before it replaces the stack file


class StackBusy(Exception):
    """Another stack holds this run directory; the message names it."""


def ensure_run_dir(path: str) -> None:
    """Create the run directory 0700, and make an existing one private again."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o700)


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return data[data.rindex(")") + 2:].split()  # fields from 3 (state) on; comm may hold spaces


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        return int(_stat_fields(pid)[19])
    except (OSError, ValueError, IndexError):
        return None


def supervisor_pid() -> int:
    """The process supervising this wrapper: the parent, or for honcho (which runs each
    command from a forked copy of itself) the topmost ancestor with the parent's command line."""
    pid = os.getppid()
    command = _cmdline(pid)
    while pid > 1:
        try:
            up = int(_stat_fields(pid)[1])
        except (OSError, ValueError, IndexError):
            break
        if up <= 1 or _cmdline(up) != command:
            break
        pid = up
    return pid


def stack_id(pid: int) -> str:
    """Identity of the stack supervised by ``pid`` (USTACK_STACK_ID overrides it)."""
    return os.environ.get("USTACK_STACK_ID") or f"{pid}:{start_time(pid)}"


def supervisor_gone(pid: int, started: int | None) -> str | None:
    """Why the supervisor can no longer run the stack, or None while it can."""
    if pid <= 1:
        return None  # init/systemd: outlives us
    if start_time(pid) != started:
        return "exited"
    try:
        fd = os.open(f"/proc/{pid}/fd/1", os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None  # not a pipe we can look at (a tty, a file, /dev/null)
    try:
        if not os.path.basename(os.readlink(f"/proc/{pid}/fd/1")).startswith("pipe:"):
            return None
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        # A pipe's write end polls POLLERR once no reader is left.
        if any(mask & select.POLLERR for _, mask in poller.poll(0)):
            return "output_pipe_closed"
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def _remove_ours(run_dir: str) -> bool:
    """Remove what a stack leaves in its run directory (its sockets and the stack file), nothing
    else: USTACK_RUN_DIR may name a directory that holds other files. True if anything was there."""
    found = False
    for entry in os.listdir(run_dir):
        path = os.path.join(run_dir, entry)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        ours = entry == STACK_FILE or entry.startswith(_STACK_TMP)
        if stat.S_ISSOCK(mode) or (ours and stat.S_ISREG(mode)):
            found = True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return found


@contextlib.contextmanager
def _parent_locked(run_dir: str):
    parent = os.path.dirname(os.path.abspath(run_dir))
    os.makedirs(parent, exist_ok=True)
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def netns_inode(path: str = "/proc/self/ns/net") -> int | None:
    """The inode that names a network namespace (what ``ip netns identify`` compares), or None."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


RUN_BASE = "/run/ustack"  # where default run directories live; stackctl list looks here


def default_run_dir(tun_name: str, attach: str = "") -> str:
    """/run/ustack/<network namespace>-<device>: a stack per namespace never meets
    another's sockets, and stackctl in the same namespace finds its own. Attached,
    /run/ustack/<ours>-<device>-attached-<theirs>: apart from a stack serving this namespace
    (its device lives elsewhere). stackctl finds either by its stack file (live_stacks)."""
    ours, theirs = netns_inode(), (netns_inode(attach) if attach else 0)
    if ours is None or theirs is None:  # not Linux
        return os.path.join("/tmp", f"ustack-{os.getuid()}-{tun_name}")
    name = f"{ours}-{tun_name}-attached-{theirs}" if attach else f"{ours}-{tun_name}"
    return os.path.join(RUN_BASE, name)


def served(paths: Iterable[str]) -> list[dict]:
    """The stack file's ``attached`` list: each namespace served, by path and inode (None once gone)."""
    return [{"path": path, "netns": netns_inode(path)} for path in paths]


def set_served(run_dir: str, paths: Iterable[str]) -> None:
    """Say in ``run_dir``'s stack file that the stack now serves exactly ``paths`` (attach mode;
    called on every attach and detach). Atomic: a reader sees the old list or the new one.
    OSError if the stack file cannot be read (or is not one) or written."""
    path = os.path.join(run_dir, STACK_FILE)
    with open(path) as f:
        try:
            record = json.load(f)
        except ValueError as exc:
            raise OSError(f"{path}: not a stack file: {exc}") from None
    if not isinstance(record, dict):
        raise OSError(f"{path}: not a stack file")
    record["attached"] = served(paths)
    tmp = os.path.join(run_dir, f"{_STACK_TMP}{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class StackLock:
    """This process's membership of the stack that owns ``run_dir``.

    The stack file also says what the stack serves, for ``stackctl list`` and
    ``stackctl --netns`` (:func:`live_stacks`): the device, the namespace it
    runs in and those it is attached to (by inode, as names may change; one
    path, or every one of ``USTACK_ATTACH``; :func:`set_served` keeps the list
    as namespaces come and go).
    """

    def __init__(self, run_dir: str, supervisor: int, device: str = "",
                 attach: str | Iterable[str] = "") -> None:
        self.run_dir = run_dir
        self.supervisor = supervisor
        self.id = stack_id(supervisor)
        self.device = device
        self.attach = [a for a in ([attach] if isinstance(attach, str) else attach) if a]
        self._fd = -1

    def join(self) -> str:
        """Take a shared lock: "created", "took_over" (a stale directory), or "joined";
        raise StackBusy when another stack holds it."""
        with _parent_locked(self.run_dir):
            ensure_run_dir(self.run_dir)
            fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                holder = self._holder()
                if holder.get("id") != self.id:
                    os.close(fd)
                    raise StackBusy(self._busy_message(holder)) from None
                fcntl.flock(fd, fcntl.LOCK_SH)
                self._fd = fd
                return "joined"
            stale = _remove_ours(self.run_dir)  # sockets of a stack that was killed
            with open(os.path.join(self.run_dir, STACK_FILE), "w") as f:
                json.dump({"id": self.id, "supervisor": self.supervisor,
                           "command": _cmdline(self.supervisor).replace(b"\0", b" ").decode(errors="replace").strip(),
                           "started": time.time(), "device": self.device, "netns": netns_inode(),
                           "attached": served(self.attach)},
                          f)
            fcntl.flock(fd, fcntl.LOCK_SH)  # a conversion: safe, joiners wait on the parent lock
            self._fd = fd
            return "took_over" if stale else "created"

    def fileno(self) -> int:
        """The open run directory our shared lock is on (-1 before join): it stays locked while any
        copy of it is open (``pipeline/respawn.c`` holds one, and leaves as :meth:`leave` does)."""
        return self._fd

    def leave(self) -> bool:
        """Release the lock; the last process out removes the run directory (True)."""
        if self._fd < 0:
            return False
        fd, self._fd = self._fd, -1
        with _parent_locked(self.run_dir):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False  # others of this stack still run
            _remove_ours(self.run_dir)
            os.close(fd)
            with contextlib.suppress(OSError):  # not if someone keeps other files there
                os.rmdir(self.run_dir)
            return True

    def _holder(self) -> dict:
        try:
            with open(os.path.join(self.run_dir, STACK_FILE)) as f:
                value = json.load(f)
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    def _busy_message(self, holder: dict) -> str:
        pid = holder.get("supervisor", "?")
        command = holder.get("command") or "unknown command"
        return (f"another ustack already runs on this device in this network namespace: supervisor pid {pid} "
                f"({command}), run directory {self.run_dir}; stop it first (stackctl stop, or Ctrl-C in its "
                "terminal), or give this one another USTACK_TUN")


def live_stacks(base: str) -> list[dict]:
    """Every running stack whose run directory is under ``base``: its stack file's record plus
    ``run_dir``. A directory nobody holds a lock on is a killed stack's leftover, not listed.
    Probed under the parent's lock, as joiners and leavers take it (never a false StackBusy)."""
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return []
    found = []
    for entry in entries:
        run_dir = os.path.join(base, entry)
        try:
            with open(os.path.join(run_dir, STACK_FILE)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or not _held(run_dir):
            continue
        found.append({**record, "run_dir": run_dir})
    return found


def _held(run_dir: str) -> bool:
    with _parent_locked(run_dir):
        try:
            fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True  # its processes hold it shared
        finally:
            os.close(fd)  # and with it our probe's lock, if we got it
        return False
