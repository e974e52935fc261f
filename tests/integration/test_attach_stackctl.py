"""stackctl finds an attached stack as a user looks for it: by the namespace it serves, from
the namespace it runs in, and in `stackctl list`; with no USTACK_RUN_DIR anywhere."""

import json
import os
import subprocess

from tests.integration.attach_topology import Topology
from tests.integration.netns import ROOT, Stack

STACKCTL = str(ROOT / ".venv" / "bin" / "stackctl")


def stackctl(*args: str, ns: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("USTACK_")}
    argv = [STACKCTL, *args] if ns is None else ["ip", "netns", "exec", ns, STACKCTL, *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20)


def test_an_attached_stack_is_found_by_the_namespace_it_serves_and_listed():
    topo = Topology()
    # A namespace made with `ip netns add` has its loopback down: the stack brings it up.
    topo.client.run("ip", "link", "set", "lo", "down")
    stack = Stack(topo.host, env={"USTACK_ATTACH": topo.client.name}, run_dir="")  # the default run directory
    try:
        stack.wait_ready()
        by_served = stackctl("--netns", topo.client.name, "status", "--json")
        assert by_served.returncode == 0, by_served.stderr
        assert {p["role"] for p in json.loads(by_served.stdout)["processes"]} >= {"ingress", "tcp", "egress"}
        from_where_it_runs = stackctl("status", "--json", ns=topo.host.name)
        assert from_where_it_runs.returncode == 0, from_where_it_runs.stderr
        assert stackctl("--netns", topo.server.name, "status").returncode != 0  # serves nothing there

        listed = stackctl("list", "--json")
        assert listed.returncode == 0, listed.stderr
        ours = [r for r in json.loads(listed.stdout) if r["netns"]["name"] == topo.host.name]
        assert len(ours) == 1, listed.stdout
        assert [a["name"] for a in ours[0]["attached"]] == [topo.client.name]
        assert ours[0]["device"] == "ustack0" and ours[0]["uptime"] >= 0 and ours[0]["supervisor"] > 1
        assert topo.client.name in stackctl("list").stdout

        lo = topo.client.run("ip", "-o", "link", "show", "lo").stdout.decode()
        assert "<LOOPBACK,UP" in lo, lo
        run_dir = ours[0]["run_dir"]
    finally:
        stack.stop()
        topo.delete()
    assert not os.path.exists(run_dir)
    assert topo.host.name not in stackctl("list").stdout
