"""The HTTP/1.1 static file service on port 80 against curl, ab and raw sockets in the stack's namespace."""

import hashlib
import os
import re

import pytest

from tests.integration.netns import STACK_ADDR
from tests.integration.svc_clients import exchange, running_stack

SIZES = [0, 1, 1460, 65536, 1_000_007, 100_000_000]
URL = f"http://{STACK_ADDR}"


@pytest.fixture(scope="module")
def www(tmp_path_factory):
    base = tmp_path_factory.mktemp("http")
    root = base / "www"
    root.mkdir()
    digests = {}
    for size in SIZES:
        data = hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1)
        data = data[:size]
        (root / f"f{size}.bin").write_bytes(data)
        digests[size] = hashlib.sha256(data).hexdigest()
    (root / "hello.txt").write_bytes(b"hello, world\n")
    (root / "docs").mkdir()
    (root / "docs" / "index.html").write_bytes(b"<h1>docs</h1>\n")
    (base / "secret.txt").write_bytes(b"top secret\n")
    os.symlink(base / "secret.txt", root / "leak.txt")
    os.utime(root / "hello.txt", (1_700_000_000, 1_700_000_000))
    return root, digests


@pytest.fixture(scope="module")
def http_stack(ns, www):
    with running_stack(ns, env={"USTACK_HTTP_ROOT": str(www[0]), "USTACK_HTTP_TIMEOUT": "2"}) as s:
        yield s


def curl(ns, *args, timeout=330):
    done = ns.run("curl", "-sS", "--max-time", "300", *args, check=False, timeout=timeout)
    return done


@pytest.mark.parametrize("size", SIZES)
def test_download_sizes_with_sha256(ns, http_stack, www, tmp_path, size):
    out = tmp_path / "got"
    done = curl(ns, "-o", str(out), "-w", "%{http_code} %{size_download}", f"{URL}/f{size}.bin")
    assert done.stdout.decode() == f"200 {size}", done.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == www[1][size]


def test_ranges(ns, http_stack):
    assert curl(ns, "-r", "0-4", f"{URL}/hello.txt").stdout == b"hello"
    assert curl(ns, "-r", "-6", f"{URL}/hello.txt").stdout == b"world\n"
    done = curl(ns, "-r", "99-", "-o", "/dev/null", "-w", "%{http_code}", f"{URL}/hello.txt")
    assert done.stdout == b"416"
    part = curl(ns, "-r", "1000000-1000006", f"{URL}/f1000007.bin").stdout
    whole = hashlib.sha256(b"1000007").digest() * (1_000_007 // 32 + 1)
    assert part == whole[1_000_000:1_000_007]


def test_conditional_requests(ns, http_stack):
    head = curl(ns, "-I", f"{URL}/hello.txt").stdout.decode()
    assert "Last-Modified: Tue, 14 Nov 2023 22:13:20 GMT" in head and "Content-Length: 13" in head
    assert "Content-Type: text/plain" in head
    same = curl(ns, "-o", "/dev/null", "-w", "%{http_code}", "-H",
                "If-Modified-Since: Tue, 14 Nov 2023 22:13:20 GMT", f"{URL}/hello.txt")
    older = curl(ns, "-o", "/dev/null", "-w", "%{http_code}", "-H",
                 "If-Modified-Since: Mon, 13 Nov 2023 00:00:00 GMT", f"{URL}/hello.txt")
    assert (same.stdout, older.stdout) == (b"304", b"200")


def test_keep_alive_reuses_one_connection(ns, http_stack):
    done = curl(ns, "-v", f"{URL}/hello.txt", f"{URL}/docs/", f"{URL}/hello.txt")
    assert done.stdout == b"hello, world\n<h1>docs</h1>\nhello, world\n"
    assert done.stderr.count(b"Re-using existing connection") == 2, done.stderr.decode()


@pytest.mark.parametrize("path", ["/../secret.txt", "/%2e%2e/secret.txt", "/docs/%2E%2E/%2e%2e/secret.txt",
                                  "/leak.txt", "/hello.txt%00", "/..%2fsecret.txt"])
def test_traversal_attempts_never_leave_the_root(ns, http_stack, path):
    done = curl(ns, "--path-as-is", "-w", "\n%{http_code}", f"{URL}{path}")
    body, _, status = done.stdout.rpartition(b"\n")
    assert status in (b"400", b"404") and b"top secret" not in body


def test_ab_without_failed_requests(ns, http_stack):
    done = ns.run("ab", "-q", "-n", "2000", "-c", "20", f"{URL}/hello.txt", check=False, timeout=180)
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert re.search(r"Complete requests:\s+2000\b", out) and re.search(r"Failed requests:\s+0\b", out), out
    assert re.search(r"Non-2xx responses", out) is None


def raw_exchange(ns, payload: bytes) -> bytes:
    return exchange(ns, 80, payload)


MALFORMED = [
    (b"garbage\r\n\r\n", 400),
    (b"GET /hello.txt HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /hello.txt HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    (b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", 413),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n", 431),
    (b"DELETE /hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
    (b"GET /hello.txt HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /nothing-here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404),
    (b"\x00\x01\x02\xff\r\n\r\n", 400),
    (b"GET /hello.txt HTTP/1.1\r\nHost: x", 408),  # stalls mid-request: 2 s in this stack
]


@pytest.mark.parametrize("payload, status", MALFORMED)
def test_malformed_request_corpus(ns, http_stack, payload, status):
    got = raw_exchange(ns, payload)
    assert got.startswith(b"HTTP/1.1 %d " % status), got[:100]
    assert curl(ns, f"{URL}/hello.txt").stdout == b"hello, world\n"  # and the service lives on


def test_pipelined_requests_in_one_write(ns, http_stack):
    req = b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n"
    got = raw_exchange(ns, req * 5 + b"GET /docs/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got.count(b"HTTP/1.1 200 OK") == 6 and got.endswith(b"<h1>docs</h1>\n")


def test_one_log_record_per_request(ns, http_stack):
    assert curl(ns, f"{URL}/hello.txt?logged=1").stdout == b"hello, world\n"
    http_stack.wait_for(lambda recs: any(r["event"] == "http_request" and r["path"] == "/hello.txt?logged=1"
                                         for r in recs), 10, "http_request logged")
    [rec] = [r for r in http_stack.records() if r["event"] == "http_request" and r["path"] == "/hello.txt?logged=1"]
    assert rec["method"] == "GET" and rec["status"] == 200 and rec["bytes"] == 13 and rec["duration"] >= 0
