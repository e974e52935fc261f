import os
import pathlib
import re
import subprocess
import sys

import pytest

from pipeline import config, relay_config
from pipeline.bus import endpoints


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
    ("USTACK_HOST_ADDR", "not-an-address", "USTACK_HOST_ADDR: bad address"),
    ("USTACK_MTU", "100", "576..65535"),
    ("USTACK_MTU", "1279", "IPv6 needs at least 1280"),
    ("USTACK_ADDR6", "fd01::2", "is not inside"),
    ("USTACK_ADDR6", "fd00::1", "must differ"),
    ("USTACK_ADDR6", "10.0.0.2", "USTACK_ADDR6: bad address"),
    ("USTACK_HOST_ADDR6", "fd00::1/200", "USTACK_HOST_ADDR6: bad address"),
    ("USTACK_IPV6", "perhaps", "expected 1 or 0"),
    ("USTACK_REASSEMBLY_TIMEOUT", "-1", "expected 0 < seconds <= 120"),
    ("USTACK_MTU", "big", "expected an integer"),
    ("USTACK_TUN", "a-name-far-too-long", "1..15"),
    ("USTACK_OFFLOAD", "maybe", "expected 1 or 0"),
    ("USTACK_INGRESS_ENDPOINT", "udp://x", "neither ipc:// nor tcp://"),
    ("USTACK_RUN_DIR", "/" + "d" * 120, "107 characters"),
    ("USTACK_BUSY_POLL", "-5", "expected 0..100000 microseconds"),
    ("USTACK_BUSY_POLL", "soon", "expected an integer"),
])
def test_bad_values_exit_with_a_clear_message(env, name, value, message):
    env.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        config.load()
    assert message in str(exc.value)


ATTACH_VARS = ("USTACK_ATTACH", "USTACK_FORWARD", "USTACK_DEFAULT_ROUTE", "USTACK_FORWARD_DENY",
               "USTACK_FORWARD_ALLOW", "USTACK_HOST_ALIAS")


def test_attach_mode_forwards_by_default(env, tmp_path):
    for name in ATTACH_VARS:
        env.delenv(name, raising=False)
    assert config.load().forward is False and config.load().attach == ""
    target = tmp_path / "netns"
    target.write_bytes(b"")  # any path: the namespace itself is opened only by the device code
    env.setenv("USTACK_ATTACH", str(target))
    cfg = config.load()
    assert cfg.attach == str(target) and cfg.forward is True and cfg.default_route is True
    env.setenv("USTACK_FORWARD", "0")
    assert config.load().forward is False


@pytest.mark.parametrize("name,value,message", [
    ("USTACK_ATTACH", "no-such-namespace-here", "/run/netns/no-such-namespace-here"),
    ("USTACK_FORWARD", "perhaps", "expected 1 or 0"),
    ("USTACK_FORWARD_DENY", "10.0.0.0/8,bogus", "'bogus'"),
    ("USTACK_FORWARD_ALLOW", "300.1.1.1", "'300.1.1.1'"),
    ("USTACK_HOST_ALIAS", "localhost", "USTACK_HOST_ALIAS"),
    ("USTACK_PUBLISH", "tcp:8080", "'tcp:8080'"),
    ("USTACK_PUBLISH", "sctp:1:2", "'sctp:1:2'"),
    ("USTACK_UDP_IDLE", "0", "USTACK_UDP_IDLE=0.0"),
])
def test_bad_attach_settings_exit_with_ex_config(env, capsys, name, value, message):
    for var in ATTACH_VARS:
        env.delenv(var, raising=False)
    env.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        config.check_or_exit("tcp.1")
    assert exc.value.code == config.EX_CONFIG == 78
    assert message in capsys.readouterr().err


def test_validate_all_reports_every_bad_setting_at_once(env):
    for name, value in {"USTACK_ADDR": "10.0.0.300", "TCP_CONGESTION": "bbr", "TCP_SYN_QUEUE": "0",
                        "LOG_FORMAT": "xml"}.items():
        env.setenv(name, value)
    errors = config.validate_all()
    assert len(errors) == 4
    assert any(e.startswith("USTACK_ADDR: bad address") for e in errors)
    assert "TCP_CONGESTION='bbr': expected newreno or cubic" in errors
    assert "TCP_SYN_QUEUE=0: expected 1..1048576" in errors


def test_every_bad_stack_setting_is_reported_at_once_and_each_once(env):
    # load() covers these together: each must be named, not only the first it meets, and
    # USTACK_MTU (read by load() and by the TCP receive buffer's check) only once.
    for name, value in {"USTACK_TUN": "far-too-long-a-name", "USTACK_MTU": "abc", "USTACK_OFFLOAD": "maybe",
                        "USTACK_REASSEMBLY_TIMEOUT": "999", "USTACK_HOST_ADDR6": "nope"}.items():
        env.setenv(name, value)
    errors = config.validate_all()
    assert len(errors) == 5, errors
    assert sum("USTACK_MTU" in e for e in errors) == 1
    for name in ("USTACK_TUN", "USTACK_OFFLOAD", "USTACK_REASSEMBLY_TIMEOUT", "USTACK_HOST_ADDR6"):
        assert any(name in e for e in errors), name


def test_check_or_exit_uses_ex_config(env, capsys):
    env.setenv("TCP_DELAYED_ACK", "2")
    with pytest.raises(SystemExit) as exc:
        config.check_or_exit("tcp.1")
    assert exc.value.code == config.EX_CONFIG == 78
    assert "tcp.1: configuration error: TCP_DELAYED_ACK=2.0: expected 0.0..0.5" in capsys.readouterr().err


def test_main_reads_env_file_like_honcho(env, tmp_path, capsys):
    dotenv = tmp_path / ".env"
    dotenv.write_text("# comment\nUSTACK_ADDR=10.0.0.7\nexport USTACK_NETNS=ignored\nUSTACK_NETNS='lab'\n")
    env.setenv("USTACK_NETNS", "from-environment")
    env.setenv("USTACK_ADDR", "10.0.0.2")
    env.setenv("TCP_CONGESTION", "newreno")  # main() updates os.environ: monkeypatch restores these three
    assert config.main(["--env-file", str(dotenv), "USTACK_NETNS", "USTACK_ADDR"]) == 0
    assert capsys.readouterr().out.splitlines() == ["USTACK_NETNS=lab", "USTACK_ADDR=10.0.0.7"]
    dotenv.write_text("TCP_CONGESTION=bbr\n")
    assert config.main(["--env-file", str(dotenv)]) == config.EX_CONFIG
    assert "TCP_CONGESTION='bbr'" in capsys.readouterr().err


def test_missing_curve_keys_are_a_configuration_error(env, tmp_path):
    env.setenv("USTACK_KEYS_DIR", str(tmp_path))
    env.setenv("USTACK_INGRESS_ENDPOINT", "tcp://127.0.0.1:5601")
    cfg = config.load()
    assert endpoints.missing_keys(cfg, "egress") == endpoints.missing_keys(cfg, "tcp")  # both connect to ingress
    assert [e.split()[2] for e in endpoints.missing_keys(cfg, "tcp")] == [str(tmp_path / "server.key"),
                                                                       str(tmp_path / "client.key_secret")]
    assert [e.split()[2] for e in endpoints.missing_keys(cfg, "ingress")] == [str(tmp_path / "server.key_secret")]
    for name in ("server.key", "server.key_secret", "client.key_secret"):
        (tmp_path / name).write_text("")
    assert endpoints.missing_keys(cfg, "ingress") == endpoints.missing_keys(cfg, "tcp") == []


WORKER_VARS = ("TCP_CONGESTION", "TCP_MSL", "TCP_DELAYED_ACK", "TCP_NAGLE", "TCP_ECN", "TCP_FIN_WAIT2_TIMEOUT",
               "TCP_KEEPALIVE", "TCP_SYN_QUEUE", "TCP_MAX_TIME_WAIT", "TCP_RECV_BUFFER", "TCP_SEND_BUFFER",
               "USTACK_SERVICES", "USTACK_HTTP_ROOT", "USTACK_HTTP_TIMEOUT", "USTACK_PUBLISH",
               "USTACK_RELAY_CONNECT_TIMEOUT", "USTACK_UDP_IDLE", "USTACK_UDP_IDLE_DNS", "LOG_LEVEL", "LOG_FORMAT",
               "LOG_PAYLOAD", "USTACK_FORWARD_ALLOW_NAMES", "USTACK_PUBLISH_SOURCE", "USTACK_OUTBOUND_ADDR",
               "USTACK_OUTBOUND_ADDR6", "USTACK_DNS", "USTACK_DNS_SERVERS", "USTACK_DNS_TIMEOUT", *ATTACH_VARS)


@pytest.fixture
def worker_env(env):
    for name in WORKER_VARS:
        env.delenv(name, raising=False)
    return env


def test_worker_settings_defaults(worker_env):
    assert config.tcp_settings() == config.TcpSettings(
        congestion="newreno", msl=30.0, delayed_ack=0.04, nagle=True, ecn=True, fin_wait2_timeout=60.0,
        keepalive=None, syn_queue=256, max_time_wait=8192, recv_buffer=1 << 20, send_buffer=1 << 20)
    assert config.service_settings() == config.ServiceSettings(entries=(), http_root="", http_timeout=10.0)
    assert relay_config.relay_settings() == relay_config.RelaySettings(
        deny=(), allow=(), host_alias=None, publish=(), connect_timeout=30.0, udp_idle=60.0, udp_idle_dns=10.0,
        allow_names=(), publish_source="client", outbound=None, outbound6=None, dns=False,
        dns_servers=relay_config.resolv_conf_servers(), dns_timeout=5.0)
    assert config.log_settings() == config.LogSettings(level="info", format="json", payload=False)


def test_worker_settings_are_plain_checked_values(worker_env, tmp_path):
    for name, value in {"TCP_CONGESTION": "CUBIC", "TCP_KEEPALIVE": "45", "TCP_NAGLE": "off",
                        "USTACK_SERVICES": "udp/9001=m:f", "USTACK_HTTP_ROOT": str(tmp_path),
                        "USTACK_FORWARD_DENY": "10.0.0.0/8, 192.0.2.1", "USTACK_FORWARD_ALLOW": "fd00::/8",
                        "USTACK_HOST_ALIAS": "10.0.2.2", "USTACK_PUBLISH": "tcp:8080:80, UDP:5353:53"}.items():
        worker_env.setenv(name, value)
    tcp = config.tcp_settings()
    assert (tcp.congestion, tcp.keepalive, tcp.nagle) == ("cubic", 45.0, False)
    services = config.service_settings()
    assert services.entries == (("udp", 9001, "m", "f"),) and services.http_root == str(tmp_path)
    relays = relay_config.relay_settings()
    assert [str(n) for n in relays.deny] == ["10.0.0.0/8", "192.0.2.1/32"]
    assert [str(n) for n in relays.allow] == ["fd00::/8"] and str(relays.host_alias) == "10.0.2.2"
    assert relays.published("tcp") == {8080: 80} and relays.published("udp") == {5353: 53}


def test_each_group_names_all_of_its_bad_values_at_once(worker_env):
    worker_env.setenv("TCP_MSL", "0")
    worker_env.setenv("TCP_SEND_BUFFER", "lots")
    with pytest.raises(config.ConfigError) as exc:
        config.tcp_settings()
    assert exc.value.problems == ["TCP_MSL=0.0: expected 0.001..3600.0", "TCP_SEND_BUFFER='lots': expected an integer"]
    worker_env.setenv("USTACK_FORWARD_ALLOW", "nowhere")
    worker_env.setenv("USTACK_UDP_IDLE_DNS", "0")
    with pytest.raises(config.ConfigError) as exc:
        relay_config.relay_settings()
    assert exc.value.problems == ["USTACK_FORWARD_ALLOW: 'nowhere' is not an address or CIDR network",
                                  "USTACK_UDP_IDLE_DNS=0.0: expected 0.1..86400.0"]


def test_attach_mode_names_outbound_addresses_and_resolvers(worker_env, tmp_path):
    for name, value in {"USTACK_FORWARD_ALLOW_NAMES": "Pkgs.Example., *.example.org", "USTACK_DNS": "1",
                        "USTACK_OUTBOUND_ADDR": "127.0.0.1", "USTACK_OUTBOUND_ADDR6": "::1",
                        "USTACK_DNS_SERVERS": "127.0.0.53, 2001:db8::53", "USTACK_PUBLISH_SOURCE": "stack"}.items():
        worker_env.setenv(name, value)
    relays = relay_config.relay_settings()
    assert relays.allow_names == ("pkgs.example", "*.example.org") and relays.publish_source == "stack"
    assert (str(relays.outbound), str(relays.outbound6)) == ("127.0.0.1", "::1")
    assert [str(a) for a in relays.dns_servers] == ["127.0.0.53", "2001:db8::53"]
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# comment\nsearch example\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\n"
                      "nameserver fd00::53\noptions edns0\n")
    assert [str(a) for a in relay_config.resolv_conf_servers(str(resolv))] == ["127.0.0.53", "fd00::53"]
    assert relay_config.resolv_conf_servers(str(tmp_path / "absent")) == ()


def test_attach_mode_settings_name_every_bad_value(worker_env):
    for name, value in {"USTACK_FORWARD_ALLOW_NAMES": "ok.example, bad name", "USTACK_OUTBOUND_ADDR": "192.0.2.250",
                        "USTACK_OUTBOUND_ADDR6": "10.0.0.1", "USTACK_PUBLISH_SOURCE": "gateway",
                        "USTACK_PUBLISH": "tcp:1:2:3", "USTACK_DNS": "0"}.items():
        worker_env.setenv(name, value)
    with pytest.raises(config.ConfigError) as exc:
        relay_config.relay_settings()
    assert exc.value.problems == [
        "USTACK_FORWARD_ALLOW_NAMES: 'bad name' is not a host name or *.name",
        "USTACK_PUBLISH: 'tcp:1:2:3' is not proto:port:port (proto tcp or udp, ports 1..65535)",
        "USTACK_PUBLISH_SOURCE='gateway': expected client or stack",
        "USTACK_OUTBOUND_ADDR=192.0.2.250: not an address of this network namespace",
        "USTACK_OUTBOUND_ADDR6=10.0.0.1: expected an IPv6 address"]
    worker_env.setenv("USTACK_FORWARD_ALLOW_NAMES", "ok.example")
    for name in ("USTACK_OUTBOUND_ADDR", "USTACK_OUTBOUND_ADDR6", "USTACK_PUBLISH_SOURCE", "USTACK_PUBLISH"):
        worker_env.delenv(name)
    with pytest.raises(config.ConfigError, match="needs the stack's resolver"):
        relay_config.relay_settings()


def test_the_receive_buffer_holds_a_segment_of_the_configured_mtu(worker_env):
    worker_env.setenv("USTACK_MTU", "9000")
    worker_env.setenv("TCP_RECV_BUFFER", "8000")
    assert config.validate_all() == ["TCP_RECV_BUFFER=8000: expected 8960..1073741824"]


def test_config_imports_no_worker_module():
    # Layering: workers import pipeline, never the reverse (config checks text into plain values).
    code = ("import sys; from pipeline import config, process; config.validate_all(); "
            "print([m for m in sys.modules if m.split('.')[0] == 'workers'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=pathlib.Path(__file__).resolve().parents[2])
    assert done.stdout.strip() == "[]"


class _Recording(dict):
    """An environment that notes every name asked for."""

    def __init__(self, env) -> None:
        super().__init__(env)
        self.asked: set[str] = set()

    def get(self, name, default=None):
        self.asked.add(name)
        return super().get(name, default)


def test_every_setting_in_the_guides_table_is_checked_here(monkeypatch):
    root = pathlib.Path(__file__).resolve().parents[2]
    table = root.joinpath("GUIDE.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names = {n for row in table.splitlines() if row.startswith("| `")
             for n in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])}
    environ = _Recording(os.environ)
    monkeypatch.setattr(os, "environ", environ)
    config.validate_all()
    assert len(names) > 40
    assert names - environ.asked == {"USTACK_PURE", "USTACK_STACK_ID"}  # the two read elsewhere (module docstring)
    assert {n for n in environ.asked if n.startswith(("USTACK_", "TCP_", "LOG_"))} <= names
