"""One benchmark run: the namespaces, the stack and the reference servers it starts, and what it found.

``Run.start`` makes three namespaces: the stack's (``honcho start``, serving
a directory made here over HTTP), the minimal responder's, and the kernel's
(the servers of ``references``, ``python -m http.server`` and ``iperf3 -s``
on 127.0.0.1). Each measurement is a function of the run that adds its
figures to ``raw``; ``Run.measure`` records a failed one in ``errors`` and
goes on. ``Run.close`` removes every namespace, process and file it made.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from pipeline.respawn import die_with_parent
from tests.integration.netns import Namespace, Stack

from .common import (LOOPBACK, MB, NS_PREFIX, ROOT, RUN_DIR_BASE, BenchError, Settings, allow_many_connections,
                     first_line, say)
from .processes import stack_processes
from .references import BENCH


class Run:
    """The run's namespaces, stack and reference processes, and its figures (``raw``), errors and warnings."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.namespaces: list[Namespace] = []
        self.stack: Stack | None = None
        self.children: list[subprocess.Popen] = []
        self.www: str | None = None
        self.idle_socks: list[socket.socket] = []  # held open until the stack has stopped
        self.raw: dict = {}
        self.errors: list[str] = []
        self.warnings: list[str] = []

    # setup ------------------------------------------------------------------
    def namespace(self) -> Namespace:
        ns = Namespace(NS_PREFIX)
        self.namespaces.append(ns)
        allow_many_connections(ns)
        return ns

    def start(self) -> None:
        say("starting: the stack (honcho start), the minimal responder, the kernel servers")
        self.www = self._www()
        self.stack_ns = self.namespace()
        self.stack = Stack(self.stack_ns, run_dir=f"{RUN_DIR_BASE}/{self.stack_ns.name}",
                           env={"USTACK_HTTP_ROOT": self.www})
        self.min_ns = self.namespace()
        self.minimal = self._child(self.min_ns, "python3", str(ROOT / "scripts" / "minimal_responder.py"))
        self.kern_ns = self.namespace()
        self.kernel = self._child(self.kern_ns, sys.executable, str(BENCH), "--kernel-servers")
        # References for HTTP and iperf3 on the kernel's loopback.
        self._child(self.kern_ns, sys.executable, str(BENCH), "--kernel-http", self.www)
        self.children.append(self.kern_ns.popen("iperf3", "-s", "-B", LOOPBACK,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self._wait_port(self.kern_ns, 5201)
        self.stack.wait_ready(timeout=30)
        self.stack_pids, _ = stack_processes(self.stack_ns)
        if not {"ingress.1", "egress.1", "tcp.1"} <= self.stack_pids.keys():
            raise BenchError(f"stack processes not found: {self.stack_pids}")

    def _www(self) -> str:
        """The files both HTTP servers serve: a small page for ab, the download for curl."""
        www = tempfile.mkdtemp(prefix="ustack-bench-www-")
        with open(os.path.join(www, "index.txt"), "wb") as f:
            f.write(b"ustack benchmark page\n" * 10)
        block = bytes(range(256)) * 4096
        with open(os.path.join(www, "download.bin"), "wb") as f:
            for _ in range(self.s.download_mb * MB // len(block)):
                f.write(block)
            f.write(block[:self.s.download_mb * MB % len(block)])
        return www

    def _wait_port(self, ns: Namespace, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with ns.socket() as sock:
                if sock.connect_ex((LOOPBACK, port)) == 0:
                    return
            time.sleep(0.1)
        raise BenchError(f"reference server on port {port} did not start")

    def _child(self, ns: Namespace, *argv: str) -> subprocess.Popen:
        proc = ns.popen(*argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        preexec_fn=die_with_parent)
        self.children.append(proc)
        line = proc.stdout.readline()
        if "ready" not in line:
            raise BenchError(f"{argv[-1]} did not start: {line}{proc.stdout.read()}")
        return proc

    def close(self) -> None:
        if self.stack is not None:
            with contextlib.suppress(Exception):
                self.stack.stop()
        for proc in self.children:
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(3)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for ns in self.namespaces:
            ns.delete()
        for ns in self.namespaces:
            shutil.rmtree(f"{RUN_DIR_BASE}/{ns.name}", ignore_errors=True)
        if self.www:
            shutil.rmtree(self.www, ignore_errors=True)
        for s in self.idle_socks:  # after the stack: no 10k FIN exchanges to wait for
            s.close()

    # measurements -----------------------------------------------------------
    def measure(self, name: str, fn) -> None:
        """Run one measurement, ``fn(self)``; a failure is recorded, reported, and does not stop the others."""
        try:
            fn(self)
        except (BenchError, OSError, AssertionError, queue.Empty) as exc:
            self.errors.append(f"{name}: {first_line(exc)}")
            say(f"  FAILED {name}: {exc!r}")
