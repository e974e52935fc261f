"""Keep one pipeline process running: ``python -m pipeline.respawn CMD ARGS...``.

honcho stops the whole stack when any one process exits, so each Procfile
line runs its process under this wrapper: a crashed process is restarted
under the same honcho name (its environment is inherited) with exponential
backoff, and the rest of the stack stays up. The wrapper itself exits only
when told to stop (SIGTERM or SIGINT, which it passes on to the child) or
when the child exits 0, which a pipeline process does only when it was asked
to stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pipeline import config, log

BACKOFF_FIRST = 0.1  # seconds before the first restart
BACKOFF_MAX = 5.0
HEALTHY_AFTER = 30.0  # a child that ran this long starts again from the first backoff


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m pipeline.respawn COMMAND [ARGS...]", file=sys.stderr)
        return 2
    name = config.env_str("HONCHO_PROCESS_NAME", "") or os.path.basename(argv[0])
    logger = log.setup(name).bind(wrapper="respawn")
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
        child = subprocess.Popen(argv)
        while True:
            try:
                rc = child.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
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


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
