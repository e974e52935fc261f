"""What each process of the default stack imports, and what it leaves out (issue 21, GUIDE "What a
process holds"): asyncio, OpenSSL, CURVE's authenticator, HTTP, iperf3's server and attach mode's
relays stay out of a process that does not use them. Each probe runs in a fresh interpreter."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROCESSES = ["pipeline.ingress", "pipeline.egress", "workers.icmp.__main__", "workers.udp.__main__",
             "workers.tcp.__main__"]
LEFT_OUT = ["asyncio", "ssl", "_hashlib", "zmq.auth", "h11", "dns", "workers.services.iperf3",
            "workers.services.httpd", "workers.attach.tcp", "workers.attach.udp", "workers.attach.icmp",
            "workers.attach.inbound", "workers.attach.dns"]


def _loaded(code: str) -> set[str]:
    """The modules a fresh interpreter holds after ``code``."""
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize("module", PROCESSES)
def test_a_process_imports_none_of_what_it_does_not_use(module):
    loaded = _loaded(f"import {module}")
    assert "zmq" in loaded and "structlog" in loaded  # what every process does use
    assert sorted(loaded & set(LEFT_OUT)) == []


def test_hashing_a_source_for_the_build_check_loads_no_openssl():
    """When a source's stamp moved (a checkout after scripts/install) every process hashes the sources."""
    loaded = _loaded("""
import hashlib
from pipeline import compiled
path = compiled.source_path(compiled.MODULES[0])
expected = hashlib.sha256(open(path, "rb").read()).hexdigest()
del sys.modules["hashlib"], sys.modules["_hashlib"]
assert compiled._digest(path) == expected
""")
    assert "_hashlib" not in loaded


def test_the_probe_sees_what_is_imported():
    """The same probe catches asyncio when something imports it (zmq.auth's authenticator thread does)."""
    assert {"asyncio", "zmq.auth"} <= _loaded("import pipeline.log; import zmq.auth.thread")


def test_structlogs_async_methods_still_work_on_the_real_asyncio():
    """pipeline.log imports structlog with a stand-in for asyncio; an ``a*`` method imports the real one."""
    loaded = _loaded("""
from pipeline import log
assert "asyncio" not in sys.modules
logger = log.setup("t.1")
logger.info("plain")
import asyncio
asyncio.run(logger.ainfo("awaited"))
import structlog._native
assert structlog._native.asyncio.get_running_loop is asyncio.get_running_loop
""")
    assert "asyncio" in loaded
