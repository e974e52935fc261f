"""Every bus endpoint and socket type, per role (STYLE.md §5).

  ingress  ROUTER  bind    <run_dir>/ingress.sock  frames out to workers by name;
                                                   heartbeats in from workers
  workers  DEALER  connect <run_dir>/ingress.sock  routing id = honcho process name
  egress   PULL    bind    <run_dir>/egress.sock   packets in from all workers
  workers  PUSH    connect <run_dir>/egress.sock

Workers connect, the pipeline stages bind: a worker's first heartbeat and its
replies queue in ZeroMQ until the stage it talks to is up, so processes can
start in any order. The run directory is created mode 0700 because ipc socket
files follow the umask.
"""

from __future__ import annotations

import os

import zmq

INGRESS = "ingress.sock"
EGRESS = "egress.sock"

# How long a socket may hold unsent messages at close; without it, close blocks
# forever when a peer is gone (libzmq's default LINGER is -1).
LINGER_MS = 200
# Frames buffered per peer before ZeroMQ drops (PUB/ROUTER) or blocks (PUSH).
HWM = 10_000


def ensure_run_dir(path: str) -> None:
    """Create the run directory 0700, and refuse one that others can enter."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def ipc(run_dir: str, name: str) -> str:
    path = os.path.join(run_dir, name)
    if len(path) > 107:
        raise SystemExit(f"ipc path {path!r} is longer than 107 characters: shorten USTACK_RUN_DIR")
    return "ipc://" + path


def _socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    return sock


def ingress_router(ctx: zmq.Context, run_dir: str) -> zmq.Socket:
    sock = _socket(ctx, zmq.ROUTER)
    # Unknown or vanished worker ids raise EHOSTUNREACH instead of silently
    # swallowing the frame, so ingress notices a dead worker at once.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # A restarted worker reconnecting under its old name takes over its id.
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.bind(ipc(run_dir, INGRESS))
    return sock


def worker_dealer(ctx: zmq.Context, run_dir: str, name: str) -> zmq.Socket:
    sock = _socket(ctx, zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, name.encode())
    sock.connect(ipc(run_dir, INGRESS))
    return sock


def egress_pull(ctx: zmq.Context, run_dir: str) -> zmq.Socket:
    sock = _socket(ctx, zmq.PULL)
    sock.bind(ipc(run_dir, EGRESS))
    return sock


def worker_push(ctx: zmq.Context, run_dir: str) -> zmq.Socket:
    sock = _socket(ctx, zmq.PUSH)
    sock.connect(ipc(run_dir, EGRESS))
    return sock
