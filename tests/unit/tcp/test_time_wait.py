"""The TIME-WAIT table (workers.tcp.time_wait): its cap, oldest first, and the reopened ISN."""

import collections

import structlog

from pipeline.flow import Flow
from pipeline.wire.tcp import Flags, TcpOptions, TcpSegment
from workers.core import Sink
from workers.tcp.config import TcpConfig
from workers.tcp.connection import Connection
from workers.tcp.time_wait import TIME_WAIT_ISN_GAP, TimeWait, reopen_isn

PEER = bytes([10, 0, 0, 1])


def flow(port: int) -> Flow:
    return Flow(PEER, port, 80)


def test_past_the_limit_the_oldest_is_named_and_counted():
    table = TimeWait(Sink(collections.Counter(), structlog.get_logger()), limit=2)
    assert table.hold(flow(1)) is None and table.hold(flow(2)) is None
    assert table.hold(flow(3)) == flow(1)  # the demux ends it, and then discards it
    table.discard(flow(1))
    assert list(table.held) == [flow(2), flow(3)] and len(table) == 2
    assert table.sink.counters["time_wait_overflow"] == 1
    table.discard(flow(2))
    table.discard(flow(2))  # gone already: nothing happens
    assert table.hold(flow(4)) is None and list(table.held) == [flow(3), flow(4)]


def test_with_no_room_a_flow_is_its_own_oldest():
    table = TimeWait(Sink(collections.Counter(), structlog.get_logger()), limit=0)
    assert table.hold(flow(1)) == flow(1)


def test_the_reopened_isn_lies_above_the_old_snd_nxt_across_the_wrap():
    syn = TcpSegment(40000, 80, 1000, 0, Flags.SYN, 65535, options=TcpOptions(mss=1460))
    old = Connection.accept(80, 40000, syn, 2**32 - 10, TcpConfig(), 100.0)  # SND.NXT just below 2**32
    assert reopen_isn(old) == (old.sender.snd_nxt + TIME_WAIT_ISN_GAP) % 2**32 < old.sender.snd_nxt
