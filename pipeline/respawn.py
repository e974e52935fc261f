"""Keep one pipeline process running: ``python -m pipeline.respawn CMD ARGS...``.

honcho stops the whole stack when any one process exits, so each Procfile
line runs its process under this wrapper: a crashed process is restarted
under the same honcho name (its environment is inherited) with exponential
backoff, and the rest of the stack stays up. The wrapper itself exits when
told to stop (SIGTERM or SIGINT, which it passes on to the child), when the
child exits 0 (a pipeline process does that only when asked to stop), and
when restarting cannot help: a configuration error (EX_CONFIG) or missing
privileges (EX_NOPERM) are passed on as its own exit status, so honcho (or
systemd, with ``RestartPreventExitStatus=``) stops with the message on
screen instead of restarting forever.

Before it starts anything the wrapper checks the whole configuration (one
process of the stack reports what is wrong) and joins the stack that owns the run directory (``pipeline.stacklock``): a second
stack on the same device in the same namespace is refused. The stack dies
with its supervisor: the child gets SIGTERM when the wrapper dies
(PR_SET_PDEATHSIG), and the wrapper stops when honcho is gone or can no
longer write its output (``honcho start | jq`` after jq exits).

Two steps, for memory: this module does the checks and the join, then, when
scripts/install could build it, execs the loop in C (``pipeline/respawn.c``,
``build/respawn``: ~0.1 MB a process, where this interpreter holds ~12 MB
for as long as the stack runs), handing it the open run directory that holds
the stack lock. Without it (no compiler, a build of another source, or
``USTACK_PURE=1``) :func:`supervise` runs the same loop here.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

from pipeline import config, log, stacklock, tun

BACKOFF_FIRST = 0.1  # seconds before the first restart
BACKOFF_MAX = 5.0
HEALTHY_AFTER = 30.0  # a child that ran this long starts again from the first backoff
WATCH_INTERVAL = 0.5  # seconds between looks at the supervisor
STOP_GRACE = 5.0  # seconds a child gets to stop after SIGTERM before SIGKILL
REPORT_HOLD = 1.0  # seconds the process that reports a configuration error keeps others quiet
# Exit statuses a restart cannot cure (sysexits.h).
FINAL = (config.EX_CONFIG, config.EX_NOPERM)
_PR_SET_PDEATHSIG = 1
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOP_SOURCE = os.path.join(ROOT, "pipeline", "respawn.c")
LOOP = os.path.join(ROOT, "build", "respawn")  # built by scripts/install, with LOOP + ".sha256"


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux)."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def report_once(name: str, supervisor: int, message: str) -> None:
    """Print ``message`` from one process of the stack only: every process finds the same
    bad setting, and one clear line says it. The first to bind a token (an abstract Unix
    socket named after the stack, Linux) reports and holds the token a moment, so that
    processes starting a little later see it taken; they exit silently."""
    if sys.platform == "linux":
        token = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            token.bind(b"\0ustack-report-" + stacklock.stack_id(supervisor).encode())
        except OSError:
            return  # another process of this stack has said it
        print(f"{name}: {message}", file=sys.stderr, flush=True)
        time.sleep(REPORT_HOLD)
        token.close()
        return
    print(f"{name}: {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m pipeline.respawn COMMAND [ARGS...]", file=sys.stderr)
        return 2
    name = config.env_str("HONCHO_PROCESS_NAME", "") or os.path.basename(argv[0])
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 1
    supervisor = stacklock.supervisor_pid()
    errors = config.validate_all()
    if errors:
        report_once(name, supervisor, "configuration error: " + "; ".join(errors))
        return config.EX_CONFIG
    logger = log.setup(name).bind(wrapper="respawn")
    supervisor_started = stacklock.start_time(supervisor)
    cfg = config.load()
    lock = stacklock.StackLock(cfg.run_dir, supervisor, device=cfg.tun_name, attach=cfg.attached)
    try:
        joined = lock.join()
    except stacklock.StackBusy as exc:
        report_once(name, supervisor, str(exc))
        return config.EX_CONFIG
    except PermissionError as exc:
        print(f"{name}: cannot create the run directory {lock.run_dir}: {exc.strerror}: "
              f"{tun.NEEDS_ROOT}", file=sys.stderr, flush=True)
        return config.EX_NOPERM
    if joined == "took_over":
        logger.warning("run_dir_taken_over", run_dir=lock.run_dir, reason="stale: no process held it")
    loop = compiled_loop()
    if loop is not None:
        # The lock is the open run directory: it passes to the loop, which leaves it on its way out.
        fd = lock.fileno()
        os.set_inheritable(fd, True)
        sys.stdout.flush()
        os.execv(loop, [loop, name, str(supervisor), str(-1 if supervisor_started is None else supervisor_started), str(fd),
                        os.path.abspath(lock.run_dir), config.log_settings().format, "--", *argv])
    try:
        return supervise(argv, logger, supervisor, supervisor_started)
    finally:
        lock.leave()


def compiled_loop() -> str | None:
    """build/respawn, if scripts/install built it from this pipeline/respawn.c and USTACK_PURE is not set."""
    if os.environ.get("USTACK_PURE", "") not in ("", "0"):
        return None
    import hashlib  # here: what imports this module for die_with_parent needs no OpenSSL

    try:
        with open(LOOP + ".sha256") as f:
            built_from = f.read().split()[0]
        with open(LOOP_SOURCE, "rb") as f:
            source = hashlib.sha256(f.read()).hexdigest()
    except (OSError, IndexError):
        return None
    return LOOP if built_from == source and os.access(LOOP, os.X_OK) else None


def supervise(argv: list[str], logger, supervisor: int, supervisor_started: int | None) -> int:
    """The loop, in Python: run ``argv`` until it is stopped; the exit status to pass on."""
    stopping = False
    child: subprocess.Popen | None = None

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    backoff = BACKOFF_FIRST
    restarts = 0
    while True:
        started = time.monotonic()
        # The child dies with us, whatever kills us.
        child = subprocess.Popen(argv, preexec_fn=die_with_parent)
        rc = None
        while rc is None:
            try:
                rc = child.wait(WATCH_INTERVAL)
            except subprocess.TimeoutExpired:
                why = None if stopping else stacklock.supervisor_gone(supervisor, supervisor_started)
                if why is not None:
                    logger.warning("supervisor_gone", supervisor=supervisor, why=why)
                    stopping = True
                    rc = _stop_child(child)
        if rc in FINAL:
            return rc
        if stopping or rc == 0:
            return 0 if rc in (0, -signal.SIGTERM, -signal.SIGINT) else rc
        ran = time.monotonic() - started
        if ran >= HEALTHY_AFTER:
            backoff = BACKOFF_FIRST
        restarts += 1
        logger.warning("process_died", exit_code=rc, ran_seconds=round(ran, 3), restart_in=backoff,
                       restarts=restarts, command=" ".join(argv))
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.05)
        if stopping:
            return 0
        backoff = min(backoff * 2, BACKOFF_MAX)


def _stop_child(child: subprocess.Popen) -> int:
    child.terminate()
    try:
        return child.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
