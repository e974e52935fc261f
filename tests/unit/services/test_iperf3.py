"""The iperf3 server state machine with hand-fed bytes (no sockets, no clock)."""

import json
import struct

import pytest
import structlog

from tests.unit.services.test_tcp_services import FakeStream as ServicesFakeStream
from workers.services import iperf3

COOKIE = b"abcdefghijklmnopqrstuvwxyz234567abcd\0"
T0 = 50.0


class FakeStream(ServicesFakeStream):
    """test_services' fake stream, plus the clock, timer, logger and counter of a hosted stream."""

    def __init__(self, now=T0, room=1 << 30):
        super().__init__(room)
        self.now = now
        self.deadline = None
        self.aborted = False
        self.retransmissions = 0
        self.log = structlog.get_logger()

    def send(self, data):
        assert not (self.closed or self.aborted), "send after close"
        return super().send(bytes(data))

    def abort(self):
        self.aborted = True

    def set_timer(self, deadline):
        self.deadline = deadline

    def take(self):
        out, self.sent = self.sent, b""
        return out


def feed(svc, data, now=None):
    if now is not None:
        svc.stream.now = now
    svc.stream.inbox += data
    svc.on_readable()


def framed(obj) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack("!I", len(body)) + body


def state(value):
    return struct.pack("!b", value)


def server_error(data):
    assert data[:1] == state(iperf3.SERVER_ERROR), data
    return struct.unpack("!ii", data[1:9])[0]


def open_control(server, params=None):
    s = FakeStream()
    ctl = server(s)
    feed(ctl, COOKIE)
    assert s.take() == state(iperf3.PARAM_EXCHANGE)
    feed(ctl, framed({"tcp": True, "time": 10, "parallel": 1, "len": 131072, **(params or {})}))
    return ctl, s


def open_streams(server, n, now=T0 + 0.1, cookie=COOKIE):
    streams = []
    for _ in range(n):
        s = FakeStream(now=now, room=300_000)
        svc = server(s)
        feed(svc, cookie)
        streams.append(svc)
    return streams


def test_normal_test_from_cookie_to_iperf_done():
    cpu = iter([(1.0, 0.5), (1.5, 0.75)])
    server = iperf3.Iperf3Server(cpu=lambda: next(cpu))
    ctl, cs = open_control(server, {"parallel": 2})
    assert cs.take() == state(iperf3.CREATE_STREAMS)
    a, b = open_streams(server, 2)
    assert cs.take() == state(iperf3.TEST_START) + state(iperf3.TEST_RUNNING)
    feed(a, b"x" * 1000, now=T0 + 1)
    feed(b, b"y" * 500, now=T0 + 1)
    feed(ctl, state(iperf3.TEST_END), now=T0 + 10.1)
    assert cs.take() == state(iperf3.EXCHANGE_RESULTS)
    assert a.stream.closed and b.stream.closed  # the data streams are closed at TEST_END
    feed(ctl, framed({"cpu_util_total": 1, "streams": []}))
    out = cs.take()
    (size,) = struct.unpack("!I", out[:4])
    results = json.loads(out[4:4 + size])
    assert out[4 + size:] == state(iperf3.DISPLAY_RESULTS)
    assert results["sender_has_retransmits"] == -1
    assert results["cpu_util_total"] == pytest.approx(100 * 0.75 / 10)
    assert results["cpu_util_user"] == pytest.approx(100 * 0.5 / 10)
    assert [(st["id"], st["bytes"], st["retransmits"]) for st in results["streams"]] == [(1, 1000, -1), (3, 500, -1)]
    for st in results["streams"]:
        assert {"jitter", "errors", "packets", "start_time", "end_time"} <= st.keys()
        assert st["end_time"] == pytest.approx(10.0)
    assert server.test is None  # free for the next client
    feed(ctl, state(iperf3.IPERF_DONE))
    assert cs.closed and not cs.aborted


def test_reverse_sends_blocks_and_reports_our_retransmissions():
    server = iperf3.Iperf3Server()
    ctl, cs = open_control(server, {"reverse": True, "len": 1000})
    [d] = open_streams(server, 1)
    assert cs.take().endswith(state(iperf3.TEST_RUNNING))
    assert len(d.stream.sent) == 300_000  # filled the send buffer, blocks of 1000
    d.stream.retransmissions = 7
    d.stream.room = 5000
    d.on_writable()
    assert len(d.stream.sent) == 305_000
    feed(ctl, state(iperf3.TEST_END), now=T0 + 5)
    assert d.stream.closed and not d.stream.aborted  # FIN after the queued data: the client drains it
    cs.take()
    feed(ctl, framed({}))
    out = cs.take()
    results = json.loads(out[4:-1])
    assert results["sender_has_retransmits"] == 1
    assert results["streams"][0]["bytes"] == 305_000 and results["streams"][0]["retransmits"] == 7


def test_bidirectional_first_half_receives_second_half_sends():
    server = iperf3.Iperf3Server()
    ctl, cs = open_control(server, {"bidirectional": True, "parallel": 2})
    streams = open_streams(server, 4)
    assert [s.role.sender for s in streams] == [False, False, True, True]
    assert [s.role.id for s in streams] == [1, 3, 4, 5]
    assert not streams[0].stream.sent and streams[2].stream.sent


def test_byte_limit_in_reverse_stops_sending():
    server = iperf3.Iperf3Server()
    ctl, cs = open_control(server, {"reverse": True, "num": 2500, "len": 1000})
    [d] = open_streams(server, 1)
    assert len(d.stream.sent) == 2500


def test_second_client_during_a_test_gets_access_denied():
    server = iperf3.Iperf3Server()
    open_control(server)
    s = FakeStream()
    other = server(s)
    feed(other, b"zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz\0")
    assert s.sent == state(iperf3.ACCESS_DENIED) and s.closed


def test_data_stream_with_wrong_cookie_is_denied_and_the_test_goes_on():
    server = iperf3.Iperf3Server()
    ctl, cs = open_control(server, {"parallel": 1})
    cs.take()
    [bad] = open_streams(server, 1, cookie=b"q" * 36 + b"\0")
    assert bad.stream.sent == state(iperf3.ACCESS_DENIED) and bad.stream.closed
    open_streams(server, 1)
    assert cs.take() == state(iperf3.TEST_START) + state(iperf3.TEST_RUNNING)


def test_extra_stream_after_the_test_started_is_denied():
    server = iperf3.Iperf3Server()
    open_control(server)
    open_streams(server, 1)
    [extra] = open_streams(server, 1)
    assert extra.stream.sent == state(iperf3.ACCESS_DENIED)


@pytest.mark.parametrize("params, ierrno", [
    ({"udp": True}, iperf3.IEUNIMP),
    ({"sctp": True}, iperf3.IEUNIMP),
    ({"parallel": 0}, iperf3.IENUMSTREAMS),
    ({"parallel": 129}, iperf3.IENUMSTREAMS),
    ({"len": 2 * 1024 * 1024}, iperf3.IEBLOCKSIZE),
    ({"parallel": "4"}, iperf3.IERECVPARAMS),
    ({"time": float("inf")}, iperf3.IERECVPARAMS),
])
def test_refused_parameters_get_server_error(params, ierrno):
    server = iperf3.Iperf3Server()
    ctl, cs = open_control(server, params)
    assert server_error(cs.take()) == ierrno
    assert cs.closed and server.test is None


@pytest.mark.parametrize("payload, ierrno", [
    (struct.pack("!I", iperf3.MAX_JSON + 1), iperf3.IERECVPARAMS),           # oversized
    (struct.pack("!I", 5) + b"{nope", iperf3.IERECVPARAMS),                  # invalid JSON
    (struct.pack("!I", 2) + b"[]", iperf3.IERECVPARAMS),                      # not an object
    (struct.pack("!I", 2) + b"\xff\xfe", iperf3.IERECVPARAMS),                # not UTF-8
    (struct.pack("!I", 20001) + b"[" * 10000 + b"1" + b"]" * 10000, iperf3.IERECVPARAMS),  # deep nesting
])
def test_hostile_parameters(payload, ierrno):
    server = iperf3.Iperf3Server()
    s = FakeStream()
    ctl = server(s)
    feed(ctl, COOKIE)
    s.take()
    for i in range(0, len(payload), 7):  # any split of the bytes
        feed(ctl, payload[i:i + 7])
    assert server_error(s.take()) == ierrno and s.closed and server.test is None


def test_unknown_state_byte_is_a_protocol_error():
    server = iperf3.Iperf3Server()
    ctl, cs = open_control(server)
    cs.take()
    open_streams(server, 1)
    cs.take()
    feed(ctl, state(99))
    assert server_error(cs.take()) == iperf3.IEMESSAGE and server.test is None


def test_bad_cookie_on_control_is_refused():
    server = iperf3.Iperf3Server()
    s = FakeStream()
    ctl = server(s)
    feed(ctl, b"\x01" * 37)
    assert server_error(s.take()) == iperf3.IERECVCOOKIE and server.test is None


def test_stalled_client_times_out_and_frees_the_server():
    server = iperf3.Iperf3Server()
    s = FakeStream()
    ctl = server(s)
    feed(ctl, COOKIE)
    s.take()
    feed(ctl, struct.pack("!I", 100) + b"{")  # never finishes its parameters
    assert s.deadline == pytest.approx(T0 + iperf3.SETUP_TIMEOUT)
    s.now = s.deadline
    ctl.on_timer()
    assert server_error(s.take()) == iperf3.IERECVPARAMS and server.test is None
    s.now = s.deadline  # and if the client never closes in turn, it is reset
    ctl.on_timer()
    assert s.aborted


def test_connection_without_cookie_is_reset_after_the_setup_timeout():
    server = iperf3.Iperf3Server()
    s = FakeStream()
    svc = server(s)
    feed(svc, b"abc")
    s.now = s.deadline
    svc.on_timer()
    assert s.aborted


def test_control_connection_lost_mid_test_frees_the_server_and_closes_streams():
    server = iperf3.Iperf3Server()
    ctl, cs = open_control(server, {"reverse": True})
    [d] = open_streams(server, 1)
    ctl.on_closed()
    assert server.test is None and d.stream.closed


def test_idle_running_test_is_ended():
    server = iperf3.Iperf3Server()
    ctl, cs = open_control(server)
    [d] = open_streams(server, 1)
    cs.take()
    feed(d, b"x" * 10, now=T0 + 60)
    cs.now = cs.deadline
    ctl.on_timer()
    assert cs.deadline == pytest.approx(T0 + 60 + iperf3.IDLE_TIMEOUT) and not cs.sent
    cs.now = cs.deadline
    ctl.on_timer()
    assert server_error(cs.take()) == iperf3.IENOMSG and server.test is None


def test_client_terminate_ends_the_test():
    server = iperf3.Iperf3Server()
    ctl, cs = open_control(server)
    open_streams(server, 1)
    feed(ctl, state(iperf3.CLIENT_TERMINATE))
    assert server.test is None and cs.closed


def test_omitted_start_is_left_out_of_the_results():
    server = iperf3.Iperf3Server()
    ctl, cs = open_control(server, {"omit": 1})
    [d] = open_streams(server, 1, now=T0)
    feed(d, b"x" * 1000, now=T0 + 0.5)   # during the omitted second
    feed(d, b"x" * 300, now=T0 + 1.5)    # counted, from 1.5 s on
    feed(ctl, state(iperf3.TEST_END), now=T0 + 3.5)
    cs.take()
    feed(ctl, framed({}))
    stream = json.loads(cs.take()[4:-1])["streams"][0]
    assert stream["bytes"] == 300 and stream["end_time"] == pytest.approx(2.0)
