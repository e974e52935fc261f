import pytest

from pipeline import config


@pytest.fixture
def env(monkeypatch):
    for name in ("USTACK_TUN", "USTACK_HOST_ADDR", "USTACK_ADDR", "USTACK_MTU", "USTACK_RUN_DIR", "USTACK_OFFLOAD",
                 "USTACK_INGRESS_ENDPOINT", "USTACK_INGRESS_BIND", "HONCHO_PROCESS_NAME", "USTACK_NAME_PREFIX",
                 "USTACK_IPV6", "USTACK_HOST_ADDR6", "USTACK_ADDR6", "USTACK_REASSEMBLY_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults(env):
    cfg = config.load()
    assert str(cfg.host_interface) == "10.0.0.1/24" and str(cfg.stack_address) == "10.0.0.2"
    assert cfg.tun_name == "ustack0" and cfg.mtu == 1500
    assert cfg.run_dir.startswith("/run/ustack/") and cfg.run_dir.endswith("-ustack0")
    assert cfg.ingress_endpoint == cfg.ingress_bind == f"ipc://{cfg.run_dir}/ingress.sock"
    assert cfg.proc_name == ""
    assert str(cfg.host_interface6) == "fd00::1/64" and str(cfg.stack_address6) == "fd00::2"
    assert cfg.stack_addr6_bytes == bytes.fromhex("fd00" + "00" * 13 + "02")


def test_ipv6_off(env):
    env.setenv("USTACK_IPV6", "0")
    env.setenv("USTACK_MTU", "576")  # the 1280 floor is IPv6's (RFC 8200 §5)
    cfg = config.load()
    assert cfg.host_interface6 is None and cfg.stack_address6 is None and cfg.stack_addr6_bytes is None


def test_name_prefix_and_bind_override(env):
    env.setenv("HONCHO_PROCESS_NAME", "tcp.2")
    env.setenv("USTACK_NAME_PREFIX", "b-")
    env.setenv("USTACK_INGRESS_ENDPOINT", "tcp://192.0.2.1:5601")
    env.setenv("USTACK_INGRESS_BIND", "tcp://0.0.0.0:5601")
    cfg = config.load()
    assert cfg.proc_name == "b-tcp.2"
    assert cfg.ingress_endpoint == "tcp://192.0.2.1:5601" and cfg.ingress_bind == "tcp://0.0.0.0:5601"


@pytest.mark.parametrize("name,value,message", [
    ("USTACK_ADDR", "10.9.9.9", "is not inside"),
    ("USTACK_ADDR", "10.0.0.1", "must differ"),
    ("USTACK_HOST_ADDR", "not-an-address", "bad address"),
    ("USTACK_MTU", "100", "576..65535"),
    ("USTACK_MTU", "1279", "IPv6 needs at least 1280"),
    ("USTACK_ADDR6", "fd01::2", "is not inside"),
    ("USTACK_ADDR6", "fd00::1", "must differ"),
    ("USTACK_ADDR6", "10.0.0.2", "bad IPv6 address"),
    ("USTACK_HOST_ADDR6", "fd00::1/200", "bad IPv6 address"),
    ("USTACK_IPV6", "perhaps", "expected 1 or 0"),
    ("USTACK_REASSEMBLY_TIMEOUT", "-1", "expected 0 < seconds <= 120"),
    ("USTACK_MTU", "big", "expected an integer"),
    ("USTACK_TUN", "a-name-far-too-long", "1..15"),
    ("USTACK_OFFLOAD", "maybe", "expected 1 or 0"),
    ("USTACK_INGRESS_ENDPOINT", "udp://x", "neither ipc:// nor tcp://"),
    ("USTACK_RUN_DIR", "/" + "d" * 120, "107 characters"),
])
def test_bad_values_exit_with_a_clear_message(env, name, value, message):
    env.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        config.load()
    assert message in str(exc.value)
