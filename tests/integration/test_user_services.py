"""Services written by users: loaded from a temporary module through USTACK_SERVICES, in the real stack."""

import os
import socket
import textwrap

import pytest

from tests.integration.netns import ROOT, STACK_ADDR
from tests.integration.svc_clients import running_stack

USER_MODULE = textwrap.dedent('''
    from workers.services.tcp import Service

    class Raiser(Service):
        def on_readable(self):
            if b"boom" in self.stream.recv():
                raise RuntimeError("user bug")

    class Numbered:
        # UDP, a class: one instance per worker numbers the datagrams it answers.

        def __init__(self):
            self.count = 0

        def __call__(self, payload):
            self.count += 1
            return b"%d " % self.count + payload
''')


@pytest.fixture(scope="module")
def user_stack(ns, tmp_path_factory):
    mod_dir = tmp_path_factory.mktemp("usersvc")
    (mod_dir / "ustack_user_svc.py").write_text(USER_MODULE)
    env = {"PYTHONPATH": os.pathsep.join([str(mod_dir), str(ROOT / "examples"), str(ROOT)]),
           "USTACK_SERVICES": "tcp/9001=ustack_user_svc:Raiser, udp/9002=ustack_user_svc:Numbered,"
                              "tcp/9003=myservices:Reverse,udp/9003=myservices:reverse"}
    with running_stack(ns, env=env) as s:
        yield s


def _connect(ns, port):
    sock = ns.socket()
    sock.settimeout(5)
    sock.connect((STACK_ADDR, port))
    return sock


def test_the_readme_tutorial_service(ns, user_stack):
    done = ns.run("nc", "-N", "-w", "5", STACK_ADDR, "9003", input=b"hello\nworld\n")
    assert done.stdout == b"olleh\ndlrow\n"
    with ns.socket(type=socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(b"abc\n", (STACK_ADDR, 9003))
        assert sock.recv(100) == b"cba\n"


def test_user_udp_service_answers(ns, user_stack):
    with ns.socket(type=socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for n in (1, 2):
            sock.sendto(b"hi", (STACK_ADDR, 9002))
            assert sock.recv(100) == b"%d hi" % n


def test_raising_service_resets_its_connection_and_the_worker_lives(ns, user_stack):
    with _connect(ns, 9001) as bystander, _connect(ns, 9001) as victim:
        victim.sendall(b"boom")
        with pytest.raises(ConnectionResetError):
            while victim.recv(100):
                pass
        bystander.sendall(b"still fine")  # the other connection of the same service lives on
    user_stack.wait_for(lambda recs: any(r["event"] == "service_error" and "user bug" in r["error"] for r in recs),
                        10, "service_error logged")
    with _connect(ns, 9003) as sock:  # and so does the worker
        sock.sendall(b"ok\n")
        assert sock.recv(10) == b"ko\n"
    starts = [r for r in user_stack.records() if r["event"] == "worker_started" and r["proc"] == "tcp.1"]
    assert len(starts) == 1  # never restarted


@pytest.mark.parametrize("value, message", [
    ("tcp/9000=nonexistent_module_q:Svc", "cannot import 'nonexistent_module_q'"),
    ("tcp/9000:ustack_user_svc", "expected tcp/PORT=module:Name"),
    ("tcp/7=workers.services.tcp:Echo", "already served by the built-in"),
])
def test_bad_value_stops_the_worker_with_status_78(ns, value, message):
    env = {**os.environ, "USTACK_SERVICES": value, "USTACK_RUN_DIR": f"/run/ustack-test/{ns.name}-cfg"}
    done = ns.run("python3", "-m", "workers.tcp", check=False, cwd=ROOT, env=env, timeout=30)
    assert done.returncode == 78, done
    assert message in done.stderr.decode()
