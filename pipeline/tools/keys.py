"""Make the CURVE key pairs for tcp:// endpoints: ``scripts/keys DIR [CLIENT ...]``.

DIR/server.key_secret   the stages' key pair (stays on the host running ingress and egress)
DIR/server.key          its public half: copy it to every worker host
DIR/<client>.key_secret each client's key pair (default client name: "client"),
                        used by workers (USTACK_CLIENT_KEY) and stackctl
DIR/authorized/<client>.key   the public keys the stages admit
"""

from __future__ import annotations

import os
import shutil
import sys

import zmq.auth


def make_keys(directory: str, clients: list[str]) -> None:
    os.makedirs(os.path.join(directory, "authorized"), mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    if not os.path.exists(os.path.join(directory, "server.key_secret")):
        zmq.auth.create_certificates(directory, "server")
    for name in clients:
        if not os.path.exists(os.path.join(directory, f"{name}.key_secret")):
            zmq.auth.create_certificates(directory, name)
        shutil.copy(os.path.join(directory, f"{name}.key"), os.path.join(directory, "authorized", f"{name}.key"))


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    make_keys(argv[0], argv[1:] or ["client"])
    print(f"keys in {argv[0]}: server.key_secret (stages), server.key (copy to worker hosts), "
          f"{', '.join(n + '.key_secret' for n in argv[1:] or ['client'])} (clients), authorized/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
