"""Each builder in tcp/builders.py equals the state reached through real transitions (smoltcp *_sanity)."""

import pytest

from tests.unit.tcp import builders as b
from tests.unit.tcp.builders import FULL, PLAIN, T0, config, seg, snapshot
from workers.tcp.connection import State

CONFIGS = [
    pytest.param(config(), PLAIN, id="plain"),
    pytest.param(config(window_scaling=True, timestamps=True, sack=True), FULL, id="all-options"),
]


def _ts(c, tsval=6000):
    """The timestamp option a peer would send (echoing nothing useful)."""
    from pipeline.wire.tcp import TcpOptions
    return TcpOptions(timestamp=(tsval, 1)) if c.options.timestamps else b.NO_OPTIONS


def real_established(cfg, opts):
    c = b.syn_received(cfg, opts)
    c.receive(seg(c, "A", options=_ts(c)), T0)
    c.segments_to_send(T0)
    b.drain(c)
    return c


def real_fin_wait_1(cfg, opts):
    c = real_established(cfg, opts)
    c.shutdown()
    out = c.segments_to_send(T0)
    assert [s.flags for s in out] == [b.flags("AF")]
    return c


def real_fin_wait_2(cfg, opts):
    c = real_fin_wait_1(cfg, opts)
    c.receive(seg(c, "A", options=_ts(c)), T0)
    c.segments_to_send(T0)
    return c


def real_close_wait(cfg, opts):
    c = real_established(cfg, opts)
    c.receive(seg(c, "AF", options=_ts(c)), T0)
    c.segments_to_send(T0)
    return c


def real_last_ack(cfg, opts):
    c = real_close_wait(cfg, opts)
    c.close()
    c.segments_to_send(T0)
    return c


def real_closing(cfg, opts):
    c = real_fin_wait_1(cfg, opts)
    c.receive(seg(c, "AF", ack=c.sender.snd_una, options=_ts(c)), T0)
    c.segments_to_send(T0)
    return c


def real_time_wait(cfg, opts):
    c = real_fin_wait_2(cfg, opts)
    c.receive(seg(c, "AF", options=_ts(c)), T0)
    c.segments_to_send(T0)
    return c


@pytest.mark.parametrize("cfg,opts", CONFIGS)
@pytest.mark.parametrize("name", ["established", "fin_wait_1", "fin_wait_2", "close_wait", "last_ack", "closing",
                                  "time_wait"])
def test_builder_matches_real_transitions(name, cfg, opts):
    built = getattr(b, name)(cfg, options=opts)
    built.segments_to_send(T0)
    real = globals()["real_" + name](cfg, opts)
    assert snapshot(built) == snapshot(real)
    assert built.state is State[name.upper()]
