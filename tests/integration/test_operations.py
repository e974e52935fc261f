"""Operating the stack the way people do: pipes and Ctrl-C, a second stack, bad settings,
no privileges, stale run directories (issue 12, items 1-5)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from tests.integration.netns import RUN_DIR_BASE, ROOT, STACK_ADDR, Stack

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _ping_ok(ns) -> bool:
    return b" 0% packet loss" in ns.run("ping", "-c", "2", "-i", "0.2", "-W", "2", STACK_ADDR, check=False).stdout


def _udp_echo_ok(ns) -> bool:
    with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(3)
        udp.sendto(b"still here", (STACK_ADDR, 7))
        return udp.recv(100) == b"still here"


def _processes_in_netns(inode: int) -> list[int]:
    """Every process whose network namespace is ``inode`` (it may already be unnamed)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("reader", ["head -n 3 >/dev/null", "cat >/dev/null"])
def test_piped_run_then_ctrl_c_leaves_no_process_and_no_namespace(reader):
    """`scripts/run | head` (the reader exits by itself) and `scripts/run | cat` (Ctrl-C kills the
    reader too): honcho dies of a broken pipe, and still every process and the namespace go."""
    name = f"usrun-{uuid.uuid4().hex[:8]}"
    run = subprocess.Popen(["bash", "-c", f"scripts/run --no-prefix | {reader}"], cwd=ROOT,
                           env=dict(os.environ, USTACK_NETNS=name), start_new_session=True,
                           stderr=subprocess.PIPE, text=True)
    inode = None
    try:
        deadline = time.monotonic() + 60  # scripts/install runs first
        while inode is None and time.monotonic() < deadline:
            try:
                inode = os.stat(f"/run/netns/{name}").st_ino
            except FileNotFoundError:
                time.sleep(0.1)
        assert inode is not None, "scripts/run never made its namespace"
        # Let the stack come up (workers announce themselves), then Ctrl-C the whole pipeline.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(_processes_in_netns(inode)) < 5:
            time.sleep(0.1)
        time.sleep(2)
        os.killpg(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while _processes_in_netns(inode) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_in_netns(inode) == [], err
        assert name not in _netns_names(), err
        assert "Traceback" not in err and "Error" not in err, err  # a reader gone or Ctrl-C is no error
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        if inode is not None:
            for pid in _processes_in_netns(inode):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_plain_honcho_whose_reader_exits_stops_every_process(fresh_ns):
    ns = fresh_ns
    env = dict(os.environ, USTACK_RUN_DIR=f"{RUN_DIR_BASE}/{ns.name}", PATH=f"{ROOT}/.venv/bin:{os.environ['PATH']}")
    pipeline = subprocess.Popen(["ip", "netns", "exec", ns.name, "bash", "-c", "honcho start | head -n 1"],
                                cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        pipeline.wait(timeout=30)  # honcho exits once its processes are gone
    finally:
        if pipeline.poll() is None:
            os.killpg(pipeline.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while ns._pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ns._pids() == []


def test_second_stack_is_refused_and_the_first_keeps_answering(fresh_ns):
    ns = fresh_ns
    first = Stack(ns)
    try:
        first.wait_ready()
        second = Stack(ns)
        rc = second.proc.wait(timeout=15)
        second.stop()
        assert rc == 78
        log = "\n".join(second.lines())
        assert log.count("another ustack already runs on this device in this network namespace") == 1, log
        assert f"supervisor pid {first.proc.pid} " in log  # honcho of the first stack
        assert not any(r["event"] == "worker_started" for r in second.records())
        assert _ping_ok(ns) and _udp_echo_ok(ns)
        with ns.socket() as sock:
            sock.settimeout(5)
            sock.connect((STACK_ADDR, 8000))
            sock.sendall(b"first\n")
            assert sock.recv(100) == b"tsrif\n"
    finally:
        first.stop()


@pytest.mark.parametrize("name,value,message", [
    ("USTACK_MTU", "abc", "USTACK_MTU='abc': expected an integer"),
    ("USTACK_ADDR", "10.0.0.300", "USTACK_ADDR: bad address configuration"),
    ("TCP_CONGESTION", "bbr", "TCP_CONGESTION='bbr': expected newreno or cubic"),
    ("TCP_SYN_QUEUE", "0", "TCP_SYN_QUEUE=0: expected 1..1048576"),
    ("LOG_LEVEL", "loud", "LOG_LEVEL='loud': expected debug or info"),
])
def test_a_bad_setting_stops_honcho_at_once_with_the_message(fresh_ns, name, value, message):
    ns = fresh_ns
    start = time.monotonic()
    stack = Stack(ns, env={name: value})
    rc = stack.proc.wait(timeout=15)
    took = time.monotonic() - start
    stack.stop()
    log = "\n".join(stack.lines())
    assert rc == 78, log
    assert took < 10, f"took {took:.1f} s"
    assert log.count(f"configuration error: {message}") == 1, log  # one process of the stack says it
    assert "process_died" not in log and "Traceback" not in log
    assert ns._pids() == []


def test_scripts_run_checks_the_settings_before_it_starts_anything():
    name = f"usrun-{uuid.uuid4().hex[:8]}"
    bad = {"TCP_CONGESTION": "bbr", "USTACK_MTU": "abc", "USTACK_TUN": "far-too-long-a-name"}
    done = subprocess.run(["scripts/run"], cwd=ROOT, env=dict(os.environ, USTACK_NETNS=name, **bad),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 78
    # Every bad setting in one run, each once.
    assert done.stderr.count("TCP_CONGESTION='bbr': expected newreno or cubic") == 1, done.stderr
    assert done.stderr.count("USTACK_MTU='abc'") == 1, done.stderr
    assert done.stderr.count("USTACK_TUN 'far-too-long-a-name'") == 1, done.stderr
    assert "From another shell" not in done.stderr
    assert name not in _netns_names()


def test_scripts_run_refuses_an_existing_namespace_by_its_exact_name(fresh_ns):
    # A namespace whose name merely starts with ours is someone else's: not a reason to refuse.
    prefix = fresh_ns.name[:-2]
    check = subprocess.run(["bash", "-c", "ip netns list | awk '{print $1}' | grep -qxF -- \"$1\"", "-", prefix])
    assert check.returncode == 1
    done = subprocess.run(["scripts/run"], cwd=ROOT, env=dict(os.environ, USTACK_NETNS=fresh_ns.name),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"network namespace {fresh_ns.name} already exists" in done.stderr


def test_without_root_the_stack_says_it_needs_root(fresh_ns, nobody_dir):
    run_dir = nobody_dir
    # The venv's interpreter may live in root's home (pyenv): run the system's, same version, on the
    # venv's packages, as an unprivileged user would.
    python = "/usr/bin/python3"
    site = ROOT / ".venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    env = dict(os.environ, USTACK_RUN_DIR=run_dir, HONCHO_PROCESS_NAME="ingress.1", PYTHONUNBUFFERED="1",
               PYTHONPATH=f"{ROOT}:{site}")
    start = time.monotonic()
    done = fresh_ns.run(*NOBODY, python, "-m", "pipeline.respawn", python, "-m", "pipeline.ingress",
                        cwd=ROOT, env=env, check=False, timeout=30)
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 77, out  # EX_NOPERM: passed on by the wrapper, not restarted
    assert time.monotonic() - start < 10
    assert "the stack needs root (CAP_NET_ADMIN)" in out
    assert "USTACK_OFFLOAD" not in out and "process_died" not in out
    # The default run directory is root's: the wrapper says the same instead of a traceback.
    env.pop("USTACK_RUN_DIR")
    done = fresh_ns.run(*NOBODY, python, "-m", "pipeline.respawn", python, "-m", "pipeline.ingress",
                        cwd=ROOT, env=env, check=False, timeout=30)
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 77 and "needs root (CAP_NET_ADMIN)" in out and "Traceback" not in out, out


@pytest.fixture
def nobody_dir():
    """A run directory the unprivileged user may use (pytest's tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="ustack-nobody-")
    os.chown(path, 65534, 65534)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_scripts_run_as_non_root_says_run_as_root():
    done = subprocess.run([*NOBODY, "scripts/run"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 77
    assert "run as root" in done.stderr and "Traceback" not in done.stderr


def test_stale_run_dir_is_taken_over_and_removed_on_a_clean_stop(fresh_ns):
    ns = fresh_ns
    run_dir = f"{RUN_DIR_BASE}/{ns.name}"
    os.makedirs(run_dir, mode=0o700)
    with open(f"{run_dir}/stack", "w") as f:  # left by a killed stack: nobody holds the lock
        f.write('{"id": "1234:5678", "supervisor": 1234, "command": "honcho start"}')
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(f"{run_dir}/ingress.sock")
    stale.close()
    stack = Stack(ns, run_dir=run_dir)
    try:
        stack.wait_ready()
        assert any(r["event"] == "run_dir_taken_over" for r in stack.records())
        assert _ping_ok(ns)
    finally:
        stack.stop()
    assert not os.path.exists(run_dir)
