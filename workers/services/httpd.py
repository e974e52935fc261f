"""HTTP/1.1 static files (port 80 when USTACK_HTTP_ROOT is set), on h11 and the stream interface.

h11 (a sans-IO HTTP/1.1 parser made for exactly this) does the message
syntax and framing of RFC 9112: request line and fields, Content-Length,
keep-alive, ``Connection: close``, HTTP/1.0, and pipelining (it pauses after
a request until our response is complete). This module adds the semantics
of a static file server (RFC 9110):

- GET and HEAD (§9.3.1, §9.3.2); anything else 405 with ``Allow``;
- ``Content-Type`` by extension, ``Content-Length``, ``Last-Modified``
  (§8.8.2) and ``If-Modified-Since`` → 304 (§13.1.3);
- one byte range per request (§14.2): 206 with ``Content-Range``, 416 when
  unsatisfiable; several ranges, or a stale ``If-Range``, get the whole file
  (a server may ignore Range, §14.2);
- directories: ``index.html`` if present, else a listing; a directory named
  without its trailing slash is redirected (301) so relative links work;
- limits: a request line over MAX_REQUEST_LINE → 414, a header section over
  MAX_HEAD → 431, a request body over MAX_BODY → 413, malformed → 400, a
  request not complete ``request_timeout`` (USTACK_HTTP_TIMEOUT) after it
  began → 408 (RFC 9110 §15.5.9) — each of those closes the connection;
- paths: percent-decoded once, ``..`` and NUL refused (400), symlinks out of
  the root not found (404; ``files.FileStore`` checks the real path).

Back-pressure: a response body is pulled from a ``files.FileReader`` one
chunk at a time while the send buffer has room, and no new request is read
while a response is in progress, so neither a large file nor a client that
pipelines requests and never reads grows memory. One JSON log record per
request (``http_request``: method, path, status, bytes, duration).

No file or clock access here: ``files.FileStore`` (the worker's) does both.
"""

from __future__ import annotations

import html
import re
import urllib.parse
from email.utils import formatdate, parsedate_to_datetime
from http import HTTPStatus
from typing import Any

import h11

from workers.services.tcp import Service
from workers.services.files import Entry, FileReader, FileStore

MAX_REQUEST_LINE = 8 * 1024  # bytes; longer → 414
MAX_HEAD = 16 * 1024         # bytes of request line and fields; more → 431
MAX_BODY = 64 * 1024         # a GET/HEAD body we read and ignore; larger → 413
CHUNK = 64 * 1024            # bytes read from a file at a time

SERVER = b"ustack"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class HttpServer:
    """One per worker: the service factory for port 80."""

    def __init__(self, files: FileStore, request_timeout: float) -> None:
        self.files = files
        self.request_timeout = request_timeout

    def __call__(self, stream: Any) -> HttpConnection:
        return HttpConnection(stream, self.files, self.request_timeout)


class HttpConnection(Service):
    def __init__(self, stream: Any, files: FileStore, request_timeout: float) -> None:
        super().__init__(stream)
        self.files = files
        self.timeout = request_timeout
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD + MAX_REQUEST_LINE)
        self.body: FileReader | None = None
        self.eof_fed = False
        self.closing = False
        self._request: tuple[str, str, float] | None = None  # method, path, start time
        self._status = 0
        self._bytes = 0
        stream.set_timer(stream.now + self.timeout)

    # -- stream events -----------------------------------------------------

    def on_readable(self) -> None:
        self._pump()

    def on_writable(self) -> None:
        if self._flush():
            self._pump()

    def on_eof(self) -> None:
        self.eof = True
        self._pump()

    def on_timer(self) -> None:
        """The request did not arrive whole in time (408), or the connection sat idle (closed)."""
        if self.closed or self.body is not None:
            return
        started = self.h11.their_state is not h11.IDLE or bool(self.h11.trailing_data[0])
        if started and self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._error(408)
        else:
            self._close()

    def on_closed(self) -> None:
        self.closed = True
        if self.body is not None:
            self.body.close()
            self.body = None
            self._log()

    # -- the loop ----------------------------------------------------------

    def _pump(self) -> None:
        """Send what the response still owes, then read and answer requests until blocked."""
        while not self.closed:
            if self.pending:
                return  # back-pressure: wait for on_writable
            if self.body is not None:
                self._send_body()
                continue
            if self.closing:
                self._close()
                return
            conn = self.h11
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
                self.stream.set_timer(self.stream.now + self.timeout)
            if conn.our_state is h11.MUST_CLOSE or conn.our_state is h11.CLOSED:
                self._close()
                return
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._error(exc.error_status_hint if exc.error_status_hint >= 400 else 400)
                continue
            if event is h11.NEED_DATA:
                if not self._receive():
                    return
            elif event is h11.PAUSED:
                return  # cannot happen while no response is in progress; stay safe
            elif isinstance(event, h11.Request):
                self.stream.set_timer(None)
                self._respond(event)
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return
            # Data of a request body and EndOfMessage need nothing from us.

    def _receive(self) -> bool:
        """Feed h11 what the stream has; False when we must wait for more."""
        data = self.stream.recv(CHUNK)
        if not data:
            if self.eof and not self.eof_fed:
                self.eof_fed = True
                self.h11.receive_data(b"")
                return True
            if self.h11.their_state is not h11.IDLE or self.h11.trailing_data[0]:
                pass  # a request under way: the timer set when we began waiting gives 408
            return False
        if self.h11.their_state is h11.IDLE:
            status = _head_too_large(self.h11.trailing_data[0] + data)
            if status:
                self._error(status)
                return True
        self.h11.receive_data(data)
        return True

    # -- requests ----------------------------------------------------------

    def _respond(self, req: h11.Request) -> None:
        method = req.method.decode("ascii", "replace")
        target = req.target.decode("ascii", "replace")
        self._request = (method, target[:300], self.stream.now)
        self._status = self._bytes = 0
        headers = {name.decode("ascii").lower(): value.decode("latin-1") for name, value in req.headers}
        length = headers.get("content-length")
        if headers.get("transfer-encoding") or (length is not None and int(length) > MAX_BODY):
            self._error(413)
            return
        if req.http_version not in (b"1.0", b"1.1"):
            self._error(505)
            return
        if method not in ("GET", "HEAD"):
            self._simple(405, extra=[("Allow", "GET, HEAD")])
            return
        segments = _path_segments(req.target)
        if segments is None:
            self._error(400)
            return
        entry = self.files.lookup(segments)
        path = _target_path(req.target)
        if entry is not None and entry.is_dir:
            if not path.endswith("/"):
                self._simple(301, extra=[("Location", path + "/")])
                return
            index = self.files.lookup([*segments, "index.html"])
            if index is None or index.is_dir:
                self._listing(method, path, entry)
                return
            entry = index
        elif entry is not None and path.endswith("/"):
            entry = None  # a file named as a directory
        if entry is None:
            self._simple(404)
            return
        self._file(method, headers, entry)

    def _file(self, method: str, headers: dict[str, str], entry: Entry) -> None:
        last_modified = formatdate(int(entry.mtime), usegmt=True)
        common = [("Last-Modified", last_modified), ("Accept-Ranges", "bytes")]
        since = _http_date(headers.get("if-modified-since"))
        if since is not None and "if-none-match" not in headers and int(entry.mtime) <= since:
            self._head(304, common)  # RFC 9110 §13.1.3
            self._end()
            return
        size = entry.size
        start, length, status = 0, size, 200
        wanted = headers.get("range")
        if wanted is not None and method == "GET" and headers.get("if-range", last_modified) == last_modified:
            span = _byte_range(wanted, size)
            if span == "unsatisfiable":
                self._simple(416, extra=[("Content-Range", f"bytes */{size}")])
                return
            if span is not None:
                start, end = span
                length, status = end - start + 1, 206
                common.append(("Content-Range", f"bytes {start}-{end}/{size}"))
        reader = self.files.open(entry, start, length) if method == "GET" and length else None
        if method == "GET" and length and reader is None:
            self._simple(404)  # vanished or unreadable since the lookup
            return
        self._head(status, [("Content-Type", entry.content_type), ("Content-Length", str(length)), *common])
        if reader is None:
            self._end()
            return
        self.body = reader

    def _listing(self, method: str, path: str, entry: Entry) -> None:
        rows = []
        for name, is_dir in self.files.listing(entry):
            shown = name + ("/" if is_dir else "")
            rows.append(f'<li><a href="{urllib.parse.quote(shown)}">{html.escape(shown)}</a></li>')
        title = html.escape(path)
        page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Index of {title}</title></head>"
                f"<body><h1>Index of {title}</h1><ul>{''.join(rows)}</ul></body></html>\n").encode()
        self._head(200, [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(page))),
                         ("Last-Modified", formatdate(int(entry.mtime), usegmt=True))])
        if method == "GET":
            self._data(page)
        self._end()

    # -- responses ---------------------------------------------------------

    def _head(self, status: int, headers: list[tuple[str, str]], close: bool = False) -> None:
        self._status = status
        fields = [("Date", formatdate(self.files.wall_clock(), usegmt=True)), ("Server", SERVER.decode()), *headers]
        if close:
            fields.append(("Connection", "close"))
        self.write(self.h11.send(h11.Response(status_code=status, headers=fields,
                                              reason=HTTPStatus(status).phrase.encode())))

    def _data(self, data: bytes) -> None:
        self._bytes += len(data)
        self.write(self.h11.send(h11.Data(data=data)))

    def _end(self) -> None:
        self.write(self.h11.send(h11.EndOfMessage()))
        self._log()

    def _simple(self, status: int, extra: list[tuple[str, str]] | None = None, close: bool = False) -> None:
        """A short text response with its status line as the body."""
        method = self._request[0] if self._request else "GET"
        body = f"{status} {HTTPStatus(status).phrase}\n".encode()
        self._head(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                            *(extra or [])], close=close)
        if method != "HEAD":
            self._data(body)
        self._end()

    def _error(self, status: int) -> None:
        """A protocol-level error: answer if h11 still lets us, then close."""
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            if self._request is None:
                self._request = ("-", "-", self.stream.now)
            self._simple(status, close=True)
        self.closing = True
        self._close()

    def _send_body(self) -> None:
        body = self.body
        assert body is not None
        chunk = body.read(CHUNK)
        if chunk:
            self._data(chunk)
            return
        body.close()
        self.body = None
        if body.remaining:  # the file shrank under us: the promised length cannot be kept
            self.stream.log.info("http_file_shrank", path=self._request[1] if self._request else "-")
            self._log()
            self.closed = True
            self.stream.abort()
            return
        self._end()

    def _log(self) -> None:
        if self._request is None:
            return
        method, path, start = self._request
        self._request = None
        self.stream.log.info("http_request", method=method, path=path, status=self._status, bytes=self._bytes,
                             duration=round(self.stream.now - start, 6))

    def _close(self) -> None:
        if not self.closed and not self.pending:
            self.closed = True
            self.stream.set_timer(None)
            self.stream.close()
        elif not self.closed:
            self.closing = True


def _head_too_large(buffered: bytes) -> int:
    """414 or 431 if the request head being received is over our limits, else 0."""
    line_end = buffered.find(b"\n", 0, MAX_REQUEST_LINE + 1)
    if line_end < 0:
        return 414 if len(buffered) > MAX_REQUEST_LINE else 0
    if buffered.find(b"\n\r\n", 0, MAX_HEAD) < 0 and buffered.find(b"\n\n", 0, MAX_HEAD) < 0 \
            and len(buffered) > MAX_HEAD:
        return 431
    return 0


def _target_path(target: bytes) -> str:
    """The path of an origin-form or absolute-form target (RFC 9112 §3.2), query dropped, one leading slash."""
    if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
        parts = target.split(b"/", 3)
        target = b"/" + (parts[3] if len(parts) > 3 else b"")
    path = target.split(b"?", 1)[0].split(b"#", 1)[0].decode("ascii", "replace")
    return "/" + path.lstrip("/") if path.startswith("/") else path


def _path_segments(target: bytes) -> list[str] | None:
    """The decoded path segments of a request target, or None if it is unusable (400)."""
    path = _target_path(target)
    if not path.startswith("/"):
        return None
    raw = urllib.parse.unquote_to_bytes(path)
    if b"\0" in raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    segments = [s for s in text.split("/") if s not in ("", ".")]
    if ".." in segments or any("\\" in s for s in segments):
        return None
    return segments


def _byte_range(value: str, size: int) -> tuple[int, int] | str | None:
    """RFC 9110 §14.1.2: one range as (first, last) inclusive, "unsatisfiable", or None to ignore it."""
    m = _RANGE.fullmatch(value.strip())
    if m is None:
        return None  # several ranges or another unit: served whole
    first, last = m.group(1), m.group(2)
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # invalid: ignored
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


def _http_date(value: str | None) -> int | None:
    if not value:
        return None
    try:
        return int(parsedate_to_datetime(value).timestamp())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
