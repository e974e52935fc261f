"""scripts/export-systemd: units that systemd accepts, and whose commands really run the stack."""

import os
import shlex
import signal
import socket
import subprocess
import time
import uuid

from tests.integration.netns import ROOT, STACK_ADDR, Namespace, require_root_and_tun


def _export(directory, *args: str, netns: str = "ustack") -> list[str]:
    done = subprocess.run([str(ROOT / "scripts" / "export-systemd"), str(directory), *args], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, USTACK_NETNS=netns))
    assert done.returncode == 0, done.stderr
    return [os.path.basename(p) for p in done.stdout.split()]


def _unit(path) -> dict[str, dict[str, str]]:
    """A unit file's sections; a key given several times (ExecStart=) keeps its lines joined by newlines."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in open(path).read().splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            current[key] = f"{current[key]}\n{value}" if key in current else value
    return sections


def test_exported_units_pass_systemd_analyze_verify(tmp_path):
    files = _export(tmp_path, "-c", "tcp=3")
    assert files == sorted(["ustack.target", "ustack-netns.service", "ustack-ingress.service", "ustack-egress.service",
                            "ustack-icmp.service", "ustack-udp.service", "ustack-tcp-1.service",
                            "ustack-tcp-2.service", "ustack-tcp-3.service"])
    verify = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / f) for f in files)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    target = _unit(tmp_path / "ustack.target")
    assert set(target["Unit"]["Wants"].split()) == set(files) - {"ustack.target"}
    tcp = _unit(tmp_path / "ustack-tcp-2.service")["Service"]
    assert tcp["User"] == "root" and tcp["NetworkNamespacePath"] == "/run/netns/ustack"
    assert tcp["ExecStart"].startswith(f"{ROOT}/.venv/bin/python -m pipeline.respawn {ROOT}/.venv/bin/python ")
    assert "HONCHO_PROCESS_NAME=tcp.2" in tcp["Environment"]
    assert tcp["Restart"] == "on-failure" and tcp["RestartPreventExitStatus"] == "77 78"
    # The check is a real one: a unit whose command does not exist fails it.
    broken = tmp_path / "broken.service"
    broken.write_text("[Service]\nExecStart=/nonexistent/python -m pipeline.ingress\n")
    assert subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True).returncode != 0


def test_the_units_commands_run_the_stack(tmp_path):
    """Do what systemd would do with the units (this machine's PID 1 is not systemd): the
    namespace unit's commands, then each service's ExecStart with its Environment inside
    NetworkNamespacePath, then stop them all and the namespace unit's ExecStop."""
    require_root_and_tun()
    name = f"usd-{uuid.uuid4().hex[:8]}"
    files = _export(tmp_path, "-c", "tcp=2", netns=name)
    netns = _unit(tmp_path / "ustack-netns.service")["Service"]
    services = [_unit(tmp_path / f)["Service"] for f in files if f.endswith(".service") and f != "ustack-netns.service"]
    procs = []
    try:
        for line in netns["ExecStart"].splitlines():
            subprocess.run(shlex.split(line.lstrip("-")), check=not line.startswith("-"), capture_output=True)
        ns_path = services[0]["NetworkNamespacePath"]
        assert ns_path == f"/run/netns/{name}" and os.path.exists(ns_path)
        for service in services:
            env = dict(os.environ)
            env.update(dict(item.split("=", 1) for item in shlex.split(service["Environment"])))
            procs.append(subprocess.Popen(["ip", "netns", "exec", name, *shlex.split(service["ExecStart"])],
                                          cwd=service["WorkingDirectory"], env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        ns = Namespace.__new__(Namespace)  # the unit made this namespace; use the helpers on it
        ns.name = name
        deadline = time.monotonic() + 30
        answered = False
        while not answered and time.monotonic() < deadline:
            answered = ns.run("ping", "-c", "1", "-W", "1", STACK_ADDR, check=False).returncode == 0
        assert answered, "the stack never answered ping"
        with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(5)
            udp.sendto(b"systemd", (STACK_ADDR, 7))
            assert udp.recv(100) == b"systemd"
        for proc in procs:  # systemctl stop: SIGTERM to each main process
            proc.send_signal(signal.SIGTERM)
        assert all(proc.wait(15) == 0 for proc in procs)
        assert ns._pids() == []
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        subprocess.run(shlex.split(netns["ExecStop"]), capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in out.split()
