"""iperf3 server, TCP tests (esnet/iperf 3.x control protocol), sans-IO on the stream interface.

The protocol, as esnet/iperf's ``iperf_api.c``, ``iperf_server_api.c`` and
``iperf_tcp.c`` (3.12) define it for the server side:

1. The client opens the *control connection* and sends a 37-byte cookie (36
   printable characters and a NUL). A server already running a test answers
   a new connection with the state byte ACCESS_DENIED and closes it.
2. The server sends one signed state byte per transition: PARAM_EXCHANGE; the
   client sends its parameters as JSON prefixed by a 4-byte big-endian length;
   the server sends CREATE_STREAMS.
3. The client opens ``parallel`` *data connections* (twice as many with
   ``--bidir``), each starting with the same cookie; a wrong cookie gets
   ACCESS_DENIED. Streams are numbered 1, 3, 4, 5 … in order of arrival
   (``iperf_add_stream``'s numbering, which the client mirrors). With every
   stream there the server sends TEST_START and TEST_RUNNING, and data flows:
   to us normally, from us with ``-R`` (reverse), both ways with ``--bidir``
   (the first half of the streams towards us).
4. The client sends TEST_END on the control connection; the server stops
   sending and closes the data streams (FIN after what is queued: the client
   drains it), sends EXCHANGE_RESULTS, reads the client's
   results (length-prefixed JSON), sends its own (CPU use, per stream: id,
   bytes, retransmits, jitter, errors, packets, start/end time), then
   DISPLAY_RESULTS; the client answers IPERF_DONE and both close.

Anything else on the control connection — an unknown state byte, JSON that is
oversized, invalid or not an object, parameters we do not serve (UDP, SCTP),
a client that stalls during set-up — gets SERVER_ERROR followed by two 4-byte
error numbers (iperf's ``i_errno`` and ``errno``), then the connection is
closed and the test forgotten. Nothing a client sends raises out of here.

Streams of one test must reach the same worker as its control connection:
``Iperf3Server`` declares ``steer_by_client``, the TCP worker announces its
port to ingress (``workers.services.registry.steered_ports``), and ingress
then steers connections to it by (client address, port) rather than the
whole 4-tuple (``pipeline/routing.py``). One test at a time per worker, as
in iperf3.

Sans-IO: bytes in and out through the stream, time from ``stream.now``; the
server's CPU time comes from a callable the worker passes in.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

from workers.services.tcp import Service

COOKIE_SIZE = 37  # iperf.h: an ASCII uuid and its NUL

# iperf_api.h: the state bytes (signed char on the wire).
TEST_START = 1
TEST_RUNNING = 2
TEST_END = 4
PARAM_EXCHANGE = 9
CREATE_STREAMS = 10
CLIENT_TERMINATE = 12
EXCHANGE_RESULTS = 13
DISPLAY_RESULTS = 14
IPERF_DONE = 16
ACCESS_DENIED = -1
SERVER_ERROR = -2

# iperf_api.h: i_errno values the client turns into messages.
IENUMSTREAMS = 6     # "number of parallel streams too large"
IEBLOCKSIZE = 7      # "block size too large"
IEUNIMP = 13         # "an option you are trying to set is not implemented yet"
IERECVCOOKIE = 106
IEMESSAGE = 110      # "received an unknown control message"
IERECVPARAMS = 114
IERECVRESULTS = 117
IENOMSG = 144        # "idle timeout"

MAX_STREAMS = 128             # iperf.h MAX_STREAMS
MAX_BLOCKSIZE = 1024 * 1024   # iperf.h MAX_BLOCKSIZE
DEFAULT_BLOCKSIZE = 128 * 1024
MAX_JSON = 256 * 1024         # bytes of one parameters/results message; more is hostile
SETUP_TIMEOUT = 10.0          # seconds from cookie to TEST_RUNNING, and to finish the results exchange
IDLE_TIMEOUT = 120.0          # a running test with no data either way (iperf's DEFAULT_NO_MSG_RCVD_TIMEOUT)

_LENGTH = struct.Struct("!I")
_ERROR = struct.Struct("!bii")  # SERVER_ERROR, i_errno, errno


def _state(value: int) -> bytes:
    return struct.pack("!b", value)


class ProtocolError(Exception):
    """The client broke the protocol: answer SERVER_ERROR with ``ierrno`` and close."""

    def __init__(self, ierrno: int, reason: str) -> None:
        super().__init__(reason)
        self.ierrno = ierrno
        self.reason = reason


class Iperf3Server:
    """One per worker: makes the service of each connection to 5201 and holds the test running on it."""

    # A test's control and data connections must meet in one worker: every connection of one
    # client to this service's port goes to the same one (workers.services.registry.steered_ports).
    steer_by_client = True

    def __init__(self, cpu: Callable[[], tuple[float, float]] = lambda: (0.0, 0.0)) -> None:
        self.cpu = cpu
        self.test: Test | None = None

    def __call__(self, stream: Any) -> Iperf3Connection:
        return Iperf3Connection(stream, self)


class Test:
    """The parameters, streams and clock of the test a control connection runs."""

    def __init__(self, server: Iperf3Server, cookie: bytes, control: Control) -> None:
        self.server = server
        self.cookie = cookie
        self.control = control
        self.streams: list[DataStream] = []
        self.reverse = self.bidirectional = False
        self.parallel = 1
        self.blksize = DEFAULT_BLOCKSIZE
        self.byte_limit = 0      # reverse with -n/-k: stop sending after this many bytes
        self.omit = 0            # -O: seconds at the start that the results leave out
        self.bytes_sent = 0
        self.running = False
        self.start = self.end = 0.0
        self.cpu_start = (0.0, 0.0)
        self.cpu_util = (0.0, 0.0, 0.0)
        self.last_activity = 0.0

    @property
    def expected_streams(self) -> int:
        return self.parallel * (2 if self.bidirectional else 1)

    def stream_sends(self, index: int) -> bool:
        """Whether the index-th stream (0-based, arrival order) carries data from us (iperf_run_server)."""
        if self.bidirectional:
            return index >= self.parallel  # the client's senders connect first
        return self.reverse

    @property
    def sender_has_retransmits(self) -> int:
        # iperf_api.c send_results: -1 when we only receive; otherwise we report our TCP's count.
        return 1 if (self.reverse or self.bidirectional) else -1


class Iperf3Connection(Service):
    """A connection to 5201: its cookie decides whether it is a control connection or a data stream."""

    def __init__(self, stream: Any, server: Iperf3Server) -> None:
        super().__init__(stream)
        self.server = server
        self.cookie = b""
        self.role: Control | DataStream | None = None
        self.hanging_up = False
        stream.set_timer(stream.now + SETUP_TIMEOUT)  # a connection that never sends its cookie

    def on_readable(self) -> None:
        if self.hanging_up or self.closed:
            while self.stream.recv():  # keep the window open so the client sees our close
                pass
            return
        if self.role is None:
            self.cookie += self.stream.recv(COOKIE_SIZE - len(self.cookie))
            if len(self.cookie) < COOKIE_SIZE:
                return
            self._classify()
        if self.role is not None:
            self.role.on_readable()

    def on_writable(self) -> None:
        if not self._flush():
            return
        if self.hanging_up:
            self._close_when_flushed()
        elif self.role is not None:
            self.role.on_writable()

    def on_eof(self) -> None:
        self.eof = True
        if self.role is not None and not self.hanging_up:
            self.role.on_eof()
        else:
            self.hang_up()

    def on_timer(self) -> None:
        if self.role is None or self.hanging_up:
            self.closed = True
            self.stream.abort()  # no cookie in time, or no goodbye from the client in time
        else:
            self.role.on_timer()

    def on_closed(self) -> None:
        self.closed = True
        if self.role is not None:
            self.role.on_closed()

    def hang_up(self) -> None:
        """Close once our last words are out; what the client still sends is read and dropped,
        and a client that does not close in turn within SETUP_TIMEOUT is reset."""
        if self.hanging_up or self.closed:
            return
        self.hanging_up = True
        self.stream.set_timer(self.stream.now + SETUP_TIMEOUT)
        self._close_when_flushed()

    def _close_when_flushed(self) -> None:
        if not self.pending and not self.closed:
            self.closed = True
            self.stream.close()

    def _classify(self) -> None:
        """iperf_accept / iperf_tcp_accept: control connection, data stream, or turned away."""
        server, stream = self.server, self.stream
        test = server.test
        if test is None:
            stream.set_timer(None)
            self.role = Control(self, server, self.cookie)
            return
        if (self.cookie == test.cookie and test.control.phase == CREATE_STREAMS
                and len(test.streams) < test.expected_streams):
            stream.set_timer(None)
            self.role = DataStream(self, test)
            return
        # Busy with another test, or a cookie that is not this test's: ACCESS_DENIED and close.
        stream.log.info("iperf3_access_denied", busy=self.cookie != test.cookie)
        self.write(_state(ACCESS_DENIED))
        self.hang_up()


class Control:
    """The control connection's side of the protocol; ``phase`` is the last state byte we sent."""

    def __init__(self, conn: Iperf3Connection, server: Iperf3Server, cookie: bytes) -> None:
        self.conn = conn
        self.stream = conn.stream
        self.server = server
        self.phase = PARAM_EXCHANGE
        self.inbox = b""  # a length-prefixed JSON message being read
        if not _cookie_ok(cookie):
            self.test = None
            self._fail(IERECVCOOKIE, "bad cookie")
            return
        self.test = Test(server, cookie, self)
        server.test = self.test
        self.stream.set_timer(self.stream.now + SETUP_TIMEOUT)
        self._send_state(PARAM_EXCHANGE)

    # -- input -------------------------------------------------------------

    def on_readable(self) -> None:
        try:
            while not (self.conn.closed or self.conn.hanging_up) and self._step():
                pass
        except ProtocolError as exc:
            self._fail(exc.ierrno, exc.reason)

    def _step(self) -> bool:
        """Consume one message if it is all there; False when more bytes are needed."""
        if self.phase in (PARAM_EXCHANGE, EXCHANGE_RESULTS):
            ierrno = IERECVPARAMS if self.phase == PARAM_EXCHANGE else IERECVRESULTS
            message = self._read_json(ierrno)
            if message is None:
                return False
            if self.phase == PARAM_EXCHANGE:
                self._parameters(message)
            else:
                self._results(message)
            return True
        data = self.stream.recv(1)
        if not data:
            return False
        self._message(struct.unpack("!b", data)[0])
        return True

    def _read_json(self, ierrno: int) -> dict[str, Any] | None:
        """JSON_read: a 4-byte length, then that many bytes of a JSON object."""
        if len(self.inbox) < 4:
            self.inbox += self.stream.recv(4 - len(self.inbox))
            if len(self.inbox) < 4:
                return None
            (size,) = _LENGTH.unpack(self.inbox)
            if size > MAX_JSON:
                raise ProtocolError(ierrno, f"JSON of {size} bytes")
        (size,) = _LENGTH.unpack_from(self.inbox)
        self.inbox += self.stream.recv(4 + size - len(self.inbox))
        if len(self.inbox) < 4 + size:
            return None
        body, self.inbox = self.inbox[4:], b""
        try:
            value = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ProtocolError(ierrno, "invalid JSON") from None
        if not isinstance(value, dict):
            raise ProtocolError(ierrno, "JSON is not an object")
        return value

    def _message(self, state: int) -> None:
        """iperf_handle_message_server: a state byte from the client."""
        if state == CLIENT_TERMINATE:
            self.stream.log.info("iperf3_client_terminated")
            self._end_test()
            self.conn.hang_up()
        elif state == TEST_END and self.phase == TEST_RUNNING:
            self._test_end()
        elif state == IPERF_DONE and self.phase == DISPLAY_RESULTS:
            self.phase = IPERF_DONE
            self.conn.hang_up()
        elif state == TEST_START and self.phase == TEST_RUNNING:
            pass  # iperf's server accepts and ignores it
        else:
            raise ProtocolError(IEMESSAGE, f"state {state} in {self.phase}")

    def _parameters(self, params: dict[str, Any]) -> None:
        """get_parameters: what we serve; refuse the rest with SERVER_ERROR."""
        test = self.test
        assert test is not None
        if "udp" in params or "sctp" in params:
            raise ProtocolError(IEUNIMP, "only TCP tests are served")
        test.parallel = _int_param(params, "parallel", 1)
        if not 1 <= test.parallel <= MAX_STREAMS:
            raise ProtocolError(IENUMSTREAMS, f"parallel {test.parallel}")
        test.blksize = _int_param(params, "len", DEFAULT_BLOCKSIZE) or DEFAULT_BLOCKSIZE
        if not 1 <= test.blksize <= MAX_BLOCKSIZE:
            raise ProtocolError(IEBLOCKSIZE, f"len {test.blksize}")
        test.reverse = "reverse" in params  # presence is what counts, as in iperf
        test.bidirectional = "bidirectional" in params
        num = _int_param(params, "num", 0)
        blocks = _int_param(params, "blockcount", 0)
        test.byte_limit = num if num > 0 else blocks * test.blksize
        _int_param(params, "time", 0)
        test.omit = max(0, _int_param(params, "omit", 0))
        self.phase = CREATE_STREAMS
        self._send_state(CREATE_STREAMS)

    def stream_arrived(self, data: DataStream) -> None:
        """A data stream with our cookie; with all of them here, the test starts."""
        test = self.test
        assert test is not None
        test.streams.append(data)
        if len(test.streams) < test.expected_streams:
            return
        now = self.stream.now = data.stream.now
        test.running = True
        test.start = test.last_activity = now
        test.cpu_start = self.server.cpu()
        self._send_state(TEST_START)
        self._send_state(TEST_RUNNING)
        self.phase = TEST_RUNNING
        self.stream.set_timer(now + IDLE_TIMEOUT)
        for stream in test.streams:
            stream.begin(now)

    def _test_end(self) -> None:
        """TEST_END: stop, close the streams, then exchange results (client's first)."""
        test = self.test
        assert test is not None
        now = self.stream.now
        test.running = False
        test.end = now
        user, system = self.server.cpu()
        elapsed = max(now - test.start, 1e-9)
        du, ds = user - test.cpu_start[0], system - test.cpu_start[1]
        test.cpu_util = (100.0 * (du + ds) / elapsed, 100.0 * du / elapsed, 100.0 * ds / elapsed)
        for stream in test.streams:
            stream.finish(now)
        self.phase = EXCHANGE_RESULTS
        self.stream.set_timer(now + SETUP_TIMEOUT)
        self._send_state(EXCHANGE_RESULTS)

    def _results(self, client_results: dict[str, Any]) -> None:
        """iperf_exchange_results, server side: theirs read, ours sent, then DISPLAY_RESULTS."""
        test = self.test
        assert test is not None
        body = json.dumps(self.results(), separators=(",", ":")).encode()
        self.conn.write(_LENGTH.pack(len(body)) + body)
        self.phase = DISPLAY_RESULTS
        self._send_state(DISPLAY_RESULTS)
        self.stream.log.info("iperf3_test", mode=_mode(test), streams=len(test.streams),
                             duration=round(test.end - test.start, 3),
                             bytes_received=sum(s.bytes_received for s in test.streams),
                             bytes_sent=sum(s.bytes_sent for s in test.streams),
                             retransmits=sum(max(s.retransmits, 0) for s in test.streams))
        self._end_test()  # the test is over; the worker is free for the next client
        self.stream.set_timer(self.stream.now + SETUP_TIMEOUT)  # for the client's IPERF_DONE

    def results(self) -> dict[str, Any]:
        """send_results: the object the client requires (get_results rejects it without these fields)."""
        test = self.test
        assert test is not None
        total, user, system = test.cpu_util
        return {
            "cpu_util_total": total, "cpu_util_user": user, "cpu_util_system": system,
            "sender_has_retransmits": test.sender_has_retransmits,
            "streams": [s.result(test) for s in test.streams],
        }

    # -- other events ------------------------------------------------------

    def on_writable(self) -> None:
        pass

    def on_eof(self) -> None:
        # iperf_handle_message_server: "the client has unexpectedly closed the connection".
        if self.phase not in (DISPLAY_RESULTS, IPERF_DONE):
            self.stream.log.info("iperf3_control_closed", phase=self.phase)
        self._end_test()
        self.conn.hang_up()

    def on_timer(self) -> None:
        test = self.test
        if self.phase == TEST_RUNNING and test is not None:
            idle_until = test.last_activity + IDLE_TIMEOUT
            if self.stream.now < idle_until:
                self.stream.set_timer(idle_until)
                return
            self._fail(IENOMSG, "no data for the idle timeout")
            return
        if self.phase in (PARAM_EXCHANGE, CREATE_STREAMS, EXCHANGE_RESULTS):
            self._fail(IERECVPARAMS if self.phase != EXCHANGE_RESULTS else IERECVRESULTS,
                       f"client stalled in {self.phase}")
        else:
            self.conn.hang_up()  # DISPLAY_RESULTS and no IPERF_DONE

    def on_closed(self) -> None:
        self._end_test()

    # -- helpers -----------------------------------------------------------

    def _send_state(self, state: int) -> None:
        self.conn.write(_state(state))

    def _fail(self, ierrno: int, reason: str) -> None:
        """SERVER_ERROR, i_errno, errno (iperf_exchange_parameters' error path), close, forget the test."""
        self.stream.log.info("iperf3_refused", reason=reason, ierrno=ierrno)
        self.conn.write(_ERROR.pack(SERVER_ERROR, ierrno, 0))
        self._end_test()
        self.conn.hang_up()

    def _end_test(self) -> None:
        test, self.test = self.test, None
        if test is None:
            return
        test.running = False
        for stream in test.streams:
            stream.finish(self.stream.now)
        if self.server.test is test:
            self.server.test = None


class DataStream:
    """One data connection of the running test: we count what arrives, or send blocks while it runs."""

    def __init__(self, conn: Iperf3Connection, test: Test) -> None:
        self.conn = conn
        self.stream = conn.stream
        self.test = test
        n = len(test.streams) + 1
        self.id = 1 if n == 1 else n + 1  # iperf_add_stream: 1, 3, 4, 5, ...
        self.sender = test.stream_sends(n - 1)
        self.bytes_received = self.bytes_sent = 0
        self.bytes_sent_omit = 0  # sent during the omitted start (-O), left out of the results
        self.omitting = False
        self.start = self.end = 0.0
        self.rtx_start = 0
        self.retransmits = -1
        self.active = False
        self._block = memoryview(bytes(range(256)) * (test.blksize // 256 + 1))[:test.blksize]
        test.control.stream_arrived(self)

    def begin(self, now: float) -> None:
        self.active = True
        self.start = now
        self.omitting = self.test.omit > 0
        self.rtx_start = self.stream.retransmissions
        if self.sender:
            self.on_writable()

    def finish(self, now: float) -> None:
        """iperf_handle_message_server closes every stream at TEST_END. A close, not a reset: in
        reverse mode the client drains what we queued after sending TEST_END (iperf_run_client),
        and a reset would fail its read."""
        if self.active:
            self.active = False
            self.end = now
            if self.sender and self.test.sender_has_retransmits == 1:
                self.retransmits = self.stream.retransmissions - self.rtx_start
        self.conn.hang_up()

    def result(self, test: Test) -> dict[str, Any]:
        return {"id": self.id, "bytes": self.bytes_sent - self.bytes_sent_omit if self.sender else self.bytes_received,
                "retransmits": self.retransmits if self.sender else -1,
                "jitter": 0, "errors": 0, "packets": 0,
                "start_time": 0, "end_time": max(0.0, self.end - self.start)}

    def _omit_over(self) -> None:
        """iperf_reset_stats when the -O period ends: the results count from here."""
        now = self.stream.now
        if self.omitting and now >= self.test.start + self.test.omit:
            self.omitting = False
            self.start = now
            self.bytes_received = 0
            self.bytes_sent_omit = self.bytes_sent
            self.rtx_start = self.stream.retransmissions

    def on_readable(self) -> None:
        self._omit_over()
        while data := self.stream.recv():
            if self.active and not self.sender:
                self.bytes_received += len(data)
                self.test.last_activity = self.stream.now

    def on_writable(self) -> None:
        test = self.test
        block = self._block
        self._omit_over()
        while self.active and test.running and self.sender:
            size = len(block)
            if test.byte_limit:
                size = min(size, test.byte_limit - test.bytes_sent)
                if size <= 0:
                    return
            sent = self.stream.send(block[:size])
            if not sent:
                return
            self.bytes_sent += sent
            test.bytes_sent += sent
            test.last_activity = self.stream.now

    def on_eof(self) -> None:
        self.on_readable()
        if not self.active:
            self.conn.hang_up()

    def on_timer(self) -> None:
        pass

    def on_closed(self) -> None:
        if self.active:
            self.finish(self.stream.now)


def _cookie_ok(cookie: bytes) -> bool:
    """36 printable ASCII characters and a NUL (iperf's make_cookie)."""
    return cookie[-1] == 0 and all(0x21 <= b < 0x7F for b in cookie[:-1])


def _int_param(params: dict[str, Any], name: str, default: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or abs(value) > 2**53:
        raise ProtocolError(IERECVPARAMS, f"parameter {name}={value!r}")
    return int(value)


def _mode(test: Test) -> str:
    return "bidirectional" if test.bidirectional else "reverse" if test.reverse else "normal"
