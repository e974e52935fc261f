"""Services hosted by the TCP core: a raising service costs only its connection; timers; cross-connection sends."""

from pipeline.config import DEFAULT_MAX_TIME_WAIT, DEFAULT_SYN_QUEUE
from pipeline.flow import Flow
from pipeline.wire.tcp import Flags, TcpSegment
from tests.unit.tcp.test_demux import PEER, US, T0, handshake, packet, parse, sink
from workers.services import tcp as apps
from workers.tcp.config import TcpConfig
from workers.tcp.demux import TcpDemux


class Exploding(apps.Service):
    def on_readable(self):
        if self.stream.recv() == b"boom":
            raise ValueError("service bug")


class Ticker(apps.Service):
    """Says 'tick' once, one second after connecting."""

    def __init__(self, stream):
        super().__init__(stream)
        stream.set_timer(stream.now + 1.0)

    def on_timer(self):
        self.write(b"tick")


class Pair(apps.Service):
    """Data on one connection is sent on the other (a service that talks across connections)."""

    others: list = []

    def __init__(self, stream):
        super().__init__(stream)
        self.others.append(self)

    def on_readable(self):
        data = self.stream.recv()
        for other in self.others:
            if other is not self:
                other.write(data)


class Recorder(apps.Service):
    """Remembers how its connection ended."""

    ended: list = []

    def on_closed(self):
        self.ended.append((self.stream.flow, self.stream.close_reason, self.stream.now))


def make(services):
    return TcpDemux(sink(), US, TcpConfig(), secret=b"s" * 32, services=services,
                    syn_queue_limit=DEFAULT_SYN_QUEUE, max_time_wait=DEFAULT_MAX_TIME_WAIT)


def data(sport, dport, our_seq, payload, seq=1001):
    return packet(TcpSegment(sport, dport, seq, our_seq, Flags.ACK | Flags.PSH, 65535, payload))


def test_raising_service_resets_its_connection_only():
    core = make({9: Exploding})
    a = handshake(core, sport=40000, dport=9)
    b = handshake(core, sport=40001, dport=9)
    fine = [parse(p) for p in core.handle_packet(data(40000, 9, a, b"fine"), T0)]
    assert not any(s.flags & Flags.RST for s in fine)  # its ACK is delayed (RFC 9293 §3.8.6.3)
    out = [parse(p) for p in core.handle_packet(data(40001, 9, b, b"boom"), T0)]
    assert any(s.flags & Flags.RST for s in out)
    assert core.sink.counters["service_errors"] == 1
    assert len(core.connections) == 1  # the other connection lives on
    core.handle_packet(data(40000, 9, a, b"more", seq=1005), T0)
    [ack] = [parse(p) for p in core.handle_timer(core.next_deadline())]  # the delayed ACK of both
    assert ack.dst_port == 40000 and ack.ack == 1009 and not ack.flags & Flags.RST


def test_service_timer_fires_through_the_core():
    core = make({5000: Ticker})
    handshake(core, sport=40000, dport=5000)
    assert core.next_deadline() <= T0 + 1.0
    out = [parse(p) for p in core.handle_timer(T0 + 1.0)]
    assert b"".join(s.payload for s in out) == b"tick"


def test_send_on_another_connection_goes_out_in_the_same_wake_up():
    Pair.others = []
    core = make({6000: Pair})
    handshake(core, sport=40000, dport=6000)
    b = handshake(core, sport=40001, dport=6000)
    out = [parse(p) for p in core.handle_packet(data(40001, 6000, b, b"across"), T0)]
    assert any(s.dst_port == 40000 and s.payload == b"across" for s in out)


def test_a_service_learns_why_and_when_its_connection_ended():
    Recorder.ended = []
    core = make({5001: Recorder})
    ours = handshake(core, sport=40000, dport=5001)
    core.handle_packet(packet(TcpSegment(40000, 5001, 1001, ours, Flags.RST, 0)), T0 + 3)
    assert Recorder.ended == [(Flow(PEER, 40000, 5001), "reset", T0 + 3)]
