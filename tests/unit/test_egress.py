"""Egress's writer: one device write per packet, as it came over the bus, and a bounded drain.

A real ZeroMQ PUSH/PULL pair (inproc) carries the messages; the device is an
in-memory one that records what it is asked to write.
"""

from __future__ import annotations

import collections

import pytest
import zmq

from pipeline.bus import endpoints, messages
from pipeline.egress import MAX_DRAIN, Writer


class RecordingDevice:
    """A TUN device that keeps what is written to it (refusing packets that start with b"X")."""

    name = "rec0"
    offload = True

    def __init__(self) -> None:
        self.written: list[tuple[bytes, object]] = []

    def write(self, packet, offload=None) -> None:
        if bytes(packet[:1]) == b"X":
            raise OSError(22, "Invalid argument")
        self.written.append((bytes(packet), offload))


@pytest.fixture
def pair():
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind("inproc://egress-test")
    push = ctx.socket(zmq.PUSH)
    push.connect("inproc://egress-test")
    yield push, pull
    push.close(linger=0)
    pull.close(linger=0)
    ctx.term()


def make_writer():
    counters: collections.Counter[str] = collections.Counter()
    drops: list[str] = []
    device = RecordingDevice()
    return Writer({0: device}, counters, lambda reason, **_: drops.append(reason)), device, counters, drops


def wait_for(sock: zmq.Socket) -> None:
    assert sock.poll(2000), "nothing arrived"


def test_drain_per_wake_up_is_bounded(pair):
    push, pull = pair
    writer, device, counters, _ = make_writer()
    extra = 10
    for i in range(MAX_DRAIN + extra):
        push.send_multipart(messages.encode_packets([(b"E" + i.to_bytes(2, "big"), None)]))
    wait_for(pull)  # inproc: every message is queued once send returns
    assert writer.write_some(pull) == MAX_DRAIN  # one wake-up takes exactly the bound, no more
    assert len(device.written) == MAX_DRAIN
    assert pull.poll(0)  # the rest waits for the next wake-up (heartbeats and STOP run between)
    assert writer.write_some(pull) == extra
    assert [p for p, _ in device.written] == [b"E" + i.to_bytes(2, "big") for i in range(MAX_DRAIN + extra)]
    assert counters["packets_out"] == MAX_DRAIN + extra


def test_each_packet_written_once_with_its_offload(pair):
    push, pull = pair
    writer, device, counters, drops = make_writer()
    big = b"E" + bytes(range(256)) * 200  # above the zero-copy threshold: sent as a view of itself
    assert len(big) >= endpoints.ZERO_COPY_MIN
    offload = (1, 1, 52, 1460, 20, 16)
    push.copy_threshold = endpoints.ZERO_COPY_MIN
    push.send_multipart(messages.encode_packets([(b"Esmall", None), (memoryview(big), offload),
                                                 (b"Xrefused", None)]), copy=False)
    wait_for(pull)
    assert writer.write_some(pull) == 1
    assert device.written == [(b"Esmall", None), (big, offload)]
    assert counters["packets_out"] == 2
    assert drops == ["write_failed"]


def test_other_kinds_are_counted_not_written(pair):
    push, pull = pair
    writer, device, _, drops = make_writer()
    push.send_multipart(messages.encode_goodbye("udp.1"))
    wait_for(pull)
    assert writer.write_some(pull) == 1
    assert device.written == []
    assert drops == ["bus_unexpected_kind"]


class FullDevice(RecordingDevice):
    """A device whose queue takes ``room`` packets, then refuses (ENOBUFS) until drained."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def write(self, packet, offload=None) -> None:
        if self.room == 0:
            raise OSError(105, "No buffer space available")
        self.room -= 1
        super().write(packet, offload)


def test_a_vector_larger_than_the_device_takes_is_written_as_far_as_it_goes(pair):
    push, pull = pair
    counters: collections.Counter[str] = collections.Counter()
    drops: list[str] = []
    device = FullDevice(room=100)
    writer = Writer({0: device}, counters, lambda reason, **_: drops.append(reason))
    burst = [(b"E" + i.to_bytes(2, "big"), None) for i in range(messages.MAX_BATCH)]
    push.send_multipart(messages.encode_packets(burst))
    wait_for(pull)
    assert writer.write_some(pull) == 1
    assert [p for p, _ in device.written] == [p for p, _ in burst[:100]]  # in order, as far as it took
    assert drops == ["write_failed"] * (messages.MAX_BATCH - 100) and counters["packets_out"] == 100
    device.room = 10  # the kernel drained its queue: the next vector goes on
    push.send_multipart(messages.encode_packets([(b"Elater", None)]))
    wait_for(pull)
    assert writer.write_some(pull) == 1
    assert device.written[-1] == (b"Elater", None)


def test_a_stamped_vector_gives_one_sample_per_stage(pair):
    push, pull = pair
    writer, device, _, _ = make_writer()
    push.send_multipart(messages.encode_packets([(b"E1", None), (b"E2", None)], [1.0, 1.00001, 1.00002, 1.00003]))
    push.send_multipart(messages.encode_packets([(b"E3", None)]))  # not stamped: no samples
    wait_for(pull)
    assert writer.write_some(pull) == 2
    assert len(device.written) == 3
    assert set(writer.samples) == {"worker", "to_egress", "egress", "total"}  # the worker samples the first two
    assert all(len(v) == 1 for v in writer.samples.values())
