import contextlib
import socket
from typing import NamedTuple

import pytest

from tests.integration.attach_topology import Topology
from tests.integration.netns import HOST_ADDR, HOST_ADDR6, STACK_ADDR, STACK_ADDR6, Namespace, Stack, routed_client


class Family(NamedTuple):
    """One IP family as a test uses it: socket family, the stack's and the kernel side's addresses."""

    name: str
    af: int
    stack: str
    host: str


FAMILIES = {"ipv4": Family("ipv4", socket.AF_INET, STACK_ADDR, HOST_ADDR),
            "ipv6": Family("ipv6", socket.AF_INET6, STACK_ADDR6, HOST_ADDR6)}


@pytest.fixture(params=list(FAMILIES))
def family(request) -> Family:
    """Run the test once over IPv4 and once over IPv6 (same stack, same processes)."""
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def ns():
    namespace = Namespace()
    try:
        yield namespace
    finally:
        namespace.delete()


@pytest.fixture
def fresh_ns():
    """A namespace for one test that starts its own processes."""
    namespace = Namespace()
    try:
        yield namespace
    finally:
        namespace.delete()


# The device with virtio-net header, checksum offload and TSO (64 KB segments
# both ways), and without (MTU-sized packets, every checksum ours).
OFFLOAD_MODES = {"offload": {"USTACK_OFFLOAD": "1"}, "no_offload": {"USTACK_OFFLOAD": "0"}}


@pytest.fixture(scope="module", params=list(OFFLOAD_MODES))
def offload_env(request):
    return OFFLOAD_MODES[request.param]


@pytest.fixture(scope="module")
def stack(ns, offload_env):
    """The whole stack, one worker of each kind, started with plain `honcho start`."""
    s = Stack(ns, env={"LOG_LEVEL": "debug", **offload_env})
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(ns):
    """A kernel TCP peer one router hop away, so that loss on the path is real loss."""
    c = routed_client(ns)
    try:
        yield c
    finally:
        c.delete()



@pytest.fixture(scope="module")
def topo():
    """Attach mode's host, server and client namespaces with the guard (attach_topology)."""
    t = Topology()
    try:
        yield t
    finally:
        t.delete()


# -- stack logs (.pytest_cache/stack-*.log): a failing test's stays, a passing one's goes --

_FAILED = pytest.StashKey[bool]()
_kept: set[Stack] = set()  # stacks that served a test which did not pass


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:  # setup, call or teardown
        item.stash[_FAILED] = True
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A stack serves each test that runs while it is up (module-scoped ones, many)."""
    before = set(Stack.made)
    serving = [s for s in Stack.made if not s.stopped]
    passed = False
    try:
        result = yield
        passed = not item.stash.get(_FAILED, False)
        return result
    finally:
        serving += [s for s in Stack.made if s not in before]
        if not passed:  # failed, or interrupted
            _kept.update(serving)
        _remove_passed_logs()


def pytest_sessionfinish(session, exitstatus):
    _remove_passed_logs()


def _remove_passed_logs() -> None:
    for s in [s for s in Stack.made if s.stopped and s not in _kept]:
        with contextlib.suppress(OSError):
            s.log_path.unlink()
        Stack.made.remove(s)
