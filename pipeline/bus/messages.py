"""The bus message layout: the one place that encodes and decodes it.

Every message is a ZeroMQ multipart message whose first frame is a msgpack
array ``[VERSION, kind, ...]``; packet bytes travel in a frame of their own
(never inside msgpack, which would copy them twice). Kinds:

  PACKET     [1, 0, offload]          + packet frame   ingress -> worker, worker -> egress
  HEARTBEAT  [1, 1, name, role, seq]                   worker -> ingress, every HEARTBEAT_INTERVAL
  GOODBYE    [1, 2, name]                              worker -> ingress, on clean shutdown

``offload`` is None, or the virtio-net header fields
``[flags, gso_type, hdr_len, gso_size, csum_start, csum_offset]`` when the
device runs with offloads (the fast path); it travels with its packet.
On the ROUTER side ZeroMQ adds the peer's routing id as the first frame;
``decode`` takes the frames after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from pipeline.offload import Offload

VERSION = 1
PACKET = 0
HEARTBEAT = 1
GOODBYE = 2

HEARTBEAT_INTERVAL = 1.0  # seconds between worker heartbeats
HEARTBEAT_TIMEOUT = 3.0   # ingress forgets a worker silent this long


_packb = msgpack.Packer(use_bin_type=True).pack
# The common case, a plain packet with no offload metadata, costs nothing to encode.
_PLAIN_PACKET_META = msgpack.packb([VERSION, PACKET, None])


class BusError(ValueError):
    """A bus message that does not follow this layout (counted and dropped)."""


@dataclass(frozen=True, slots=True)
class Packet:
    data: bytes
    offload: Offload | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    name: str
    role: str
    seq: int


@dataclass(frozen=True, slots=True)
class Goodbye:
    name: str


Message = Packet | Heartbeat | Goodbye


def encode_packet(data: bytes, offload: Offload | None = None) -> list[bytes]:
    meta = _PLAIN_PACKET_META if offload is None else _packb([VERSION, PACKET, list(offload)])
    return [meta, data]


def encode_heartbeat(name: str, role: str, seq: int) -> list[bytes]:
    return [_packb([VERSION, HEARTBEAT, name, role, seq])]


def encode_goodbye(name: str) -> list[bytes]:
    return [_packb([VERSION, GOODBYE, name])]


def decode(frames: list[bytes]) -> Message:
    """Decode one message; raise BusError on anything malformed."""
    if not frames:
        raise BusError("empty")
    if frames[0] == _PLAIN_PACKET_META:  # hot path: skip msgpack entirely
        if len(frames) != 2:
            raise BusError("packet_frames")
        return Packet(frames[1])
    try:
        meta = msgpack.unpackb(frames[0], use_list=True, raw=False)
    except Exception as exc:  # msgpack raises several types; all mean "bad frame"
        raise BusError("bad_msgpack") from exc
    if not isinstance(meta, list) or len(meta) < 2:
        raise BusError("bad_meta")
    if meta[0] != VERSION:
        raise BusError("bad_version")
    kind = meta[1]
    try:
        if kind == PACKET:
            (offload,) = meta[2:]
            if len(frames) != 2:
                raise BusError("packet_frames")
            if offload is not None:
                if not (isinstance(offload, list) and len(offload) == 6 and all(isinstance(v, int) for v in offload)):
                    raise BusError("bad_offload")
                offload = tuple(offload)
            return Packet(frames[1], offload)
        if kind == HEARTBEAT:
            name, role, seq = meta[2:]
            if not (isinstance(name, str) and isinstance(role, str) and isinstance(seq, int)):
                raise BusError("bad_heartbeat")
            return Heartbeat(name, role, seq)
        if kind == GOODBYE:
            (name,) = meta[2:]
            if not isinstance(name, str):
                raise BusError("bad_goodbye")
            return Goodbye(name)
    except ValueError as exc:  # wrong field count when unpacking meta[2:]
        if isinstance(exc, BusError):
            raise
        raise BusError("bad_fields") from exc
    raise BusError("unknown_kind")
