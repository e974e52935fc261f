"""Protocol cores are sans-IO: importing one loads no ZeroMQ, no msgpack, not the worker shell and not the settings."""

import subprocess
import sys

import pytest

CORES = ["workers.icmp.core", "workers.udp.core", "workers.tcp.demux",
         "workers.attach.tcp", "workers.attach.udp", "workers.attach.icmp", "workers.attach.relay",
         "workers.attach.dns", "workers.attach.policy"]
FORBIDDEN = ["zmq", "msgpack", "workers.shell", "workers.attach.upstream", "pipeline.bus.messages", "pipeline.process",
             "pipeline.config", "pipeline.stacklock"]


@pytest.mark.parametrize("module", CORES)
def test_core_imports_nothing_of_the_bus(module):
    probe = (f"import importlib, sys; importlib.import_module({module!r}); "
             f"print(' '.join(m for m in {FORBIDDEN!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_the_probe_sees_a_module_that_loads_the_bus():
    # The same probe on the shell must find zmq, or the test above could not fail.
    probe = "import workers.shell, sys; print('zmq' in sys.modules, 'msgpack' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "True"]
