"""The service registry: USTACK_SERVICES parsed strictly, user modules loaded beside the built-ins."""

import subprocess
import sys
import textwrap

import pytest

from pipeline import config
from workers.services import registry
from workers.services import tcp as apps

USER_MODULE = textwrap.dedent('''
    from workers.services.tcp import Service

    class Upper(Service):
        def on_readable(self):
            while not self.pending and (data := self.stream.recv()):
                self.write(data.upper())

    def shout(payload):
        return payload.upper()

    class Counter:
        def __init__(self):
            self.n = 0
        def __call__(self, payload):
            self.n += 1
            return str(self.n).encode()

    NOT_CALLABLE = 3
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "usermod_reg.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "usermod_reg"


@pytest.fixture
def settings(monkeypatch):
    """The checked service settings of an environment with USTACK_SERVICES=value and no HTTP."""
    def checked(value: str = "") -> config.ServiceSettings:
        monkeypatch.delenv("USTACK_HTTP_ROOT", raising=False)
        monkeypatch.setenv("USTACK_SERVICES", value)
        return config.service_settings()
    return checked


def test_parse_entries_and_whitespace():
    assert config.parse_services(" tcp/9000=a.b:C , udp/9001=m:f,") == [("tcp", 9000, "a.b", "C"),
                                                                        ("udp", 9001, "m", "f")]
    assert config.parse_services("") == []


@pytest.mark.parametrize("bad", ["tcp/9000", "sctp/1=m:C", "tcp/x=m:C", "tcp/0=m:C", "tcp/70000=m:C",
                                 "tcp/9000=m", "tcp/9000=m:C:D", "tcp/9000=1m:C", "tcp/9000=m:C,tcp/9000=n:D"])
def test_parse_rejects(bad):
    with pytest.raises(registry.ConfigError):
        config.parse_services(bad)


def test_builtins_are_in_the_table(settings):
    tcp = registry.services("tcp", settings())
    assert tcp[7] is apps.Echo and tcp[8000] is apps.LineReverser and tcp[19] is apps.Chargen and 80 not in tcp
    assert registry.services("udp", settings())[7](b"x") == b"x"


def test_http_root_adds_the_http_server_with_its_timeout(settings, monkeypatch, tmp_path):
    monkeypatch.setenv("USTACK_HTTP_ROOT", str(tmp_path))
    monkeypatch.setenv("USTACK_HTTP_TIMEOUT", "2.5")
    http = registry.services("tcp", config.service_settings())[80]
    assert type(http).__name__ == "HttpServer" and http.request_timeout == 2.5


def test_user_services_load_beside_builtins(user_module, settings):
    checked = settings(f"tcp/9000={user_module}:Upper,udp/9001={user_module}:shout,udp/9002={user_module}:Counter")
    tcp = registry.services("tcp", checked)
    assert tcp[9000].__name__ == "Upper" and 9001 not in tcp and tcp[7] is apps.Echo
    udp = registry.services("udp", checked)
    assert udp[9001](b"hi") == b"HI"
    counter = udp[9002]  # a class: one instance per worker, called per datagram
    assert counter(b"") == b"1" and counter(b"") == b"2"


def test_steered_ports_are_those_whose_service_declares_steer_by_client(settings):
    tcp = registry.services("tcp", settings())
    assert registry.steered_ports(tcp) == {5201}  # iperf3: a test's connections must meet in one worker

    class Together(apps.Service):  # a user's service may declare it too
        steer_by_client = True

    assert registry.steered_ports({**tcp, 9000: Together}) == {5201, 9000}


def test_iperf3_is_made_on_its_first_connection_once_and_says_what_it_is_before():
    """Its module loads only when a test comes (a fresh interpreter: this one may hold it already)."""
    code = textwrap.dedent("""
        import sys
        from pipeline import config
        from workers.services import registry
        from workers.services.iperf3 import Iperf3Server
        del sys.modules["workers.services.iperf3"]
        table = registry.services("tcp", config.service_settings())
        entry = table[5201]
        assert "workers.services.iperf3" not in sys.modules
        assert entry.steer_by_client is Iperf3Server.steer_by_client is True and entry.__name__ == "Iperf3Server"
        class Stream:
            now = 0.0
            def set_timer(self, when):
                pass
        first = entry(Stream())
        assert type(first).__name__ == "Iperf3Connection" and "workers.services.iperf3" in sys.modules
        assert entry(Stream()).server is first.server  # one server per worker: it holds the test
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("spec, reason", [
    ("tcp/9000=no_such_module_xyz:C", "cannot import"),
    ("tcp/9000={m}:Missing", "has no 'Missing'"),
    ("tcp/9000={m}:NOT_CALLABLE", "not a class or function"),
    ("tcp/7={m}:Upper", "already served by the built-in Echo"),
])
def test_bad_entries_name_the_problem(user_module, settings, spec, reason):
    with pytest.raises(registry.ConfigError, match=reason):
        registry.services("tcp", settings(spec.format(m=user_module)))


def test_config_exit_is_status_78_with_message_on_stderr():
    code = "from workers.services import registry; registry.config_exit('USTACK_SERVICES: broken')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 78 and "USTACK_SERVICES: broken" in done.stderr


@pytest.mark.parametrize("name, value, reason", [
    ("USTACK_SERVICES", "tcp/9000", "expected tcp/PORT=module:Name"),
    ("USTACK_HTTP_ROOT", "/nonexistent/ustack-www", "expected a directory"),
    ("USTACK_HTTP_TIMEOUT", "0", "USTACK_HTTP_TIMEOUT=0.0: expected"),
])
def test_every_process_checks_the_service_settings_at_start(monkeypatch, name, value, reason):
    monkeypatch.setenv(name, value)
    assert any(reason in e for e in config.validate_all())
