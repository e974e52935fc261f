"""Logs, start order, restarts and shutdown of the real processes."""

import datetime
import os
import signal
import socket
import time

import pytest

from pipeline import respawn
from tests.integration.netns import RUN_DIR_BASE, STACK_ADDR, Stack, parent_pid, process_pid

PROCESSES = [("ingress.1", "pipeline.ingress"), ("egress.1", "pipeline.egress"), ("icmp.1", "workers.icmp"),
             ("udp.1", "workers.udp"), ("tcp.1", "workers.tcp")]


def _ping_ok(ns) -> bool:
    return b" 0% packet loss" in ns.run("ping", "-c", "2", "-i", "0.2", "-W", "2", STACK_ADDR, check=False).stdout


def test_json_logs_have_the_promised_fields(ns, stack):
    with ns.socket() as sock:
        sock.settimeout(5)
        sock.connect((STACK_ADDR, 8000))
        sock.sendall(b"log me\n")
        assert sock.recv(100) == b"em gol\n"
    stack.wait_for(lambda recs: any(r["event"] == "tcp_closed" for r in recs), 10, "tcp_closed logged")
    records = stack.records()
    assert records
    procs = set()
    for r in records:
        assert {"timestamp", "level", "event", "proc"} <= r.keys(), r
        stamp = datetime.datetime.fromisoformat(r["timestamp"])
        assert stamp.utcoffset() == datetime.timedelta(0)
        procs.add(r["proc"])
    assert {"ingress.1", "egress.1", "icmp.1", "udp.1", "tcp.1"} <= procs
    # A connection's one record at info, when it ends: who, how long, how much, why.
    closed = next(r for r in records if r["event"] == "tcp_closed")
    assert closed["level"] == "info" and closed["proc"] == "tcp.1"
    assert closed["remote"] == "10.0.0.1" and closed["lport"] == 8000 and closed["rport"] > 0
    assert closed["established"] is True and closed["reason"] == "closed"
    assert isinstance(closed["duration"], (int, float)) and 0 <= closed["duration"] < 10
    assert closed["bytes_received"] == closed["bytes_sent"] == len(b"log me\n") and "retransmissions" in closed
    # At debug, its opening too.
    opened = next(r for r in records if r["event"] == "tcp_established")
    assert opened["level"] == "debug" and opened["rport"] == closed["rport"] and opened["lport"] == 8000
    # Debug level: parsed headers and state changes, never the payload.
    tcp_in = [r for r in records if r["event"] == "tcp_in"]
    assert tcp_in and {"src", "dst", "sport", "dport", "seq", "ack", "flags", "window"} <= tcp_in[0].keys()
    assert any(r["event"] == "tcp_state" and r["new"] == "ESTABLISHED" for r in records)
    assert not any("log me" in line or "em gol" in line for line in stack.lines())


def test_at_info_each_connection_is_one_record(fresh_ns):
    """At the default level a connection writes one line through honcho: tcp_closed."""
    ns = fresh_ns
    s = Stack(ns)
    try:
        s.wait_ready()
        ports = []
        for i in range(3):
            with ns.socket() as sock:
                sock.settimeout(5)
                sock.connect((STACK_ADDR, 8000))
                sock.sendall(b"line %d\n" % i)
                assert sock.recv(100) == b"%d enil\n" % i
                ports.append(sock.getsockname()[1])
        s.wait_for(lambda recs: sum(r["event"] == "tcp_closed" for r in recs) >= 3, 10, "three tcp_closed")
        mine = [r for r in s.records() if r.get("rport") in ports]
        assert sorted(r["rport"] for r in mine) == sorted(ports), mine  # one record each
        assert all(r["event"] == "tcp_closed" and r["level"] == "info" and r["established"] for r in mine)
    finally:
        s.stop()


def test_any_start_order_and_restart_of_ingress_and_egress(fresh_ns):
    ns = fresh_ns
    run_dir = f"{RUN_DIR_BASE}/{ns.name}"
    # Two honchos that make one stack: they say so (else the second is refused as another stack).
    one_stack = {"USTACK_STACK_ID": f"test-{ns.name}"}
    workers = Stack(ns, "icmp", "udp", "tcp", run_dir=run_dir, env=one_stack)
    try:
        workers.wait_for(lambda recs: sum(r["event"] == "worker_started" for r in recs) == 3, 15, "workers up")
        for _ in range(2):  # start the stages after the workers, then restart them
            stages = Stack(ns, "ingress", "egress", run_dir=run_dir, env=one_stack)
            try:
                stages.wait_ready()
                assert _ping_ok(ns)
                udp = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
                udp.settimeout(3)
                with udp:
                    udp.sendto(b"order", (STACK_ADDR, 7))
                    assert udp.recv(10) == b"order"
            finally:
                stages.stop()
    finally:
        workers.stop()


@pytest.mark.parametrize("loop", ["c", "python"])
def test_each_process_sigkilled_is_restarted_under_its_name(fresh_ns, loop):
    """The respawn wrapper's loop in C (build/respawn, what scripts/install builds) and in Python
    (USTACK_PURE=1, or no compiler): each pipeline process SIGKILLed comes back under the same
    honcho name and wrapper, and the stack answers again."""
    ns = fresh_ns
    if loop == "c":
        assert respawn.compiled_loop() is not None, "build/respawn missing or stale: scripts/install builds it"
    s = Stack(ns, env={"USTACK_PURE": "1"} if loop == "python" else {})
    try:
        s.wait_ready()
        for name, module in PROCESSES:
            old = process_pid(ns, name, module)
            wrapper = parent_pid(old)
            runs_c = os.readlink(f"/proc/{wrapper}/exe") == os.path.realpath(respawn.LOOP)
            assert runs_c == (loop == "c"), name
            os.kill(old, signal.SIGKILL)
            s.wait_for(lambda recs: any(r["event"] == "process_died" and r["proc"] == name for r in recs), 10,
                       f"{name}: process_died")
            died = next(r for r in s.records() if r["event"] == "process_died" and r["proc"] == name)
            assert died["exit_code"] == -signal.SIGKILL and died["restarts"] == 1, died
            deadline = time.monotonic() + 10
            while True:
                try:
                    new = process_pid(ns, name, module)
                    break
                except LookupError:
                    assert time.monotonic() < deadline, f"{name} never came back"
                    time.sleep(0.05)
            assert new != old and parent_pid(new) == wrapper, name  # restarted by the same wrapper
        deadline = time.monotonic() + 20
        while not _ping_ok(ns):
            assert time.monotonic() < deadline, "no answer after the restarts"
        with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(3)
            udp.sendto(b"again", (STACK_ADDR, 7))
            assert udp.recv(10) == b"again"
        with ns.socket() as sock:
            sock.settimeout(5)
            sock.connect((STACK_ADDR, 8000))
            sock.sendall(b"again\n")
            assert sock.recv(100) == b"niaga\n"
    finally:
        s.stop()


def test_a_configuration_error_found_by_a_process_is_not_restarted(fresh_ns):
    """A setting only the TCP worker can judge (a user service that cannot be imported): it exits 78,
    its wrapper passes 78 on without a restart, and honcho stops with the message once."""
    s = Stack(fresh_ns, env={"USTACK_SERVICES": "tcp/9000=nonexistent_module_q:Svc"})
    rc = s.proc.wait(timeout=30)
    s.stop()
    log = "\n".join(s.lines())
    assert rc == 78, log
    assert log.count("cannot import 'nonexistent_module_q'") == 1, log
    assert "process_died" not in log and "Traceback" not in log
    assert fresh_ns._pids() == []


def test_ctrl_c_stops_every_process_within_seconds(fresh_ns):
    ns = fresh_ns
    s = Stack(ns)
    s.wait_ready()
    took = s.stop(signal.SIGINT)
    assert took < 8, f"stopping took {took:.1f} s"
    assert ns._pids() == []
    lines = s.lines()
    for name in ("ingress.1", "egress.1", "icmp.1", "udp.1", "tcp.1"):
        assert f"{name} stopped (rc=0)" in "\n".join(lines), name


def test_payload_is_logged_only_when_asked_for(fresh_ns):
    ns = fresh_ns
    s = Stack(ns, env={"LOG_LEVEL": "debug", "LOG_PAYLOAD": "1"})
    try:
        s.wait_ready()
        udp = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.settimeout(3)
        with udp:
            udp.sendto(b"show me", (STACK_ADDR, 7))
            assert udp.recv(10) == b"show me"
        s.wait_for(lambda recs: any(r["event"] == "udp_in" and r.get("payload") == b"show me".hex() for r in recs),
                   5, "payload in udp_in")
    finally:
        s.stop()
