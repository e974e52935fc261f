"""stackctl's operator tools against the real stack: --netns, logs, conns, capture, counters, stop."""

import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.integration.netns import HOST_ADDR, ROOT, STACK_ADDR, Stack

STACKCTL = str(ROOT / ".venv" / "bin" / "stackctl")
STOP_BOUND = 5.0  # seconds from `stackctl stop` to honcho's exit: ~1 s idle, generous for a loaded machine


def stackctl(stack: Stack, *args: str, timeout: float = 20, **kw) -> subprocess.CompletedProcess:
    """stackctl run from the machine's namespace, entering the stack's with --netns."""
    return subprocess.run([STACKCTL, "--netns", stack.ns.name, *args], env=dict(os.environ, USTACK_RUN_DIR=stack.run_dir),
                          capture_output=True, timeout=timeout, **kw)


def spawn(stack: Stack, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([STACKCTL, "--netns", stack.ns.name, *args],
                            env=dict(os.environ, USTACK_RUN_DIR=stack.run_dir), **kw)


def lines_of(stream) -> "queue.Queue[str]":
    """A queue fed with the stream's lines by a reader thread (so reads can time out)."""
    q: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in iter(stream.readline, ""):
            q.put(line)
    threading.Thread(target=pump, daemon=True).start()
    return q


def echo_once(ns, port: int, line: bytes) -> int:
    """One connection to the line service; returns our (the client's) port."""
    with ns.socket() as sock:
        sock.settimeout(5)
        sock.connect((STACK_ADDR, port))
        sock.sendall(line + b"\n")
        assert sock.recv(1000) == line[::-1] + b"\n"
        return sock.getsockname()[1]


def test_netns_finds_the_stack_from_outside(fresh_ns):
    ns = fresh_ns
    # The default run directory, derived from the namespace: only --netns can find it from here.
    inode = os.stat(f"/run/netns/{ns.name}").st_ino
    stack = Stack(ns, run_dir=f"/run/ustack/{inode}-ustack0")
    try:
        stack.wait_ready()
        env = {k: v for k, v in os.environ.items() if not k.startswith("USTACK_")}
        done = subprocess.run([STACKCTL, "--netns", ns.name, "status", "--json"], env=env, capture_output=True,
                              text=True, timeout=20)
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        assert status["address"] == STACK_ADDR
        assert {p["name"] for p in status["processes"]} == {"ingress.1", "egress.1", "icmp.1", "udp.1", "tcp.1"}
        outside = subprocess.run([STACKCTL, "status"], env=env, capture_output=True, text=True, timeout=20)
        assert outside.returncode != 0 and "no answer" in outside.stderr
        missing = subprocess.run([STACKCTL, "--netns", ns.name + "-nope", "status"], env=env, capture_output=True,
                                 text=True, timeout=20)
        assert missing.returncode != 0 and "network namespace" in missing.stderr
    finally:
        stack.stop()


def test_logs_follow_filtered_by_process_and_event_during_traffic(ns, stack):
    # tcp_closed: the one record of each connection, written when it ends (echo_once closes it).
    follow = spawn(stack, "logs", "--follow", "--proc", "tcp.*", "--event", "tcp_closed",
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = lines_of(follow.stdout)
        # The subscription reaches the workers asynchronously: connect until the stream shows one.
        deadline = time.monotonic() + 15
        first = None
        while first is None and time.monotonic() < deadline:
            echo_once(ns, 8000, b"warm up")
            try:
                first = out.get(timeout=0.5)
            except queue.Empty:
                pass
        assert first is not None, "no record ever came"
        while True:  # what the warm-up left behind
            try:
                out.get(timeout=1)
            except queue.Empty:
                break
        ns.run("ping", "-c", "3", "-i", "0.2", STACK_ADDR)  # icmp.1 and ingress records: filtered out
        with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(3)
            udp.sendto(b"udp", (STACK_ADDR, 7))
            assert udp.recv(10) == b"udp"
        ports = {echo_once(ns, 8000, f"line {i}".encode()) for i in range(5)}
        records = []
        while len(records) < 5:
            records.append(json.loads(out.get(timeout=10)))
        time.sleep(1)
        assert out.empty(), out.get()
        assert {r["rport"] for r in records} == ports
        assert all(r["proc"] == "tcp.1" and r["event"] == "tcp_closed" and r["remote"] == HOST_ADDR
                   and r["lport"] == 8000 and r["established"] for r in records)
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(10)


def test_conns_shows_a_transfer_in_progress(ns, stack):
    with ns.socket() as bulk, ns.socket() as idle:
        bulk.settimeout(5)
        bulk.connect((STACK_ADDR, 19))  # chargen: it sends until our window closes, since we stop reading
        got = 0
        while got < 200_000:
            got += len(bulk.recv(65536))
        idle.connect((STACK_ADDR, 8000))
        port = bulk.getsockname()[1]
        time.sleep(0.5)
        done = stackctl(stack, "conns", "--json", "--state", "established", "--addr", ":19", text=True)
        assert done.returncode == 0, done.stderr
        records = json.loads(done.stdout)
        assert len(records) == 1, records
        r = records[0]
        assert r["worker"] == "tcp.1" and r["state"] == "ESTABLISHED"
        assert r["local"] == f"{STACK_ADDR}:19" and r["remote"] == f"{HOST_ADDR}:{port}"
        assert r["bytes_sent"] >= got and r["segments_out"] > 0 and r["segments_in"] > 0
        assert (r["snd_nxt"] - r["snd_una"]) % 2**32 < 2**31 and r["rcv_nxt"] != 0
        assert r["cwnd"] > 0 and r["ssthresh"] > 0 and r["mss"] > 0
        assert r["srtt"] > 0 and r["rttvar"] is not None and r["rto"] >= 0.2
        assert r["sack"] is True and r["timestamps"] is True and len(r["wscale"]) == 2
        assert r["send_buffer"][0] > 0 and r["send_buffer"][1] == 1 << 20  # we stopped reading: it backs up
        assert r["recv_buffer"] == [0, 64 * 1024]  # nothing comes in: it stays at its initial size
        assert r["age"] > 0 and r["retransmissions"] >= 0
        table = stackctl(stack, "conns", text=True)
        assert table.returncode == 0
        assert f"{HOST_ADDR}:{port}" in table.stdout and f"{STACK_ADDR}:8000" in table.stdout
        assert re.search(r"cwnd:\d+ ssthresh:\d+ snd_una:\d+ snd_nxt:\d+ rcv_nxt:\d+", table.stdout)


def _follow_bytes(pcap: str, client_port: int, server_port: int) -> tuple[int, int]:
    """Bytes each way of one TCP stream, reassembled by tshark."""
    done = subprocess.run(["tshark", "-r", pcap, "-q", "-z",
                           f"follow,tcp,raw,{HOST_ADDR}:{client_port},{STACK_ADDR}:{server_port}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    to_stack = from_stack = 0
    for line in done.stdout.splitlines():  # data lines are hex; the peer's are indented
        data = line.strip()
        if not data or not re.fullmatch(r"[0-9a-f]+", data):
            continue
        if line.startswith("\t"):
            from_stack += len(data) // 2
        else:
            to_stack += len(data) // 2
    return to_stack, from_stack


def test_capture_is_read_back_by_tshark(ns, stack, tmp_path):
    pcap = str(tmp_path / "echo.pcap")
    cap = spawn(stack, "capture", "-w", pcap, "--flow", ":7", stderr=subprocess.PIPE, text=True)
    try:
        err = lines_of(cap.stderr)
        announced = set()
        while announced != {"ingress.1", "egress.1"}:
            announced.add(err.get(timeout=15).strip().rpartition(" ")[2])
        payload = os.urandom(300_000)
        with ns.socket() as sock:
            sock.settimeout(10)
            sock.connect((STACK_ADDR, 7))
            port = sock.getsockname()[1]
            sender = threading.Thread(target=sock.sendall, args=(payload,))
            sender.start()
            echoed = bytearray()
            while len(echoed) < len(payload):
                echoed += sock.recv(65536)
            sender.join()
            assert echoed == payload
        time.sleep(1)  # the FIN exchange
    finally:
        cap.send_signal(signal.SIGINT)
        cap.wait(10)
    tail = "".join(err.get(timeout=5) for _ in range(err.qsize()))
    captured = int(re.search(r"(\d+) packets captured", tail).group(1))
    listing = subprocess.run(["tshark", "-r", pcap], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert len(listing.stdout.splitlines()) == captured > 4
    assert _follow_bytes(pcap, port, 7) == (len(payload), len(payload))


def test_capture_to_a_pipe_with_a_count(ns, stack):
    reader = subprocess.Popen(["tshark", "-r", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    cap = spawn(stack, "capture", "-w", "-", "-c", "4", "--flow", HOST_ADDR, stdout=reader.stdin,
                stderr=subprocess.PIPE, text=True)
    reader.stdin.close()
    try:
        err = lines_of(cap.stderr)
        announced = set()
        while announced != {"ingress.1", "egress.1"}:
            announced.add(err.get(timeout=15).strip().rpartition(" ")[2])
        ns.run("ping", "-c", "3", "-i", "0.2", STACK_ADDR)
        assert cap.wait(15) == 0
        out = reader.stdout.read()  # tshark ends when stackctl closes the pipe
        reader.wait(30)
    finally:
        if cap.poll() is None:
            cap.kill()
        if reader.poll() is None:
            reader.kill()
    rows = out.splitlines()
    assert len(rows) == 4, out
    assert sum("Echo (ping) request" in r for r in rows) == 2 and sum("Echo (ping) reply" in r for r in rows) == 2


def test_counters_lists_every_process_and_its_drops(ns, stack):
    with ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        # An IPv4 datagram whose UDP header is cut short: ingress passes it, udp.1 drops it.
        header = bytes([0x45, 0, 0, 24, 0, 0, 0x40, 0, 64, 17, 0, 0]) + socket.inet_aton(HOST_ADDR) + \
            socket.inet_aton(STACK_ADDR)
        raw.sendto(header + b"\x00\x07\x00\x07", (STACK_ADDR, 0))
    deadline = time.monotonic() + 5
    while True:
        done = stackctl(stack, "counters", "--json", text=True)
        assert done.returncode == 0, done.stderr
        drops = json.loads(done.stdout)
        if sum(drops.get("udp.1", {}).values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {"ingress.1", "egress.1", "icmp.1", "udp.1", "tcp.1"} <= drops.keys()
    assert all(isinstance(n, int) for reasons in drops.values() for n in reasons.values())
    assert sum(drops["udp.1"].values()) >= 1, drops
    table = stackctl(stack, "counters", text=True).stdout
    assert table.splitlines()[0].split() == ["process", "drop", "reason", "packets"]


def test_stop_is_ordered_and_resets_open_connections(fresh_ns):
    ns = fresh_ns
    stack = Stack(ns)
    try:
        stack.wait_ready()
        with ns.socket() as sock:
            sock.settimeout(10)
            sock.connect((STACK_ADDR, 8000))
            sock.sendall(b"before stop\n")
            assert sock.recv(100) == b"pots erofeb\n"
            asked = time.monotonic()
            done = stackctl(stack, "stop", text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            assert stack.proc.wait(timeout=15) == 0
            took = time.monotonic() - asked
            with pytest.raises(ConnectionResetError):
                sock.recv(100)  # the worker's reset went out through egress before it stopped
    finally:
        stack.stop()
    print(f"stackctl stop to honcho's exit: {took:.2f} s")
    records = stack.records()
    # Nothing died on the way: no respawn, no traceback (a stop that crashes a stage and
    # lets the others time out still ends, but slowly and with a restart in between).
    assert not [r for r in records if r["event"] == "process_died"], records
    assert not [line for line in stack.lines() if "Traceback" in line]
    assert took < STOP_BOUND, f"stop took {took:.1f} s"
    when = {(r["proc"], r["event"]): r["timestamp"] for r in records}
    for worker in ("tcp.1", "udp.1", "icmp.1"):
        assert when[(worker, "worker_parked")] <= when[("egress.1", "egress_parked")]
    assert when[("egress.1", "egress_parked")] <= when[("ingress.1", "ingress_stopped")]
    assert not os.path.exists(stack.run_dir)
