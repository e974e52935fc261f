import pytest

from tests.integration.netns import Namespace, Stack


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


@pytest.fixture(scope="module")
def stack(ns):
    """The whole stack, one worker of each kind, started with plain `honcho start`."""
    s = Stack(ns, env={"LOG_LEVEL": "debug"})
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()
