"""The respawn wrapper's loop, both of them: the C one (pipeline/respawn.c, built here with gcc)
and the Python one it stands in for (pipeline.respawn.supervise), on the same cases.

Each case runs the loop as a process of its own around a small shell child and reads what it
logged; the stack-level behaviour (honcho names, every pipeline process SIGKILLed and restarted)
is in tests/integration/test_logs_and_lifecycle.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipeline import config, respawn, stacklock

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCE = ROOT / "pipeline" / "respawn.c"
RUN_PY = ("import sys; from pipeline import log, respawn; name, sup, started, *argv = sys.argv[1:]; "
          "sys.exit(respawn.supervise(argv[1:], log.setup(name).bind(wrapper='respawn'), int(sup), int(started)))")


@pytest.fixture(scope="module")
def c_loop(tmp_path_factory) -> str:
    if shutil.which("gcc") is None:
        pytest.skip("no gcc: the stack runs the Python loop")
    out = tmp_path_factory.mktemp("respawn") / "respawn"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(SOURCE)], check=True)
    return str(out)


@pytest.fixture(params=["c", "python"])
def loop(request):
    """argv for a loop named ``name`` watching ``supervisor`` (pid, start time) around ``command``."""
    def argv(command: list[str], supervisor: int = 1, started: int = -1, name: str = "t.1",
             lock_fd: int = -1, run_dir: str = "/nonexistent", log_format: str = "json") -> list[str]:
        if request.param == "c":
            return [request.getfixturevalue("c_loop"), name, str(supervisor), str(started), str(lock_fd), run_dir,
                    log_format, "--", *command]
        return [sys.executable, "-c", RUN_PY, name, str(supervisor), str(started), "--", *command]
    argv.kind = request.param
    return argv


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT, env=_env(), **kw)


def _records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _counting(path: pathlib.Path, then: str) -> list[str]:
    """A child that appends a line to ``path``, then runs ``then`` (sh) with $n, the run's number."""
    return ["sh", "-c", f'echo run >> {path}; n=$(wc -l < {path}); {then}']


def test_a_crash_is_restarted_with_backoff_until_the_child_exits_0(loop, tmp_path):
    runs = tmp_path / "runs"
    done = _run(loop(_counting(runs, '[ "$n" -ge 3 ] && exit 0; exit 3')))
    assert done.returncode == 0, done.stderr
    died = [r for r in _records(done.stdout) if r["event"] == "process_died"]
    assert [(r["exit_code"], r["restarts"], r["restart_in"]) for r in died] == [(3, 1, 0.1), (3, 2, 0.2)]
    assert all(r["proc"] == "t.1" and r["wrapper"] == "respawn" and r["level"] == "warning" for r in died)
    assert died[0]["command"].startswith("sh -c echo run") and isinstance(died[0]["ran_seconds"], float)
    assert runs.read_text().count("run") == 3


def test_a_sigkilled_child_is_restarted(loop, tmp_path):
    runs = tmp_path / "runs"
    done = _run(loop(_counting(runs, '[ "$n" -ge 2 ] && exit 0; kill -9 $$')))
    assert done.returncode == 0, done.stderr
    assert [r["exit_code"] for r in _records(done.stdout) if r["event"] == "process_died"] == [-signal.SIGKILL]
    assert runs.read_text().count("run") == 2


@pytest.mark.parametrize("status", [config.EX_CONFIG, config.EX_NOPERM])
def test_a_configuration_error_or_missing_privileges_is_passed_on_never_restarted(loop, tmp_path, status):
    runs = tmp_path / "runs"
    done = _run(loop(_counting(runs, f"exit {status}")))
    assert done.returncode == status
    assert runs.read_text().count("run") == 1 and "process_died" not in done.stdout


def test_a_command_that_cannot_run_ends_the_loop_unrestarted(loop, tmp_path):
    done = _run(loop([str(tmp_path / "no-such-command")]))
    assert done.returncode == 1 and "process_died" not in done.stdout
    assert "no-such-command" in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("child_exit", ["exit 0", "default"])
def test_sigterm_and_sigint_go_to_the_child_and_end_the_loop(loop, tmp_path, sig, child_exit):
    got = tmp_path / "got"
    name = signal.Signals(sig).name[3:]
    # The child says it is ready, then either handles the signal (exit 0) or dies of it.
    trap = f'trap "echo {name} > {got}; exit 0" {name}; ' if child_exit == "exit 0" else ""
    ready = tmp_path / "ready"
    proc = subprocess.Popen(loop(["sh", "-c", f"{trap}touch {ready}; while :; do sleep 0.05; done"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
    try:
        _wait_for(ready.exists)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "process_died" not in out
    if child_exit == "exit 0":
        assert got.read_text().strip() == name


def test_the_loop_stops_the_child_when_the_supervisor_is_gone(loop, tmp_path):
    supervisor = subprocess.Popen(["sleep", "60"])
    pid_file = tmp_path / "child"
    proc = subprocess.Popen(loop(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"], supervisor.pid,
                                 stacklock.start_time(supervisor.pid)),
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
    try:
        _wait_for(lambda: pid_file.exists() and pid_file.read_text().strip())
        child = int(pid_file.read_text())
        supervisor.kill()
        supervisor.wait()
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        supervisor.kill()
    assert proc.returncode == 0
    gone = [r for r in _records(out) if r["event"] == "supervisor_gone"]
    assert [(r["supervisor"], r["why"]) for r in gone] == [(supervisor.pid, "exited")]
    assert not _alive(child)


def test_the_loop_stops_when_the_supervisors_output_has_no_reader(loop, tmp_path):
    read_end, write_end = os.pipe()
    supervisor = subprocess.Popen(["sleep", "60"], stdout=write_end)
    os.close(write_end)
    proc = subprocess.Popen(loop(["sleep", "60"], supervisor.pid, stacklock.start_time(supervisor.pid)),
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
    try:
        time.sleep(0.2)
        os.close(read_end)  # honcho's reader is gone (`honcho start | head` after head exits)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        supervisor.kill()
        supervisor.wait()
    assert proc.returncode == 0
    assert [r["why"] for r in _records(out) if r["event"] == "supervisor_gone"] == ["output_pipe_closed"]


def test_the_child_dies_with_the_loop(loop, tmp_path):
    pid_file = tmp_path / "child"
    proc = subprocess.Popen(loop(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"]), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL)
    try:
        _wait_for(lambda: pid_file.exists() and pid_file.read_text().strip())
        child = int(pid_file.read_text())
        proc.kill()  # SIGKILL: nothing of the loop runs; the kernel tells the child (PR_SET_PDEATHSIG)
        proc.wait()
        _wait_for(lambda: not _alive(child))
    finally:
        proc.kill()


def _c_loop_leaves(c_loop: str, lock: stacklock.StackLock) -> None:
    """Run the C loop around `true` holding ``lock`` (as pipeline.respawn hands it over), and drop ours."""
    fd = lock.fileno()
    done = subprocess.run([c_loop, "t.1", "1", "-1", str(fd), lock.run_dir, "json", "--", "true"], pass_fds=[fd],
                          timeout=30)
    assert done.returncode == 0
    os.close(fd)
    lock._fd = -1


def test_the_c_loop_leaves_the_stack_and_the_last_one_out_removes_the_run_dir(c_loop, tmp_path):
    run_dir = str(tmp_path / "run")
    first, second = stacklock.StackLock(run_dir, os.getpid()), stacklock.StackLock(run_dir, os.getpid())
    assert (first.join(), second.join()) == ("created", "joined")
    _c_loop_leaves(c_loop, first)
    assert os.path.isfile(os.path.join(run_dir, stacklock.STACK_FILE))  # the second still runs
    assert second.leave() is True and not os.path.exists(run_dir)  # and is the last out
    # Last out, it removes what a stack leaves there, nothing else (USTACK_RUN_DIR may hold more).
    last = stacklock.StackLock(run_dir, os.getpid())
    assert last.join() == "created"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.path.join(run_dir, "ingress.sock"))
    sock.close()
    with open(os.path.join(run_dir, "someone-elses"), "w"):
        pass
    _c_loop_leaves(c_loop, last)
    assert os.listdir(run_dir) == ["someone-elses"]
    os.unlink(os.path.join(run_dir, "someone-elses"))
    alone = stacklock.StackLock(run_dir, os.getpid())
    assert alone.join() == "created"
    _c_loop_leaves(c_loop, alone)
    assert not os.path.exists(run_dir)


def test_the_c_loop_writes_the_console_format_when_asked(c_loop, tmp_path):
    runs = tmp_path / "runs"
    done = _run([c_loop, "t.1", "1", "-1", "-1", "/x", "console", "--",
                 *_counting(runs, '[ "$n" -ge 2 ] && exit 0; exit 5')])
    line = done.stdout.strip()
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \[warning  \] process_died {19}exit_code=5 ", line), line
    assert "proc='t.1'" in line and "restart_in=0.1" in line and "wrapper=respawn" in line


def test_the_c_loop_keeps_the_python_loops_numbers():
    defines = dict(re.findall(r"^#define (\w+) (\S+)", SOURCE.read_text(), re.M))
    for name in ("BACKOFF_FIRST", "BACKOFF_MAX", "HEALTHY_AFTER", "WATCH_INTERVAL", "STOP_GRACE"):
        assert float(defines[name]) == getattr(respawn, name), name
    assert (int(defines["EX_NOPERM"]), int(defines["EX_CONFIG"])) == (config.EX_NOPERM, config.EX_CONFIG)
    assert defines["STACK_FILE"] == f'"{stacklock.STACK_FILE}"'


def test_the_c_loop_is_used_only_when_built_from_this_source(tmp_path, monkeypatch):
    loop = tmp_path / "respawn"
    loop.write_text("#!/bin/sh\n")
    loop.chmod(0o755)
    monkeypatch.setattr(respawn, "LOOP", str(loop))
    monkeypatch.delenv("USTACK_PURE", raising=False)
    assert respawn.compiled_loop() is None  # no record of its source
    (tmp_path / "respawn.sha256").write_text("0" * 64 + "\n")
    assert respawn.compiled_loop() is None  # built from another source
    import hashlib
    (tmp_path / "respawn.sha256").write_text(hashlib.sha256(SOURCE.read_bytes()).hexdigest() + "\n")
    assert respawn.compiled_loop() == str(loop)
    monkeypatch.setenv("USTACK_PURE", "1")
    assert respawn.compiled_loop() is None  # interpreted, all of it


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{condition} never held"
        time.sleep(0.02)
