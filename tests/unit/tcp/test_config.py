"""TcpConfig from the environment (workers/tcp/__main__.py tcp_config) and its validation."""

import pytest

from pipeline.config import tcp_settings
from workers.tcp.__main__ import tcp_config
from workers.tcp.config import TcpConfig


@pytest.fixture
def env(monkeypatch):
    for name in ("TCP_FIN_WAIT2_TIMEOUT", "TCP_ECN", "TCP_CONGESTION", "TCP_KEEPALIVE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults(env):
    cfg = tcp_config(1500, False, tcp_settings())
    assert cfg.fin_wait2_timeout == 60.0 and cfg.ecn is True and cfg.mss == 1460


def test_fin_wait2_timeout_and_ecn_from_the_environment(env):
    env.setenv("TCP_FIN_WAIT2_TIMEOUT", "2.5")
    env.setenv("TCP_ECN", "0")
    cfg = tcp_config(1500, False, tcp_settings())
    assert cfg.fin_wait2_timeout == 2.5 and cfg.ecn is False


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_fin_wait2_timeout_must_be_positive(env, value):
    env.setenv("TCP_FIN_WAIT2_TIMEOUT", value)
    with pytest.raises(SystemExit, match="TCP_FIN_WAIT2_TIMEOUT"):
        tcp_config(1500, False, tcp_settings())
    with pytest.raises(ValueError):
        TcpConfig(fin_wait2_timeout=float(value))
