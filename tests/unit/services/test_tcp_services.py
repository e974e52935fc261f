"""The TCP services against a fake stream with a small send buffer (back-pressure)."""

from workers.services import tcp as apps
from workers.services.udp import SERVICES as UDP_SERVICES


class FakeStream:
    def __init__(self, room: int = 1 << 30):
        self.inbox = b""
        self.sent = b""
        self.room = room
        self.closed = False

    @property
    def readable(self):
        return len(self.inbox)

    def recv(self, max_bytes=-1):
        n = len(self.inbox) if max_bytes < 0 else max_bytes
        data, self.inbox = self.inbox[:n], self.inbox[n:]
        return data

    def send(self, data):
        n = min(len(data), self.room)
        self.sent += data[:n]
        self.room -= n
        return n

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True


def feed(svc, stream, data):
    stream.inbox += data
    svc.on_readable()


def test_line_reverser_handles_any_split():
    text = b"hello\nworld\n\nxy\n"
    for cut in range(len(text) + 1):
        s = FakeStream()
        svc = apps.LineReverser(s)
        feed(svc, s, text[:cut])
        feed(svc, s, text[cut:])
        assert s.sent == b"olleh\ndlrow\n\nyx\n", cut


def test_line_reverser_last_line_without_newline_and_eof_closes():
    s = FakeStream()
    svc = apps.LineReverser(s)
    feed(svc, s, b"abc")
    svc.on_eof()
    assert s.sent == b"cba\n" and s.closed


def test_echo_back_pressure_stops_reading_until_writable():
    s = FakeStream(room=4)
    svc = apps.Echo(s)
    feed(svc, s, b"0123456789")
    assert s.sent == b"0123" and svc.pending == b"456789"
    s.inbox += b"more"
    svc.on_readable()
    assert s.inbox == b"more"  # not read while output is held: the window closes
    s.room = 100
    svc.on_writable()
    assert s.sent == b"0123456789more" and not svc.pending


def test_echo_closes_after_peer_eof_once_output_is_out():
    s = FakeStream(room=2)
    svc = apps.Echo(s)
    feed(svc, s, b"abcd")
    svc.on_eof()
    assert not s.closed
    s.room = 10
    svc.on_writable()
    assert s.sent == b"abcd" and s.closed


def test_chargen_pattern_is_rfc864_and_continuous():
    s = FakeStream(room=10_000)
    svc = apps.Chargen(s)
    lines = s.sent.split(b"\r\n")
    assert lines[0] == bytes(range(32, 104)) and lines[1] == bytes(range(33, 105))
    s.room = 100_000
    svc.on_writable()
    stream = s.sent
    assert stream[:len(apps._CHARGEN)] == stream[len(apps._CHARGEN):2 * len(apps._CHARGEN)]


def test_discard_reads_everything():
    s = FakeStream()
    svc = apps.Discard(s)
    feed(svc, s, b"x" * 100_000)
    assert s.inbox == b"" and s.sent == b""


def test_quote_sends_and_closes():
    s = FakeStream()
    apps.QuoteOfTheDay(s)
    assert s.sent == apps.QuoteOfTheDay.QUOTE and s.closed


def test_udp_services():
    assert UDP_SERVICES[8000](b" abc \r\n") == b"cba\n"
    assert UDP_SERVICES[7](b"\x00\xff") == b"\x00\xff"


def test_echo_with_unread_input_at_eof_finishes_only_after_echoing_it_all():
    s = FakeStream(room=3)
    svc = apps.Echo(s)
    s.inbox = b"abcdef"
    svc.on_eof()  # FIN arrives while input is still waiting behind held output
    assert not s.closed
    for _ in range(3):
        s.room += 3
        svc.on_writable()
    assert s.sent == b"abcdef" and s.closed
