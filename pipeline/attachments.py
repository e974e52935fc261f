"""The namespaces one stack is the network of (attach mode, issue 21): what ingress holds for each.

Contract: an ``Attachment`` is one attached namespace: its index (what the bus
carries: ``ns`` of PACKETS, FLOWS, ORPHANS), its name (what records and
stackctl say), its path, the device queue ingress reads there, the router
that keeps its flows and fragments apart from every other namespace's
(each sees the same addresses: 10.0.0.1 its own, 10.0.0.2 the stack), and
the resolv.conf written for it. ``open_attachment`` opens and configures the
device inside the namespace (``pipeline.tun``); ``close`` gives it all back.
``gone`` tells whether the namespace still exists as it was attached (a
namespace deleted while attached is detached by ingress).

A stack that is no other namespace's network has one attachment, index 0,
with no path: its own device in its own namespace.

A restarted ingress is attached where the one before it was, under the same
indexes (the workers' cores and the published ports are by index): ``save``
writes them to the run directory with the stack's id on every change,
``load`` takes them back only for the same stack (a fresh start begins from
USTACK_ATTACH), and ``discard`` removes the file when the stack stops.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline import resolvconf, tun
from pipeline.config import StackConfig
from pipeline.config import netns_label as name_of
from pipeline.routing import Router


def inode_of(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


@dataclass
class Attachment:
    index: int
    path: str                # "" for the stack's own namespace
    device: tun.TunDevice
    router: Router
    inode: int | None        # the namespace's, when attached: another (or none) means it is gone
    resolv_conf: str | None  # the resolv.conf written for it, removed on detach

    @property
    def name(self) -> str:
        return name_of(self.path)

    def row(self) -> tuple[int, str, str]:
        """Its row of NAMESPACES (``pipeline.bus.messages``)."""
        return self.index, self.name, self.path

    def record(self) -> dict[str, object]:
        return {"index": self.index, "name": self.name, "path": self.path, "device": self.device.name,
                "flows": len(self.router.flows)}

    def gone(self) -> bool:
        return bool(self.path) and inode_of(self.path) != self.inode

    def close(self, run_dir: str) -> None:
        self.device.close()
        if self.resolv_conf is not None:
            resolvconf.remove(self.resolv_conf, run_dir)


def open_attachment(cfg: StackConfig, index: int, path: str, router: Router, dns: bool) -> Attachment:
    """The device inside ``path`` (our own namespace if empty), configured, and its resolv.conf
    (``dns``: the stack answers there); TunError if the device cannot be had."""
    inode = inode_of(path) if path else None
    device = tun.open_device(cfg.tun_name, writer_only=False, offload=cfg.offload, run_dir=cfg.run_dir, netns=path)
    try:
        tun.configure_kernel_side(device.name, str(cfg.host_interface), cfg.mtu,
                                  None if cfg.host_interface6 is None else str(cfg.host_interface6),
                                  netns=path, default_route=cfg.default_route)
    except BaseException:
        device.close()
        raise
    resolv_conf = None
    if path and dns:
        stack = [str(a) for a in (cfg.stack_address, cfg.stack_address6) if a is not None]
        resolv_conf = resolvconf.install(path, stack, cfg.run_dir)
    return Attachment(index, path, device, router, inode, resolv_conf)


FILE = "attached.json"


def load(run_dir: str, stack: str | None, at_start: Sequence[str]) -> dict[int, str]:
    """Index -> path: what this stack's previous ingress was attached to, else USTACK_ATTACH's, in order."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        with open(os.path.join(run_dir, FILE)) as f:
            saved = json.load(f)
        if stack is not None and saved.get("stack") == stack:
            return {int(index): str(path) for index, path in saved["attached"]}
    return dict(enumerate(at_start))


def save(run_dir: str, stack: str | None, attached: list[tuple[int, str]]) -> None:
    path = os.path.join(run_dir, FILE)
    with open(path + ".new", "w") as f:
        json.dump({"stack": stack, "attached": sorted(attached)}, f)
    os.replace(path + ".new", path)


def discard(run_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(run_dir, FILE))
