"""The bus message layout: the one place that encodes and decodes it.

Every message is a ZeroMQ multipart message whose first frame is a msgpack
array ``[VERSION, kind, ...]``; packet bytes travel in a frame of their own
(never inside msgpack, which would copy them twice). Kinds:

  PACKETS    [1, 0, offloads(, stamps(, ns))]    + packets  ingress -> worker, worker -> egress
  HEARTBEAT  [1, 1, name, role, seq, stats(, steered)]     worker/egress -> ingress, every HEARTBEAT_INTERVAL
  GOODBYE    [1, 2, name]                                   worker -> ingress, on clean shutdown
  WELCOME    [1, 3, epoch]                                  ingress -> worker, when it (re)joins
  FLOWS      [1, 4, name, full, opened, closed(, ns)]       tcp worker -> ingress: flows it owns
  REQUEST    [1, 5, command(, args)]                        stackctl -> ingress (control socket)
  REPLY      [1, 6, status, reason, payload]                ingress -> stackctl
  ORPHANS    [1, 7, flows(, ns)]                            ingress -> tcp worker: flows of a dead worker,
                                                            whose peers must be made to reset
  STOP       [1, 8]                                         ingress -> worker/egress: ordered shutdown
                                                            (``stackctl stop``): finish, say goodbye, idle
  LATENCY    [1, 12, name, samples]                         egress/worker -> ingress: latency budget samples
  PUBLISHED  [1, 13, table]                                 ingress -> tcp/udp worker: the published ports,
                                                            on every change and after each WELCOME
  NAMESPACES [1, 14, table]                                 ingress -> worker/egress: the attached namespaces,
                                                            on every change and after each WELCOME

The telemetry stream (``pipeline.telemetry``) is PUB/SUB: its first frame is
a topic, and a process publishes on a topic only while someone subscribes.

  LOG        topic LOG_TOPIC,     then one JSON log record (UTF-8)
  CAPTURING  topic CAPTURE_TOPIC, [1, 9, name]              a process starts publishing packet copies
  CAPTURED   topic CAPTURE_TOPIC, [1, 10, name, direction, time] + packet
                                                            a packet as it crossed the device; direction
                                                            "in" (read by ingress) or "out" (written by
                                                            egress); time in seconds since the epoch
  CONNS      topic CONNS_TOPIC,   [1, 11, name, records]    a tcp worker's connections, sent when a
                                                            subscription arrives (subscribing asks)

PACKETS carries one or more IP packets, each in a frame of its own: a
process sends everything it has for one peer after a wake-up as one message,
so under load the per-message cost of ZeroMQ (a wake-up of its I/O thread)
is paid once per batch, and at idle a batch is a single packet with no added
delay. ``offloads`` is None when no packet has offload metadata, else a list
with, per packet, None or the virtio-net header fields
``[flags, gso_type, hdr_len, gso_size, csum_start, csum_offset]``. ``stamps``,
present only while ``stackctl latency`` measures, lists up to four monotonic
times (or None) of the packets' way so far (``pipeline.latency``); LATENCY's
``samples`` maps a stage name to microsecond durations. ``stats``
maps counter names to integers. ``steered``, present only when not empty,
lists the ports a worker wants steered by client: its services declared
that every connection of one client address to such a port must reach the
same worker (``pipeline.routing``). A flow is ``[remote address (bytes), remote
port, local port]`` (``pipeline.flow.Flow.bus``); ``full`` says ``opened`` is
every flow the worker owns (sent after a WELCOME, so a restarted ingress
learns who owns what). ``epoch`` identifies
one ingress lifetime. A REPLY's ``status`` is "ok" or "error" (with a
``reason``); the ``flows`` command's payload is ``[[flow, worker], ...]``
(``flow_table``). A REQUEST's ``args``, present only when not empty, are
strings (``publish_add``'s ``"tcp:8080:80"``). PUBLISHED's ``table`` is the
whole table of published ports (attach mode), ``[[proto, port, to_port],
...]``: ``proto`` "tcp" or "udp", ``port`` where the stack runs, ``to_port``
in the namespace (``pipeline.publishing``), and a fourth element, the index of the
namespace it publishes into, when that is not 0. ``ns`` (PACKETS, FLOWS, ORPHANS) is
the index of the attached namespace the packets came from or go to, and the flows
are in; absent means 0, the first (or only) one, so a stack of one namespace sends
exactly what it always did. NAMESPACES's ``table`` is ``[[index, name, path], ...]``,
every namespace the stack is attached to (``pipeline.attachments``): a worker
keeps one core per namespace, egress one device queue. On ROUTER sockets ZeroMQ adds
the peer's routing id as the first frame; ``decode`` takes the frames after it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import json

import msgpack

from pipeline.flow import Flow, is_port
from pipeline.offload import Offload

VERSION = 1
PACKETS = 0
HEARTBEAT = 1
GOODBYE = 2
WELCOME = 3
FLOWS = 4
REQUEST = 5
REPLY = 6
ORPHANS = 7
STOP = 8
CAPTURING = 9
CAPTURED = 10
CONNS = 11
LATENCY = 12
PUBLISHED = 13
NAMESPACES = 14

# Telemetry topics: none is a prefix of another (ZeroMQ matches topics by prefix).
LOG_TOPIC = b"log."
CAPTURE_TOPIC = b"pcap."
CONNS_TOPIC = b"conns."
TOPICS = (LOG_TOPIC, CAPTURE_TOPIC, CONNS_TOPIC)

HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats
HEARTBEAT_TIMEOUT = 3.0   # ingress forgets a worker silent this long

_packb = msgpack.Packer(use_bin_type=True).pack
# The common case, a plain packet with no offload metadata, costs nothing to encode.
_PLAIN_PACKETS_META = msgpack.packb([VERSION, PACKETS, None])
MAX_BATCH = 256  # packets per PACKETS message


class BusError(ValueError):
    """A bus message that does not follow this layout (counted and dropped)."""


# A packet and its virtio-net header fields. Ingress may hand on a large packet as a view of
# the bytes it read (``pipeline.tun``); what a worker receives is always bytes.
Item = tuple[bytes | memoryview, Offload | None]


@dataclass(frozen=True, slots=True)
class Packets:
    items: list[Item]
    stamps: list[float | None] | None = None  # pipeline.latency, while someone measures
    ns: int = 0  # the attached namespace they came from or go to


@dataclass(frozen=True, slots=True)
class Latency:
    name: str
    samples: dict[str, list[int]]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    name: str
    role: str
    seq: int
    stats: dict[str, int] = field(default_factory=dict)
    steered: frozenset[int] = frozenset()  # ports to steer by client (a TCP worker's services ask)


@dataclass(frozen=True, slots=True)
class Goodbye:
    name: str


@dataclass(frozen=True, slots=True)
class Welcome:
    epoch: int

    @property
    def label(self) -> str:
        return epoch_label(self.epoch)


def epoch_label(epoch: int) -> str:
    """The one form an epoch takes where people read it (logs, stackctl): 8 hex digits."""
    return f"{epoch:08x}"


@dataclass(frozen=True, slots=True)
class Flows:
    name: str
    full: bool
    opened: tuple[Flow, ...]
    closed: tuple[Flow, ...]
    ns: int = 0


@dataclass(frozen=True, slots=True)
class Request:
    command: str
    args: tuple[str, ...] = ()


# A published port: (protocol "tcp" or "udp", port where the stack runs, port in the namespace,
# index of that namespace).
PublishedPort = tuple[str, int, int, int]

# An attached namespace: (index, name, path).
Attached = tuple[int, str, str]


@dataclass(frozen=True, slots=True)
class Namespaces:
    table: tuple[Attached, ...]


@dataclass(frozen=True, slots=True)
class Published:
    table: tuple[PublishedPort, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    status: str
    reason: str | None
    payload: Any


@dataclass(frozen=True, slots=True)
class Orphans:
    flows: tuple[Flow, ...]
    ns: int = 0


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class Capturing:
    name: str


@dataclass(frozen=True, slots=True)
class Captured:
    name: str
    direction: str
    time: float
    packet: bytes


@dataclass(frozen=True, slots=True)
class Conns:
    name: str
    records: list[dict[str, Any]]


Message = Packets | Heartbeat | Goodbye | Welcome | Flows | Request | Reply | Orphans | Stop | Latency | Published \
    | Namespaces


def encode_stop() -> list[bytes]:
    return [_packb([VERSION, STOP])]


def encode_log(record: bytes) -> list[bytes]:
    return [LOG_TOPIC, record]


def encode_capturing(name: str) -> list[bytes]:
    return [CAPTURE_TOPIC, _packb([VERSION, CAPTURING, name])]


def encode_captured(name: str, direction: str, time: float, packet: bytes | memoryview) -> list[bytes | memoryview]:
    return [CAPTURE_TOPIC, _packb([VERSION, CAPTURED, name, direction, time]), packet]


def encode_conns(name: str, records: list[dict[str, Any]]) -> list[bytes]:
    return [CONNS_TOPIC, _packb([VERSION, CONNS, name, records])]


def decode_telemetry(frames: list[bytes]) -> dict[str, Any] | Capturing | Captured | Conns:
    """One telemetry message (topic frame first): a log record (a dict), or one of the
    capture and connection messages; BusError on anything malformed."""
    if len(frames) < 2:
        raise BusError("telemetry_frames")
    topic = frames[0]
    if topic == LOG_TOPIC:
        try:
            record = json.loads(frames[1])
        except ValueError as exc:
            raise BusError("bad_log") from exc
        if not isinstance(record, dict):
            raise BusError("bad_log")
        return record
    try:
        meta = msgpack.unpackb(frames[1], use_list=True, raw=False)
    except Exception as exc:  # msgpack raises several types; all mean "bad frame"
        raise BusError("bad_msgpack") from exc
    if not (isinstance(meta, list) and len(meta) >= 3 and meta[0] == VERSION and isinstance(meta[2], str)):
        raise BusError("bad_meta")
    kind, name = meta[1], meta[2]
    if topic == CAPTURE_TOPIC and kind == CAPTURING and len(meta) == 3:
        return Capturing(name)
    if topic == CAPTURE_TOPIC and kind == CAPTURED and len(meta) == 5 and len(frames) == 3:
        direction, when = meta[3], meta[4]
        if direction in ("in", "out") and isinstance(when, (int, float)):
            return Captured(name, direction, float(when), frames[2])
    if topic == CONNS_TOPIC and kind == CONNS and len(meta) == 4 and isinstance(meta[3], list) \
            and all(isinstance(r, dict) for r in meta[3]):
        return Conns(name, meta[3])
    raise BusError("bad_telemetry")


def encode_packets(items: list[Item], stamps: list[float | None] | None = None,
                   ns: int = 0) -> list[bytes | memoryview]:
    """One PACKETS message for up to MAX_BATCH packets (callers split longer lists).

    Each packet is its own frame, as it came (no joining, no re-slicing): senders pass
    ``copy=False`` and ZeroMQ then takes large frames without copying them
    (``endpoints.ZERO_COPY_MIN``)."""
    plain = all(offload is None for _, offload in items)
    if plain and stamps is None and not ns:
        return [_PLAIN_PACKETS_META, *(data for data, _ in items)]
    offloads = None if plain else [None if o is None else list(o) for _, o in items]
    fields: list[object] = [VERSION, PACKETS, offloads]
    if stamps is not None or ns:
        fields.append(stamps)
    if ns:
        fields.append(ns)
    return [_packb(fields), *(data for data, _ in items)]


def encode_latency(name: str, samples: dict[str, list[int]]) -> list[bytes]:
    return [_packb([VERSION, LATENCY, name, samples])]


MAX_LATENCY_SAMPLES = 100_000  # per stage in one message: a process sends a few times a second


def _stamps(value: object) -> list[float | None]:
    if not (isinstance(value, list) and len(value) <= 4
            and all(v is None or isinstance(v, (int, float)) for v in value)):
        raise BusError("bad_stamps")
    return [None if v is None else float(v) for v in value]


def _offload(value: object) -> Offload | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 6 and all(isinstance(v, int) for v in value)):
        raise BusError("bad_offload")
    return tuple(value)  # type: ignore[return-value]


def encode_heartbeat(name: str, role: str, seq: int, stats: dict[str, int] | None = None,
                     steered: Collection[int] = ()) -> list[bytes]:
    fields: list[object] = [VERSION, HEARTBEAT, name, role, seq, stats or {}]
    if steered:
        fields.append(sorted(steered))
    return [_packb(fields)]


def encode_goodbye(name: str) -> list[bytes]:
    return [_packb([VERSION, GOODBYE, name])]


def encode_welcome(epoch: int) -> list[bytes]:
    return [_packb([VERSION, WELCOME, epoch])]


def encode_flows(name: str, full: bool, opened: list[Flow], closed: list[Flow], ns: int = 0) -> list[bytes]:
    fields: list[object] = [VERSION, FLOWS, name, full, [f.bus() for f in opened], [f.bus() for f in closed]]
    return [_packb(fields + [ns] if ns else fields)]


def encode_request(command: str, args: Collection[str] = ()) -> list[bytes]:
    fields: list[object] = [VERSION, REQUEST, command]
    if args:
        fields.append(list(args))
    return [_packb(fields)]


def encode_published(table: Collection[PublishedPort]) -> list[bytes]:
    return [_packb([VERSION, PUBLISHED, [list(row) if row[3] else list(row[:3]) for row in table]])]


def _published_port(row: object) -> PublishedPort:
    if not (isinstance(row, list) and len(row) in (3, 4) and row[0] in ("tcp", "udp")
            and is_port(row[1]) and is_port(row[2]) and row[1] and row[2]
            and (len(row) == 3 or _is_index(row[3]))):
        raise BusError("bad_published")
    return row[0], row[1], row[2], row[3] if len(row) == 4 else 0


def encode_namespaces(table: Collection[Attached]) -> list[bytes]:
    return [_packb([VERSION, NAMESPACES, [list(row) for row in table]])]


def _attached(row: object) -> Attached:
    if not (isinstance(row, list) and len(row) == 3 and _is_index(row[0]) and isinstance(row[1], str)
            and isinstance(row[2], str)):
        raise BusError("bad_namespaces")
    return row[0], row[1], row[2]


MAX_NAMESPACES = 4096  # indexes of attached namespaces are below this


def _is_index(value: object) -> bool:
    return type(value) is int and 0 <= value < MAX_NAMESPACES


def encode_reply(status: str, reason: str | None, payload: Any) -> list[bytes]:
    return [_packb([VERSION, REPLY, status, reason, payload])]


def encode_orphans(flows: list[Flow], ns: int = 0) -> list[bytes]:
    fields: list[object] = [VERSION, ORPHANS, [f.bus() for f in flows]]
    return [_packb(fields + [ns] if ns else fields)]


def flow_table(rows: list[tuple[Flow, str, str]]) -> list[list[object]]:
    """The payload of a REPLY to ``flows``: each flow ingress routes, with its owner and namespace."""
    return [[flow.bus(), worker, ns] for flow, worker, ns in rows]


def decode_flow_table(payload: object) -> list[tuple[Flow, str, str]]:
    if not isinstance(payload, list):
        raise BusError("bad_flow_table")
    rows = []
    for row in payload:
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[1], str) and isinstance(row[2], str)):
            raise BusError("bad_flow_table")
        try:
            rows.append((Flow.from_bus(row[0]), row[1], row[2]))
        except ValueError:
            raise BusError("bad_flow_table") from None
    return rows


def _flows(items: object) -> tuple[Flow, ...]:
    if not isinstance(items, list):
        raise BusError("bad_flows")
    try:
        return tuple(Flow.from_bus(f) for f in items)
    except ValueError:
        raise BusError("bad_flows") from None


def decode(frames: list[bytes]) -> Message:
    """Decode one message; raise BusError on anything malformed."""
    if not frames:
        raise BusError("empty")
    if frames[0] == _PLAIN_PACKETS_META:  # hot path: skip msgpack entirely
        if len(frames) < 2:
            raise BusError("packet_frames")
        return Packets([(data, None) for data in frames[1:]])
    try:
        meta = msgpack.unpackb(frames[0], use_list=True, raw=False)
    except Exception as exc:  # msgpack raises several types; all mean "bad frame"
        raise BusError("bad_msgpack") from exc
    if not isinstance(meta, list) or len(meta) < 2:
        raise BusError("bad_meta")
    if meta[0] != VERSION:
        raise BusError("bad_version")
    kind = meta[1]
    fields = meta[2:]
    try:
        if kind == PACKETS:
            if len(fields) not in (1, 2, 3):
                raise BusError("bad_fields")
            offloads = fields[0]
            stamps = _stamps(fields[1]) if len(fields) >= 2 and fields[1] is not None else None
            ns = fields[2] if len(fields) == 3 else 0
            if not _is_index(ns):
                raise BusError("bad_ns")
            datas = frames[1:]
            if not datas:
                raise BusError("packet_frames")
            if offloads is None:
                return Packets([(data, None) for data in datas], stamps, ns)
            if not isinstance(offloads, list) or len(offloads) != len(datas):
                raise BusError("bad_offload")
            return Packets([(data, _offload(o)) for data, o in zip(datas, offloads)], stamps, ns)
        if kind == LATENCY:
            name, samples = fields
            if not (isinstance(name, str) and isinstance(samples, dict) and all(
                    isinstance(k, str) and isinstance(v, list) and len(v) <= MAX_LATENCY_SAMPLES
                    and all(isinstance(x, int) and x >= 0 for x in v) for k, v in samples.items())):
                raise BusError("bad_latency")
            return Latency(name, samples)
        if kind == HEARTBEAT:
            if len(fields) not in (4, 5):
                raise BusError("bad_fields")
            name, role, seq, stats = fields[:4]
            steered = fields[4] if len(fields) == 5 else []
            if not (isinstance(name, str) and isinstance(role, str) and isinstance(seq, int)
                    and isinstance(stats, dict)
                    and all(isinstance(k, str) and isinstance(v, int) for k, v in stats.items())
                    and isinstance(steered, list) and all(is_port(p) for p in steered)):
                raise BusError("bad_heartbeat")
            return Heartbeat(name, role, seq, stats, frozenset(steered))
        if kind == GOODBYE:
            (name,) = fields
            if not isinstance(name, str):
                raise BusError("bad_goodbye")
            return Goodbye(name)
        if kind == WELCOME:
            (epoch,) = fields
            if not isinstance(epoch, int):
                raise BusError("bad_welcome")
            return Welcome(epoch)
        if kind == FLOWS:
            name, full, opened, closed, *rest = fields
            ns = rest[0] if rest else 0
            if not (isinstance(name, str) and isinstance(full, bool) and len(rest) <= 1 and _is_index(ns)):
                raise BusError("bad_flows")
            return Flows(name, full, _flows(opened), _flows(closed), ns)
        if kind == STOP:
            if fields:
                raise BusError("bad_fields")
            return Stop()
        if kind == ORPHANS:
            flows, *rest = fields
            ns = rest[0] if rest else 0
            if len(rest) > 1 or not _is_index(ns):
                raise BusError("bad_orphans")
            return Orphans(_flows(flows), ns)
        if kind == REQUEST:
            if len(fields) not in (1, 2):
                raise BusError("bad_fields")
            command = fields[0]
            args = fields[1] if len(fields) == 2 else []
            if not (isinstance(command, str) and isinstance(args, list) and all(isinstance(a, str) for a in args)):
                raise BusError("bad_request")
            return Request(command, tuple(args))
        if kind == PUBLISHED:
            (table,) = fields
            if not isinstance(table, list):
                raise BusError("bad_published")
            return Published(tuple(_published_port(row) for row in table))
        if kind == NAMESPACES:
            (table,) = fields
            if not isinstance(table, list):
                raise BusError("bad_namespaces")
            return Namespaces(tuple(_attached(row) for row in table))
        if kind == REPLY:
            status, reason, payload = fields
            if status not in ("ok", "error") or not (reason is None or isinstance(reason, str)):
                raise BusError("bad_reply")
            return Reply(status, reason, payload)
    except ValueError as exc:  # wrong field count when unpacking
        if isinstance(exc, BusError):
            raise
        raise BusError("bad_fields") from exc
    raise BusError("unknown_kind")
