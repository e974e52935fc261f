"""A connection's life is one log record: ``tcp_closed`` at info, when it ends.

Like attach mode's ``relay_flow``: addresses and ports, how long, bytes each way and the
other counters, why it ended and whether the handshake ever completed.  ``tcp_established``
is a debug record; a relayed connection's record is its ``relay_flow`` (``tcp_closed`` then
only at debug).
"""

from __future__ import annotations

import collections

import pytest

from pipeline.config import DEFAULT_MAX_TIME_WAIT, DEFAULT_SYN_QUEUE
from pipeline.flow import Flow
from workers.attach.policy import ForwardPolicy
from pipeline.wire.ipv4 import PROTO_TCP, Ipv4Header, build_ipv4, parse_ipv4
from pipeline.wire.seqnum import seq_add
from pipeline.wire.tcp import Flags, TcpOptions, TcpSegment, parse_tcp
from workers.attach import relay
from workers.core import Sink
from workers.tcp import demux as demux_mod
from workers.tcp.config import TcpConfig
from workers.tcp.connection import State
from workers.tcp.introspect import CLOSE_STATS
from workers.attach.tcp import TcpRelay

US = bytes([10, 0, 0, 2])
PEER = bytes([10, 0, 0, 1])
SERVER = bytes([192, 0, 2, 10])
T0 = 100.0


class Records:
    """A logger that keeps every record: (level, event, fields)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict]] = []

    def bind(self, **_fields: object) -> Records:
        return self

    def debug(self, event: str, **fields: object) -> None:
        self.records.append(("debug", event, fields))

    def info(self, event: str, **fields: object) -> None:
        self.records.append(("info", event, fields))

    def warning(self, event: str, **fields: object) -> None:
        self.records.append(("warning", event, fields))

    def error(self, event: str, **fields: object) -> None:
        self.records.append(("error", event, fields))

    def at(self, level: str) -> list[tuple[str, dict]]:
        return [(event, fields) for lvl, event, fields in self.records if lvl == level]


def make(debug: bool = False, relay_: bool = False,
         syn_queue_limit: int = DEFAULT_SYN_QUEUE) -> tuple[demux_mod.TcpDemux, Records]:
    log = Records()
    sink = Sink(collections.Counter(), log, debug=debug)
    tcp_relay = TcpRelay(sink, ForwardPolicy(), connect_timeout=5.0) if relay_ else None
    return demux_mod.TcpDemux(sink, US, TcpConfig(), secret=b"s" * 32, relay_=tcp_relay,
                              syn_queue_limit=syn_queue_limit, max_time_wait=DEFAULT_MAX_TIME_WAIT), log


def packet(seg: TcpSegment, dst: bytes = US) -> bytes:
    return build_ipv4(Ipv4Header(src=PEER, dst=dst, protocol=PROTO_TCP), seg.emit(PEER, dst))


def parse(out) -> list[TcpSegment]:
    segs = []
    for pkt, _offload in out:
        ip, payload = parse_ipv4(pkt)
        segs.append(parse_tcp(payload, ip.src, ip.dst))
    return segs


def syn(sport: int = 40000, dport: int = 7) -> TcpSegment:
    return TcpSegment(sport, dport, 1000, 0, Flags.SYN, 65535, options=TcpOptions(mss=1460))


def open_(d, sport: int = 40000, dport: int = 7, now: float = T0, dst: bytes = US) -> int:
    """SYN -> SYN-ACK -> ACK; our sequence number after the SYN."""
    [synack] = parse(d.handle_packet(packet(syn(sport, dport), dst), now))
    ours = seq_add(synack.seq, 1)
    d.handle_packet(packet(TcpSegment(sport, dport, 1001, ours, Flags.ACK, 65535), dst), now)
    return ours


def echo_and_close(d, ours: int, now: float, sport: int = 40000) -> None:
    """A line to the echo service and back, then the peer closes and acknowledges our FIN."""
    line = b"hello\n"
    echoed = parse(d.handle_packet(packet(TcpSegment(sport, 7, 1001, ours, Flags.ACK | Flags.PSH, 65535, line)), now))
    assert b"".join(s.payload for s in echoed) == line
    ours = seq_add(ours, len(line))
    [fin] = parse(d.handle_packet(packet(TcpSegment(sport, 7, 1007, ours, Flags.ACK | Flags.FIN, 65535)), now))
    assert fin.fin
    d.handle_packet(packet(TcpSegment(sport, 7, 1008, seq_add(ours, 1), Flags.ACK, 65535)), now)


def test_a_connection_is_one_info_record_when_it_ends():
    d, log = make()
    ours = open_(d)
    assert log.at("info") == []  # nothing at info until the connection ends
    echo_and_close(d, ours, T0 + 2.5)
    [(event, fields)] = log.at("info")
    assert event == "tcp_closed" and Flow(PEER, 40000, 7) not in d.connections
    assert list(fields)[:7] == ["remote", "rport", "lport", "established", "duration", "reason", "bytes_sent"]
    assert fields["remote"] == "10.0.0.1" and fields["rport"] == 40000 and fields["lport"] == 7
    assert "local" not in fields  # a flow to our own address
    assert fields["established"] is True and fields["reason"] == "closed"
    assert fields["duration"] == 2.5  # seconds since the SYN, to the millisecond
    assert fields["bytes_sent"] == fields["bytes_received"] == 6
    assert set(CLOSE_STATS) <= fields.keys() and fields["retransmissions"] == 0
    assert log.at("debug") == []  # without debug, not even the debug records are formatted


def test_with_debug_tcp_established_is_a_debug_record():
    d, log = make(debug=True)
    echo_and_close(d, open_(d), T0 + 0.001234)
    assert [e for e, _ in log.at("info")] == ["tcp_closed"]
    [opened] = [f for e, f in log.at("debug") if e == "tcp_established"]
    assert opened == {"remote": "10.0.0.1", "rport": 40000, "lport": 7}
    assert log.at("info")[0][1]["duration"] == 0.001


@pytest.mark.parametrize("how", ["reset", "timeout"])
def test_a_handshake_that_never_completes_says_established_false(how):
    d, log = make()
    [synack] = parse(d.handle_packet(packet(syn()), T0))
    if how == "reset":  # RFC 9293 §3.10.7.4: an in-window RST in SYN-RECEIVED
        d.handle_packet(packet(TcpSegment(40000, 7, 1001, 0, Flags.RST, 0)), T0 + 0.5)
    else:  # our SYN-ACK unanswered until the retries run out
        while (t := d.next_deadline()) is not None:
            d.handle_timer(t)
    [(event, fields)] = log.at("info")
    assert event == "tcp_closed" and fields["established"] is False and fields["reason"] == how
    assert fields["bytes_sent"] == fields["bytes_received"] == 0
    assert (fields["duration"] == 0.5) if how == "reset" else fields["duration"] > 30  # 1+2+4+8+16 s of retries


def test_a_connection_established_and_ended_in_one_call_says_established():
    """The final ACK of a cookie handshake creates the connection ESTABLISHED (before: LISTEN);
    the peer's RST right after ends it (RFC 4987 §3.6)."""
    d, log = make(syn_queue_limit=0)
    [synack] = parse(d.handle_packet(packet(syn()), T0))  # the queue is full: a cookie
    ours = seq_add(synack.seq, 1)
    d.handle_packet(packet(TcpSegment(40000, 7, 1001, ours, Flags.ACK, 65535)), T0 + 0.1)
    assert d.connections[Flow(PEER, 40000, 7)].state is State.ESTABLISHED
    d.handle_packet(packet(TcpSegment(40000, 7, 1001, 0, Flags.RST, 0)), T0 + 0.2)
    [(event, fields)] = log.at("info")
    assert fields["established"] is True and fields["reason"] == "reset"
    assert fields["duration"] == 0.1  # born with the cookie's ACK


def test_shutdown_writes_the_record_of_every_connection_time_wait_too():
    d, log = make()
    open_(d, sport=40000)  # ESTABLISHED: reset
    d.handle_packet(packet(syn(sport=40001)), T0)  # SYN-RECEIVED: reset, never established
    # QOTD (port 17) closes first: after the peer's FIN and ACK we hold the connection in TIME-WAIT.
    [synack] = parse(d.handle_packet(packet(syn(sport=40002, dport=17)), T0))
    out = parse(d.handle_packet(packet(TcpSegment(40002, 17, 1001, seq_add(synack.seq, 1), Flags.ACK, 65535)), T0))
    assert out[-1].fin  # the quote, then our FIN
    fin_end = seq_add(out[-1].seq, out[-1].seg_len)
    d.handle_packet(packet(TcpSegment(40002, 17, 1001, fin_end, Flags.ACK | Flags.FIN, 65535)), T0)
    assert d.connections[Flow(PEER, 40002, 17)].state is State.TIME_WAIT and log.at("info") == []
    out = parse(d.close(T0 + 1))
    assert [s.flags & Flags.RST != 0 for s in out] == [True, True]  # TIME-WAIT has nothing to say
    by_port = {f["rport"]: f for _, f in log.at("info")}
    assert {p: (f["established"], f["reason"]) for p, f in by_port.items()} == {
        40000: (True, "aborted"), 40001: (False, "aborted"), 40002: (True, "closed")}
    assert not d.connections


def test_a_relayed_connection_leaves_tcp_closed_to_debug():
    key = Flow(PEER, 40000, 80, SERVER)
    for debug in (False, True):
        d, log = make(debug=debug, relay_=True)
        d.handle_packet(packet(syn(dport=80), SERVER), T0)
        [synack] = parse(d.handle_upstream([relay.Upstream(key, relay.CONNECTED)], T0 + 0.1))
        d.handle_packet(packet(TcpSegment(40000, 80, 1001, seq_add(synack.seq, 1), Flags.ACK, 65535), SERVER),
                        T0 + 0.1)
        d.handle_packet(packet(TcpSegment(40000, 80, 1001, 0, Flags.RST, 0), SERVER), T0 + 0.3)
        assert key not in d.connections
        assert [e for e, _ in log.at("info")] == ["relay_flow"]  # the flow's one record
        closed = [f for e, f in log.at("debug") if e == "tcp_closed"]
        if debug:
            [fields] = closed
            assert fields["local"] == "192.0.2.10" and fields["established"] is True and fields["reason"] == "reset"
            assert fields["duration"] == 0.2  # from the accepted SYN, not the held one
        else:
            assert closed == []
