"""The README's "What to try" and attach-mode recipe, run as a user runs them.

The fenced ``sh`` blocks after a ``<!-- readme-test: NAME -->`` marker are
parsed out of README.md and run line by line with bash from the repository
root, while the stack runs the way the README starts it (``scripts/run``).
Each line must exit 0; a comment ``→ TEXT`` is what the line must print.
So the README cannot drift from the code. The namespaces are the README's
own (``ustack``, ``box``, ``outside``): if one already exists (a stack of
yours is running) the test fails saying so rather than touch it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

from tests.integration.netns import ROOT, require_root_and_tun

STACKCTL = str(ROOT / ".venv" / "bin" / "stackctl")
GUARD = """
table inet readme_guard {
  counter escaped {}
  chain out {
    type filter hook output priority 0; policy accept;
    oifname "lo" accept
    counter name escaped drop
  }
}
"""
_BLOCK = re.compile(r"<!-- readme-test: ([\w-]+) -->\s*```sh\n(.*?)```", re.S)


def blocks() -> dict[str, list[str]]:
    """Marker name -> the block's command lines (comment-only and blank lines left out)."""
    text = (ROOT / "README.md").read_text()
    found = {name: [line for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
             for name, body in _BLOCK.findall(text)}
    return found


def expected(line: str) -> str | None:
    """What a line's ``# … → TEXT`` comment says it prints."""
    _, arrow, text = line.partition("→")
    return text.strip() if arrow else None


def user_env() -> dict[str, str]:
    """A user's shell: none of the test harness's USTACK_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("USTACK_", "TCP_", "LOG_"))}


def run_lines(lines: list[str]) -> None:
    for line in lines:
        done = subprocess.run(["bash", "-c", line], cwd=ROOT, env=user_env(), capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, f"{line}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        want = expected(line)
        if want is not None:
            assert want in done.stdout + done.stderr, f"{line}: expected {want!r}\n{done.stdout}{done.stderr}"


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def start(command: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=user_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until_serving(netns: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``stackctl --netns`` sees a tcp worker (scripts/run installs first: a minute when it builds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        done = subprocess.run([STACKCTL, "--netns", netns, "status"], env=user_env(), capture_output=True,
                              text=True, timeout=20)
        if done.returncode == 0 and re.search(r"^tcp\.1 ", done.stdout, re.M):
            return
        time.sleep(0.5)
    raise AssertionError(f"no stack serving {netns} after {timeout} s")


def stop(proc: subprocess.Popen) -> str:
    """Ctrl-C, as a user stops scripts/run; its output."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out


def test_the_readme_has_the_blocks_this_test_runs():
    assert set(blocks()) == {"try", "attach-setup", "attach-start", "attach-try", "attach-cleanup",
                             "pip-setup", "pip-start", "pip-try", "pip-cleanup"}  # pip-*: test_attach_dns.py runs them
    assert len(blocks()["attach-start"]) == 1


def test_what_to_try_works_as_written():
    require_root_and_tun()
    assert "ustack" not in netns_names(), "a namespace 'ustack' exists already: is a stack of yours running?"
    lines = blocks()["try"]
    run = start("scripts/run")
    try:
        wait_until_serving("ustack", run)
        run_lines(lines)  # the last line stops the stack
        assert run.wait(timeout=30) == 0
    finally:
        out = stop(run)
        subprocess.run(["ip", "netns", "del", "ustack"], capture_output=True)
    # scripts/run lists what the README says it lists.
    for command in ("ping 10.0.0.2", "nc 10.0.0.2 8000", "nc -u 10.0.0.2 7", "iperf3 -c 10.0.0.2",
                    ".venv/bin/stackctl --netns ustack status"):
        assert command in out, f"the start-up message lacks {command!r}:\n{out}"
    assert "Traceback" not in out
    assert "ustack" not in netns_names()


def test_the_attach_mode_recipe_works_as_written():
    require_root_and_tun()
    taken = {"box", "outside"} & netns_names()
    assert not taken, f"namespaces {taken} exist already: the recipe makes its own"
    recipe = blocks()
    run = None
    try:
        run_lines(recipe["attach-setup"])
        # The recipe's `outside` has only its loopback, so nothing relayed can leave it; the guard
        # makes that a checked fact, as for every attach-mode test.
        subprocess.run(["ip", "netns", "exec", "outside", "nft", "-f", "-"], input=GUARD, text=True, check=True)
        run = start(recipe["attach-start"][0])
        wait_until_serving("box", run)
        run_lines(recipe["attach-try"])
        counter = subprocess.run(["ip", "netns", "exec", "outside", "nft", "list", "counter", "inet",
                                  "readme_guard", "escaped"], capture_output=True, text=True, check=True).stdout
        assert "packets 0 " in counter, counter
        run_lines(recipe["attach-cleanup"])  # stops the stack, removes the namespaces
        assert run.wait(timeout=30) == 0
    finally:
        out = stop(run) if run is not None else ""
        for ns in ("box", "outside"):
            if ns in netns_names():
                for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                          text=True).stdout.split():
                    os.kill(int(pid), signal.SIGKILL)
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["rm", "-rf", "/tmp/ustack-demo"])
    assert "Traceback" not in out, out
    assert not {"box", "outside"} & netns_names()
