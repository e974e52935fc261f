"""The HTTP/1.1 static file service with hand-fed bytes (a fake stream; real files in a temporary root)."""

import os

import h11
import pytest

from tests.unit.services.test_iperf3 import FakeStream
from workers.services import httpd
from workers.services.files import FileStore

T0 = 50.0


@pytest.fixture
def root(tmp_path):
    (tmp_path / "www").mkdir()
    www = tmp_path / "www"
    (www / "hello.txt").write_bytes(b"hello, world\n")
    (www / "big.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    (www / "sub").mkdir()
    (www / "sub" / "index.html").write_bytes(b"<p>index</p>")
    (www / "list").mkdir()
    (www / "list" / "a b.txt").write_bytes(b"a")
    (www / "list" / "<x>").mkdir()
    (tmp_path / "secret.txt").write_bytes(b"top secret")
    os.symlink(tmp_path / "secret.txt", www / "escape.txt")
    os.symlink(www / "hello.txt", www / "inside.txt")
    os.utime(www / "hello.txt", (1_700_000_000, 1_700_000_000))
    return www


def serve(root, room=1 << 30, timeout=5.0):
    s = FakeStream(now=T0, room=room)
    svc = httpd.HttpServer(FileStore(str(root)), request_timeout=timeout)(s)
    return svc, s


def responses(raw: bytes, head_only=False):
    """Parse what the server sent with h11 as a client: [(status, headers dict, body)]."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(raw)
    out, body, current = [], b"", None
    while True:
        if current is None and client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
        if current is None and client.our_state is h11.IDLE:
            client.send(h11.Request(method="HEAD" if head_only else "GET", target="/", headers=[("Host", "x")]))
            client.send(h11.EndOfMessage())
        ev = client.next_event()
        if ev is h11.NEED_DATA or isinstance(ev, h11.ConnectionClosed):
            return out
        if isinstance(ev, h11.Response):
            current = (ev.status_code, {k.decode(): v.decode() for k, v in ev.headers})
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            out.append((*current, body))
            current, body = None, b""


def get(root, request: bytes, **kw):
    svc, s = serve(root, **kw)
    s.inbox += request
    svc.on_readable()
    return responses(s.sent, head_only=request.startswith(b"HEAD")), s, svc


def req(target="/hello.txt", method="GET", extra=b""):
    return f"{method} {target} HTTP/1.1\r\nHost: t\r\n".encode() + extra + b"\r\n"


def test_get_file_with_type_length_and_last_modified(root):
    [(status, h, body)], s, _ = get(root, req())
    assert status == 200 and body == b"hello, world\n"
    assert h["content-type"] == "text/plain" and h["content-length"] == "13"
    assert h["last-modified"] == "Tue, 14 Nov 2023 22:13:20 GMT" and "date" in h
    assert not s.closed  # keep-alive


def test_head_has_headers_and_no_body(root):
    [(status, h, body)], _, _ = get(root, req(method="HEAD"))
    assert status == 200 and h["content-length"] == "13" and body == b""


def test_pipelined_requests_answered_in_order(root):
    out, s, _ = get(root, req() + req("/sub/") + req("/nope"))
    assert [(st, b) for st, _, b in out] == [(200, b"hello, world\n"), (200, b"<p>index</p>"), (404, b"404 Not Found\n")]


def test_connection_close_closes_after_the_response(root):
    [(status, _, _)], s, _ = get(root, req(extra=b"Connection: close\r\n"))
    assert status == 200 and s.closed


def test_http_1_0_closes(root):
    svc, s = serve(root)
    s.inbox += b"GET /hello.txt HTTP/1.0\r\n\r\n"
    svc.on_readable()
    assert s.sent.startswith(b"HTTP/1.1 200 OK") and s.closed


@pytest.mark.parametrize("rng, status, body, content_range", [
    (b"bytes=0-4", 206, b"hello", "bytes 0-4/13"),
    (b"bytes=7-", 206, b"world\n", "bytes 7-12/13"),
    (b"bytes=-3", 206, b"ld\n", "bytes 10-12/13"),
    (b"bytes=5-100", 206, b", world\n", "bytes 5-12/13"),
    (b"bytes=13-", 416, b"416 Requested Range Not Satisfiable\n", "bytes */13"),
    (b"bytes=0-1,3-4", 200, b"hello, world\n", None),  # several ranges: the whole file
    (b"bytes=5-2", 200, b"hello, world\n", None),      # invalid: ignored
    (b"lines=1-2", 200, b"hello, world\n", None),
])
def test_byte_ranges(root, rng, status, body, content_range):
    [(st, h, b)], _, _ = get(root, req(extra=b"Range: " + rng + b"\r\n"))
    assert (st, b, h.get("content-range")) == (status, body, content_range)


def test_if_range_with_another_date_gets_the_whole_file(root):
    extra = b"Range: bytes=0-1\r\nIf-Range: Mon, 01 Jan 2001 00:00:00 GMT\r\n"
    [(st, _, b)], _, _ = get(root, req(extra=extra))
    assert st == 200 and b == b"hello, world\n"


@pytest.mark.parametrize("since, status", [
    (b"Tue, 14 Nov 2023 22:13:20 GMT", 304),
    (b"Wed, 15 Nov 2023 00:00:00 GMT", 304),
    (b"Tue, 14 Nov 2023 22:13:19 GMT", 200),
    (b"not a date", 200),
])
def test_if_modified_since(root, since, status):
    [(st, _, b)], _, _ = get(root, req(extra=b"If-Modified-Since: " + since + b"\r\n"))
    assert st == status and (b == b"") == (status == 304)


@pytest.mark.parametrize("target, status", [
    ("/../secret.txt", 400), ("/%2e%2e/secret.txt", 400), ("/sub/%2E%2E/%2e%2e/secret.txt", 400),
    ("/hello.txt%00.html", 400), ("/escape.txt", 404), ("/..%2fsecret.txt", 400), ("/%ff", 400),
    ("/inside.txt", 200), ("/sub/../hello.txt", 400), ("/./hello.txt", 200), ("/hello.txt?x=1", 200),
    ("http://t/hello.txt", 200), ("/no/such", 404), ("/hello.txt/", 404),
])
def test_paths_never_escape_the_root(root, target, status):
    [(st, _, body)], _, _ = get(root, req(target))
    assert st == status and b"top secret" not in body


def test_directory_listing_escapes_names_and_redirects_without_slash(root):
    [(st, h, body)], _, _ = get(root, req("/list/"))
    assert st == 200 and h["content-type"].startswith("text/html")
    assert b'href="a%20b.txt"' in body and b"&lt;x&gt;/" in body
    [(st, h, _)], _, _ = get(root, req("/list"))
    assert st == 301 and h["location"] == "/list/"


def test_method_not_allowed_keeps_the_connection(root):
    out, s, _ = get(root, req(method="POST", extra=b"Content-Length: 3\r\n") + b"abc" + req())
    assert [st for st, _, _ in out] == [405, 200] and out[0][1]["allow"] == "GET, HEAD"


def test_large_body_is_413(root):
    out, s, _ = get(root, req(extra=b"Content-Length: 10000000\r\n"))
    assert [st for st, _, _ in out] == [413] and s.closed


@pytest.mark.parametrize("raw, status", [
    (b"GET /" + b"a" * (httpd.MAX_REQUEST_LINE + 10), 414),
    (b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"b" * (httpd.MAX_HEAD + 10), 431),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(3000)), 431),
    (b"garbage\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 505),
])
def test_malformed_and_oversized_requests(root, raw, status):
    svc, s = serve(root)
    for i in range(0, len(raw), 1000):  # arriving in pieces
        s.inbox += raw[i:i + 1000]
        svc.on_readable()
    assert s.sent.startswith(b"HTTP/1.1 %d " % status), s.sent[:80]
    assert s.closed


def test_stalled_request_gets_408_and_idle_connection_is_closed(root):
    svc, s = serve(root, timeout=5.0)
    s.inbox += b"GET /hello.txt HTTP/1.1\r\nHost:"
    svc.on_readable()
    assert s.deadline == T0 + 5.0 and not s.sent
    s.now = s.deadline
    svc.on_timer()
    assert s.sent.startswith(b"HTTP/1.1 408 ") and s.closed
    idle, s2 = serve(root, timeout=5.0)
    s2.now = s2.deadline
    idle.on_timer()
    assert s2.closed and not s2.sent


def test_large_file_streams_with_back_pressure(root):
    svc, s = serve(root, room=100_000)
    s.inbox += req("/big.bin") + req() * 3000
    svc.on_readable()
    assert len(s.sent) <= 100_000 + httpd.CHUNK and svc.body is not None
    assert svc.body.remaining > 800_000  # the file is read as the connection drains, not at once
    assert len(s.inbox) > len(req()) * 3000 - httpd.CHUNK  # pipelined requests wait in the stream, unread
    while svc.pending or svc.body is not None or s.inbox:
        s.room += 100_000
        svc.on_writable()
    out = responses(s.sent)
    assert len(out) == 3001 and out[0][0] == 200 and out[0][2] == bytes(range(256)) * 4096
    assert all((st, body) == (200, b"hello, world\n") for st, _, body in out[1:])
