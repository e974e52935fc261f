"""Every bus endpoint and socket type, per role (STYLE.md §5).

  ingress  ROUTER  bind    ingress endpoint   frames out to workers by name; heartbeats,
                                              flow announcements in
  ingress  ROUTER  bind    control endpoint   stackctl requests (REQ) in, replies out
  workers  DEALER  connect ingress endpoint   routing id = honcho process name
  egress   DEALER  connect ingress endpoint   heartbeats with egress's counters
  egress   PULL    bind    egress endpoint    packets in from all workers
  workers  PUSH    connect egress endpoint
  all      XPUB    connect telemetry endpoint  telemetry (log records, packet copies, connection
                                                tables), sent only on topics someone subscribed to
  ingress  XSUB    bind    telemetry endpoint  forwards telemetry to the monitor endpoint
  ingress  XPUB    bind    monitor endpoint   stackctl's subscriptions in, telemetry out
  stackctl SUB     connect monitor endpoint
  stackctl REQ     connect control endpoint

Workers connect and the stages bind: a worker's first heartbeat and its
replies queue in ZeroMQ until the stage it talks to is up, so processes can
start in any order. By default every endpoint is ``ipc://`` in a run
directory created mode 0700 (ipc socket files follow the umask). An endpoint
may be ``tcp://`` so workers can run on other hosts; then CURVE is mandatory:
the stages are CURVE servers and only clients whose public key is in
``<keys>/authorized/`` get in (``scripts/keys`` makes the key pairs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import zmq

from pipeline.bus import messages
from pipeline.config import StackConfig
from pipeline.stacklock import ensure_run_dir  # noqa: F401  (processes create the run directory through here)

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

# How long a socket may hold unsent messages at close; without it, close blocks
# forever when a peer is gone (libzmq's default LINGER is -1).
LINGER_MS = 200
# Messages queued per peer before ZeroMQ drops (ROUTER) or refuses (PUSH, DEALER):
# the bound on memory between two stages. A message is a batch of packets, and
# TCP windows, not this queue, are what keep a pipeline full.
HWM = 1000
# Telemetry messages queued per peer before ZeroMQ drops them: a slow or absent reader
# costs a publisher nothing but lost copies (PUB semantics never block).
TELEMETRY_HWM = 1000  # a packet copy may be 64 KB: at most ~64 MB queued per peer
# Frames at least this long are sent without copying when the sender passes copy=False
# (packet batches do): ZeroMQ then keeps a reference to the Python bytes until its I/O thread
# has written them, instead of copying them into a message of its own. That bookkeeping
# costs more than a copy for small frames. Measured here (two processes, ipc, sender CPU
# per frame, copy / zero-copy): 1.5 KB 1.3 / 5.7 us, 8 KB 6.3 / 8.8, 16 KB 12.5 / 13.6,
# 24 KB 16.7 / 15.9, 32 KB 18.4 / 14.0, 48 KB 31.3 / 20.4, 64 KB 34.0 / 21.9: the
# crossover is between 16 and 32 KB. pyzmq's own default (zmq.COPY_THRESHOLD) is 64 KB,
# which TSO segments (up to 64 KB with headers) would mostly stay under.
ZERO_COPY_MIN = 32 * 1024
# Largest message accepted from a tcp:// peer: a 64 KB packet and its metadata.
MAX_MESSAGE = 70_000
# ... except on the telemetry stream, where one message is a worker's whole connection table.
TELEMETRY_MAX_MESSAGE = 64 << 20

SERVER_KEY = "server.key_secret"  # the stages' key pair (stays on the stages' host)
SERVER_PUBLIC = "server.key"      # its public half, copied to every worker host
AUTHORIZED = "authorized"         # public keys of the workers allowed in


def uses_curve(cfg: StackConfig) -> bool:
    return any(e.startswith("tcp://") for e in (cfg.ingress_endpoint, cfg.egress_endpoint, cfg.control_endpoint,
                                                 cfg.telemetry_endpoint, cfg.monitor_endpoint))


def _socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.copy_threshold = ZERO_COPY_MIN
    return sock


def _load(path: str) -> tuple[bytes, bytes | None]:
    import zmq.auth  # only for tcp:// endpoints (its authenticator thread imports asyncio: ~6 MB)

    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot load CURVE key {path}: {exc} (make keys with scripts/keys)") from None


def _key(path: str) -> tuple[bytes, bytes]:
    public, secret = _load(path)
    if secret is None:
        raise SystemExit(f"{path} holds no secret key")
    return public, secret


def _public_key(path: str) -> bytes:
    return _load(path)[0]


def start_authenticator(ctx: zmq.Context, cfg: StackConfig) -> ThreadAuthenticator | None:
    """For tcp:// endpoints: admit only clients whose public key is authorized."""
    if not uses_curve(cfg):
        return None
    from zmq.auth.thread import ThreadAuthenticator  # only here: it imports asyncio (~6 MB a process)

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=os.path.join(cfg.keys_dir, AUTHORIZED))
    return auth


def _bind(sock: zmq.Socket, endpoint: str, cfg: StackConfig, max_message: int = MAX_MESSAGE) -> None:
    if endpoint.startswith("tcp://"):
        public, secret = _key(os.path.join(cfg.keys_dir, SERVER_KEY))
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    sock.bind(endpoint)


def _connect(sock: zmq.Socket, endpoint: str, cfg: StackConfig, max_message: int = MAX_MESSAGE) -> None:
    if endpoint.startswith("tcp://"):
        sock.curve_serverkey = _public_key(os.path.join(cfg.keys_dir, SERVER_PUBLIC))
        sock.curve_publickey, sock.curve_secretkey = _key(cfg.client_key)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    sock.connect(endpoint)


def ingress_router(ctx: zmq.Context, cfg: StackConfig) -> zmq.Socket:
    sock = _socket(ctx, zmq.ROUTER)
    # Unknown or vanished worker ids raise EHOSTUNREACH instead of silently
    # swallowing the frame, so ingress notices a dead worker at once.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # A restarted worker reconnecting under its old name takes over its id.
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    _bind(sock, cfg.ingress_bind, cfg)
    return sock


def control_router(ctx: zmq.Context, cfg: StackConfig) -> zmq.Socket:
    sock = _socket(ctx, zmq.ROUTER)
    _bind(sock, cfg.control_bind, cfg)
    return sock


def worker_dealer(ctx: zmq.Context, cfg: StackConfig, name: str) -> zmq.Socket:
    sock = _socket(ctx, zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, name.encode())
    _connect(sock, cfg.ingress_endpoint, cfg)
    return sock


def egress_pull(ctx: zmq.Context, cfg: StackConfig) -> zmq.Socket:
    sock = _socket(ctx, zmq.PULL)
    _bind(sock, cfg.egress_bind, cfg)
    return sock


def worker_push(ctx: zmq.Context, cfg: StackConfig) -> zmq.Socket:
    sock = _socket(ctx, zmq.PUSH)
    _connect(sock, cfg.egress_endpoint, cfg)
    return sock


def control_request(ctx: zmq.Context, cfg: StackConfig) -> zmq.Socket:
    sock = _socket(ctx, zmq.REQ)
    _connect(sock, cfg.control_endpoint, cfg)
    return sock


def telemetry_publisher(ctx: zmq.Context, cfg: StackConfig) -> zmq.Socket:
    sock = _socket(ctx, zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, TELEMETRY_HWM)
    sock.setsockopt(zmq.LINGER, 0)
    # Every subscription reaches us, also a repeated one: subscribing is how stackctl asks.
    sock.setsockopt(zmq.XPUB_VERBOSE, 1)
    _connect(sock, cfg.telemetry_endpoint, cfg)
    return sock


def telemetry_forwarder(ctx: zmq.Context, cfg: StackConfig) -> tuple[zmq.Socket, zmq.Socket]:
    """Ingress's side: (XSUB for the publishers, XPUB for stackctl)."""
    inbound = _socket(ctx, zmq.XSUB)
    inbound.setsockopt(zmq.RCVHWM, TELEMETRY_HWM)
    _bind(inbound, cfg.telemetry_bind, cfg, TELEMETRY_MAX_MESSAGE)
    outbound = _socket(ctx, zmq.XPUB)
    outbound.setsockopt(zmq.SNDHWM, TELEMETRY_HWM)
    # Each subscriber's subscribe and unsubscribe (and disconnect) is passed on, so the
    # publishers see every request and stop publishing once the last reader is gone.
    outbound.setsockopt(zmq.XPUB_VERBOSER, 1)
    _bind(outbound, cfg.monitor_bind, cfg)
    return inbound, outbound


def telemetry_subscriber(ctx: zmq.Context, cfg: StackConfig, topic: bytes) -> zmq.Socket:
    sock = _socket(ctx, zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, TELEMETRY_HWM)
    sock.setsockopt(zmq.SUBSCRIBE, topic)
    _connect(sock, cfg.monitor_endpoint, cfg, TELEMETRY_MAX_MESSAGE)
    return sock


def auth_monitor(sock: zmq.Socket) -> zmq.Socket | None:
    """For a CURVE server socket: a monitor that reports refused handshakes."""
    if not sock.curve_server:
        return None
    return sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


def log_refusals(monitor: zmq.Socket, log) -> None:
    """Log each refused peer (no authorised key, or a broken handshake)."""
    from zmq.utils.monitor import recv_monitor_message

    while True:
        try:
            event = recv_monitor_message(monitor, flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        log.warning("peer_refused", endpoint=event.get("endpoint", b"").decode(errors="replace"),
                    reason="auth" if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "handshake",
                    code=event.get("value"))


def poll(poller: zmq.Poller, timeout_ms: int, busy: float = 0.0) -> list[tuple[Any, int]]:
    """``poller.poll(timeout_ms)``, first spinning up to ``busy`` seconds on non-blocking polls
    (USTACK_BUSY_POLL, like Linux's net.core.busy_poll): a message that comes meanwhile is
    taken without the sleep and wake-up of a blocking poll, at the price of a busy CPU."""
    if busy > 0.0 and timeout_ms > 0:
        end = time.monotonic() + min(busy, timeout_ms / 1000)
        while True:
            ready = poller.poll(0)
            if ready or time.monotonic() >= end:
                return ready or poller.poll(max(0, timeout_ms - round(busy * 1000)))
    return poller.poll(timeout_ms)


def drain(sock: zmq.Socket, drop: Callable[..., None], routed: bool = False
          ) -> Iterator[tuple[bytes, messages.Message]]:
    """Every message waiting on ``sock``, decoded, with the sender's routing id when
    ``routed`` (a ROUTER socket; else b""). Malformed messages are counted and skipped."""
    while True:
        try:
            frames = sock.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        peer = frames.pop(0) if routed and frames else b""
        try:
            yield peer, messages.decode(frames)
        except messages.BusError as exc:
            drop("bus_" + str(exc))


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
