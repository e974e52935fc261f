import pytest

from tests.integration.attach_topology import Topology
from tests.integration.netns import Namespace, Stack, routed_client


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
