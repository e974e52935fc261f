"""``scripts/export-systemd DIR [-c tcp=N]``: systemd units that run the stack.

What honcho does on a terminal, these units do under systemd (``honcho export
systemd`` cannot: it needs jinja2, names a user that does not exist, runs the
system Python through a login shell and sets no network namespace):

* ``ustack-netns.service`` creates the stack's network namespace (USTACK_NETNS,
  default ``ustack``) and brings its loopback up; stopping it deletes it;
* one service per process (``ustack-ingress``, ``ustack-egress``,
  ``ustack-icmp``, ``ustack-udp``, ``ustack-tcp-1`` … ``-N``): root, the
  repository as working directory, ``.env`` as environment, the venv's Python
  running the process under ``pipeline.respawn`` (which restarts a crash in
  place and holds the stack's lock), inside the namespace
  (``NetworkNamespacePath=``); systemd restarts a failed wrapper, except after
  a configuration error or missing privileges (exit 78 and 77);
* ``ustack.target`` groups them: ``systemctl start ustack.target`` starts the
  stack, ``systemctl stop ustack.target`` stops it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from pipeline import config

PROCESSES = ("ingress", "egress", "icmp", "udp", "tcp")
TARGET = "ustack.target"
NETNS_UNIT = "ustack-netns.service"


def unit_names(tcp: int) -> dict[str, str]:
    """honcho process name -> unit name."""
    names = {f"{p}.1": f"ustack-{p}.service" for p in PROCESSES if p != "tcp"}
    names.update({f"tcp.{i}": f"ustack-tcp-{i}.service" for i in range(1, tcp + 1)})
    return names


def netns_unit(ip: str, netns: str) -> str:
    return f"""[Unit]
Description=ustack: network namespace {netns}
PartOf={TARGET}

[Service]
Type=oneshot
RemainAfterExit=yes
# A namespace left by an earlier run is reused ("-": its "File exists" is not a failure).
ExecStart=-{ip} netns add {netns}
ExecStart={ip} netns exec {netns} {ip} link set lo up
ExecStop={ip} netns del {netns}
"""


def process_unit(repo: str, python: str, name: str, netns: str) -> str:
    role = name.partition(".")[0]
    module = f"pipeline.{role}" if role in ("ingress", "egress") else f"workers.{role}"
    return f"""[Unit]
Description=ustack: {name}
PartOf={TARGET}
Requires={NETNS_UNIT}
After={NETNS_UNIT}

[Service]
User=root
WorkingDirectory={repo}
EnvironmentFile=-{repo}/.env
Environment=HONCHO_PROCESS_NAME={name} PYTHONUNBUFFERED=1
NetworkNamespacePath=/run/netns/{netns}
ExecStart={python} -m pipeline.respawn {python} -m {module}
Restart=on-failure
RestartSec=1
# 78: a configuration error or another stack on the device; 77: no CAP_NET_ADMIN.
RestartPreventExitStatus=77 78
KillMode=mixed
TimeoutStopSec=10

[Install]
WantedBy={TARGET}
"""


def target_unit(units: list[str]) -> str:
    return f"""[Unit]
Description=ustack: the user-space TCP/IP stack
Wants={NETNS_UNIT} {' '.join(units)}

[Install]
WantedBy=multi-user.target
"""


def export(directory: str, tcp: int, repo: str, python: str, ip: str, netns: str) -> list[str]:
    """Write the units; return their file names."""
    os.makedirs(directory, exist_ok=True)
    names = unit_names(tcp)
    files = {NETNS_UNIT: netns_unit(ip, netns), TARGET: target_unit(list(names.values()))}
    for name, unit in names.items():
        files[unit] = process_unit(repo, python, name, netns)
    for file_name, text in files.items():
        with open(os.path.join(directory, file_name), "w") as f:
            f.write(text)
    return sorted(files)


def _concurrency(value: str) -> int:
    kind, _, count = value.partition("=")
    if kind != "tcp" or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected tcp=N with N >= 1")
    return int(count)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/export-systemd", description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where to write the units (e.g. /etc/systemd/system)")
    parser.add_argument("-c", "--concurrency", type=_concurrency, default=1, metavar="tcp=N",
                        help="number of TCP workers (default tcp=1)")
    args = parser.parse_args(argv)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above pipeline/tools/
    os.environ.update(config.read_env_file(os.path.join(repo, ".env")))
    errors = config.validate_all()
    if errors:
        print("\n".join(f"configuration error: {e}" for e in errors), file=sys.stderr)
        return config.EX_CONFIG
    ip = shutil.which("ip") or "/usr/sbin/ip"
    python = os.path.join(repo, ".venv", "bin", "python")
    netns = config.netns_name()
    for name in export(args.directory, args.concurrency, repo, python, ip, netns):
        print(os.path.join(args.directory, name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
