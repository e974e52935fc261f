"""The engine of scripts/profile: load the stack and sample each process with py-spy.

Not a test (pytest collects nothing here): it lives beside the integration
harness because it uses the same namespaces and the same way of starting the
stack.
"""

from __future__ import annotations

import collections
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time

from tests.integration.netns import ROOT, STACK_ADDR, Namespace, Stack, process_pid

PROCESSES = {"ingress.1": "pipeline.ingress", "egress.1": "pipeline.egress", "tcp.1": "workers.tcp",
             "udp.1": "workers.udp"}


def load_udp(ns: Namespace, stop: threading.Event) -> None:
    sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.05)
    sock.connect((STACK_ADDR, 7))
    payload = b"x" * 64
    while not stop.is_set():
        for _ in range(32):
            sock.send(payload)
        for _ in range(32):
            try:
                sock.recv(2048)
            except OSError:
                break


def load_bulk_in(ns: Namespace, stop: threading.Event) -> None:
    block = b"\xa5" * (1 << 20)
    while not stop.is_set():
        with ns.socket() as sock:
            sock.connect((STACK_ADDR, 9))
            for _ in range(200):
                if stop.is_set():
                    break
                sock.sendall(block)


def load_bulk_out(ns: Namespace, stop: threading.Event) -> None:
    while not stop.is_set():
        with ns.socket() as sock:
            sock.connect((STACK_ADDR, 19))
            for _ in range(2000):
                if stop.is_set() or not sock.recv(1 << 20):
                    break


def load_connect(ns: Namespace, stop: threading.Event) -> None:
    def one() -> None:
        while not stop.is_set():
            with ns.socket() as sock:
                sock.settimeout(5)
                sock.connect((STACK_ADDR, 8000))
                sock.sendall(b"profile\n")
                sock.recv(100)

    workers = [threading.Thread(target=one, daemon=True) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


LOADS = {"udp": load_udp, "bulk-in": load_bulk_in, "bulk-out": load_bulk_out, "connect": load_connect}


def self_time(raw: str) -> collections.Counter[str]:
    """Collapsed stacks ("a;b;c N") to samples per innermost frame."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[stack.split(";")[-1]] += int(n)
    return counts


def main(argv: list[str]) -> int:
    kind = argv[0] if argv else "bulk-out"
    seconds = float(argv[1]) if len(argv) > 1 else 5.0
    if kind not in LOADS:
        print(f"usage: scripts/profile [{'|'.join(LOADS)}] [seconds]", file=sys.stderr)
        return 2
    ns = Namespace("usprof")
    stack = None
    stop = threading.Event()
    try:
        stack = Stack(ns)
        stack.wait_ready()
        loader = threading.Thread(target=LOADS[kind], args=(ns, stop), daemon=True)
        loader.start()
        time.sleep(1.0)
        out = pathlib.Path(tempfile.mkdtemp(prefix="usprof-"))
        spies = {}
        for name, module in PROCESSES.items():
            pid = process_pid(ns, name, module)
            spies[name] = subprocess.Popen([str(ROOT / ".venv/bin/py-spy"), "record", "--nonblocking", "-r", "200",
                                            "-d", str(max(1, round(seconds))), "-f", "raw", "-o", str(out / f"{name}.txt"),
                                            "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for name, spy in spies.items():
            err = spy.communicate()[1].decode(errors="replace")
            if spy.returncode != 0:
                print(f"py-spy on {name} failed: {err.strip()[-300:]}", file=sys.stderr)
        stop.set()
        loader.join(timeout=10)
        print(f"# py-spy self time under '{kind}' load, {seconds:.0f} s, 200 samples/s")
        for name in PROCESSES:
            path = out / f"{name}.txt"
            counts = self_time(path.read_text()) if path.exists() else collections.Counter()
            total = sum(counts.values()) or 1
            print(f"\n## {name}  ({total} samples)")
            for frame, n in counts.most_common(12):
                print(f"{100 * n / total:5.1f}%  {frame}")
    finally:
        stop.set()
        if stack is not None:
            stack.stop()
        ns.delete()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
