"""FIN-WAIT-2 timeout (Linux tcp_fin_timeout): after close(), a peer that never sends its FIN
cannot hold the connection forever; after shutdown() (half-close) we wait for its FIN."""

from tests.unit.tcp.builders import T0, config, drain, established, seg
from workers.tcp.connection import State, Timer
from workers.tcp.events import Closed, PeerClosed


def closed_in_fin_wait_2(timeout=60.0, keepalive=None):
    c = established(config(fin_wait2_timeout=timeout, keepalive=keepalive))
    c.close()
    c.segments_to_send(T0)
    c.receive(seg(c, "A"), T0 + 0.1)  # our FIN acknowledged
    c.segments_to_send(T0 + 0.1)
    assert c.state is State.FIN_WAIT_2
    return c


def test_close_bounds_fin_wait_2():
    c = closed_in_fin_wait_2(timeout=60.0)
    assert c.timers.deadline(Timer.FIN_WAIT_2) == T0 + 0.1 + 60.0 and c.get_timer() == T0 + 60.1
    c.handle_timer(T0 + 60.0)
    assert c.state is State.FIN_WAIT_2  # not yet
    c.handle_timer(T0 + 60.1)
    assert c.state is State.CLOSED and drain(c)[-1] == Closed("timeout")
    assert c.segments_to_send(T0 + 60.1) == []  # silent, as Linux's FIN-WAIT-2 expiry
    assert c.get_timer() is None


def test_data_in_fin_wait_2_does_not_extend_the_timeout():
    c = closed_in_fin_wait_2(timeout=5.0)
    c.receive(seg(c, "A", b"more"), T0 + 3)  # still received and read (half-duplex close)
    assert c.recv() == b"more"
    c.segments_to_send(T0 + 3)
    assert c.timers.deadline(Timer.FIN_WAIT_2) == T0 + 5.1
    c.handle_timer(T0 + 5.1)
    assert c.state is State.CLOSED


def test_peer_fin_before_the_timeout_goes_to_time_wait():
    c = closed_in_fin_wait_2(timeout=5.0)
    c.receive(seg(c, "AF"), T0 + 1)
    assert c.state is State.TIME_WAIT and PeerClosed() in drain(c)
    assert c.timers.armed() == {Timer.TIME_WAIT}


def test_keepalive_does_not_replace_the_timeout():
    c = closed_in_fin_wait_2(timeout=5.0, keepalive=100.0)
    assert c.timers.armed() == {Timer.FIN_WAIT_2, Timer.KEEPALIVE}
    c.handle_timer(c.get_timer())
    assert c.state is State.CLOSED


def test_shutdown_waits_for_the_peer_without_limit():
    c = established(config(fin_wait2_timeout=1.0))
    c.shutdown()
    c.segments_to_send(T0)
    c.receive(seg(c, "A"), T0)
    c.segments_to_send(T0)
    assert c.state is State.FIN_WAIT_2 and c.get_timer() is None
    c.receive(seg(c, "A", b"still reading"), T0 + 1000)
    assert c.recv() == b"still reading" and c.state is State.FIN_WAIT_2


def test_close_after_shutdown_starts_the_timeout():
    c = established(config(fin_wait2_timeout=2.0))
    c.shutdown()
    c.segments_to_send(T0)
    c.receive(seg(c, "A"), T0 + 1)
    c.segments_to_send(T0 + 1)
    c.close()
    assert c.timers.deadline(Timer.FIN_WAIT_2) == T0 + 1 + 2.0  # from when the peer was last heard
    c.handle_timer(T0 + 3)
    assert c.state is State.CLOSED


def test_close_in_close_wait_is_not_bounded_by_fin_wait_2():
    c = established(config(fin_wait2_timeout=1.0))
    c.receive(seg(c, "AF"), T0)
    c.close()
    c.segments_to_send(T0)
    assert c.state is State.LAST_ACK and Timer.FIN_WAIT_2 not in c.timers
