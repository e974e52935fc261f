"""The iperf3 server on 5201 against Debian's unmodified iperf3 client in the stack's namespace."""

import json
import struct
import subprocess

from tests.integration.netns import STACK_ADDR
from tests.integration.svc_clients import exchange, running_stack


def iperf3(ns, *args, timeout=60):
    return ns.run("iperf3", "-c", STACK_ADDR, *args, check=False, timeout=timeout)


def report(done) -> dict:
    assert done.returncode == 0, done.stdout.decode()[-2000:] + done.stderr.decode()
    return json.loads(done.stdout)


def test_normal_json(ns, stack):
    end = report(iperf3(ns, "-t", "2", "-J"))["end"]
    received = end["sum_received"]["bytes"]
    assert received > 0 and end["sum_sent"]["bytes"] >= received
    # The receiver's figure is the one our server reported back (results exchange).
    assert end["streams"][0]["receiver"]["bytes"] == received


def test_reverse_with_block_size(ns, stack):
    end = report(iperf3(ns, "-R", "-t", "2", "-l", "16K", "-J"))["end"]
    assert end["sum_received"]["bytes"] > 0
    sender = end["streams"][0]["sender"]
    assert sender["sender"] is False  # the remote end (we) sent: its figures are the ones we reported
    assert sender["bytes"] >= end["sum_received"]["bytes"]
    assert sender["retransmits"] >= 0 and end["sum_sent"]["retransmits"] >= 0  # our TCP's own count


def test_plain_text_output_and_udp_refused(ns, stack):
    done = iperf3(ns, "-t", "1")
    assert done.returncode == 0 and b"receiver" in done.stdout and b"iperf Done." in done.stdout
    refused = iperf3(ns, "-u", "-t", "1")
    assert refused.returncode != 0 and b"not implemented" in refused.stderr + refused.stdout


def test_hostile_control_input_is_refused_and_the_server_lives(ns, stack):
    def session(payload: bytes) -> bytes:
        return exchange(ns, 5201, payload)

    cookie = b"x" * 36 + b"\0"
    assert session(cookie + struct.pack("!I", 1 << 30)) == b"\x09" + struct.pack("!bii", -2, 114, 0)
    assert session(cookie + struct.pack("!I", 3) + b"{{{") == b"\x09" + struct.pack("!bii", -2, 114, 0)
    assert session(b"\x07" * 37)[:1] == struct.pack("!b", -2)
    report(iperf3(ns, "-t", "1", "-J"))  # a real client right after


def test_parallel_streams_over_four_workers(fresh_ns):
    with running_stack(fresh_ns, "-c", "tcp=4", roles={"tcp": 4}) as four_workers:
        for args in (("-P", "4"), ("-P", "4", "-R")):
            end = report(iperf3(fresh_ns, "-t", "2", "-J", *args))["end"]
            assert len(end["streams"]) == 4
            assert all(s["receiver"]["bytes"] > 0 for s in end["streams"])
    tests = [r for r in four_workers.records() if r["event"] == "iperf3_test"]
    assert [t["streams"] for t in tests] == [4, 4]
    # Steering: every connection to 5201 of this client landed on the worker of its test. Each
    # leaves its one record, tcp_closed, by the time the stack has stopped (control and 4 streams
    # per test).
    closed = [r for r in four_workers.records() if r["event"] == "tcp_closed" and r["lport"] == 5201]
    assert len(closed) == 10 and {r["proc"] for r in closed} == {tests[0]["proc"]}


def test_second_client_during_a_test_is_told_the_server_is_busy(ns, stack):
    # The stack logs at debug: tcp_established shows the first test's connections while they last.
    established_before = sum(r["event"] == "tcp_established" and r["lport"] == 5201 for r in stack.records()) + 1
    # Long enough to be surely running when the second asks, however late the records are read
    # (a 3 s test could end first on a loaded machine, and the second then rightly got the server).
    first = ns.popen("iperf3", "-c", STACK_ADDR, "-t", "8", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stack.wait_for(lambda recs: sum(r["event"] == "tcp_established" and r["lport"] == 5201 for r in recs)
                       > established_before, 10, "the first test's connections")
        second = iperf3(ns, "-t", "1")
        assert second.returncode != 0 and b"busy" in second.stdout + second.stderr
    finally:
        out, err = first.communicate(timeout=30)
    assert first.returncode == 0, out + err
