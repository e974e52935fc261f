"""The attached namespace's resolv.conf: the stack's resolver, the way ``ip netns exec`` expects it.

Contract: ``install(attach, addresses, owner)`` writes
``/etc/netns/<name>/resolv.conf`` naming ``addresses`` when the attached
namespace is a named one (``/run/netns/<name>``) and no such file exists (one
that does is the operator's, and is left alone); ``ip netns exec <name> …``
bind-mounts it over ``/etc/resolv.conf``, so every program run that way asks
the stack. The file's first line names ``owner`` (the stack's run
directory), so a restarted ingress knows it is its own; ``remove`` deletes
it, and the directory if it is left empty, only when it is.
"""

from __future__ import annotations

import contextlib
import os

NETNS_RUN = "/run/netns/"
NETNS_ETC = "/etc/netns"


def _marker(owner: str) -> str:
    return f"# written by ustack (attach mode) for {owner}: removed when the stack stops\n"


def path_for(attach: str) -> str | None:
    """Where ``ip netns exec`` looks for the attached namespace's resolv.conf; None if it is unnamed."""
    if not attach.startswith(NETNS_RUN) or "/" in attach[len(NETNS_RUN):]:
        return None
    return os.path.join(NETNS_ETC, attach[len(NETNS_RUN):], "resolv.conf")


def install(attach: str, addresses: list[str], owner: str) -> str | None:
    """The path written (or already ours), None when there is none to write or it is someone else's."""
    path = path_for(attach)
    if path is None:
        return None
    text = _marker(owner) + "".join(f"nameserver {address}\n" for address in addresses)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return path if _ours(path, owner) else None
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def remove(path: str, owner: str) -> None:
    if not _ours(path, owner):
        return
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))  # only if empty: ours, or the operator's empty one


def _ours(path: str, owner: str) -> bool:
    with contextlib.suppress(OSError):
        with open(path) as f:
            return f.readline() == _marker(owner)
    return False
