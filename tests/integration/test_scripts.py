"""The scripts as a newcomer meets them: "run as root" instead of a traceback, a
first build that says what it does, Ctrl-C during the build, and a suite that
cleans up after itself."""

import contextlib
import os
import pathlib
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from tests.integration.netns import ROOT

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
PYTHON = str(ROOT / ".venv" / "bin" / "python")


# -- 1. as another user: "run as root", exit 77 ---------------------------------------------

@pytest.mark.parametrize("script", ["install", "test", "export-systemd", "keys", "profile", "bench", "compile", "run"])
def test_script_as_non_root_says_run_as_root(script):
    # nobody may read the tree, but not reach .venv's Python (a link into /root/.pyenv
    # here) nor write build/: the check comes before anything that needs them.
    done = subprocess.run([*NOBODY, str(ROOT / "scripts" / script)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode == 77, out
    assert f"{script}: run as root: " in done.stderr and "Traceback" not in out, out


# -- 2. the first install says what it is doing --------------------------------------------

def _stub(path: pathlib.Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def test_install_says_it_pip_installs(tmp_path):
    """scripts/install in a tree whose .venv lacks the packages, with pip, apt-get and
    modprobe stubbed: it names the pip install on stderr before running it."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "install", tmp_path / "scripts" / "install")
    (tmp_path / "pyproject.toml").touch()
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    _stub(venv_bin / "python", 'case "$1" in -c) exit 1 ;; esac\n')  # "import zmq, ..." fails; compile is a no-op
    _stub(venv_bin / "pip", 'echo "pip ran: $*" >&2\n')
    fake = tmp_path / "fake-bin"
    fake.mkdir()
    for tool in ("apt-get", "modprobe"):  # never the machine's: this test installs nothing
        _stub(fake / tool, f'echo "{tool} ran" >&2\n')
    done = subprocess.run([str(tmp_path / "scripts" / "install")], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}"))
    assert done.returncode == 0, done.stderr
    said = "install: pip install the project and its tools into .venv"
    assert said in done.stderr and "pip ran: install" in done.stderr, done.stderr
    assert done.stderr.index(said) < done.stderr.index("pip ran: install"), done.stderr


# -- 2 and 3. scripts/compile: progress, and Ctrl-C or SIGTERM that changes nothing ---------

def _compile_tree(tmp_path: pathlib.Path) -> pathlib.Path:
    """What scripts/compile needs, without build/: the committed sources where there is a
    commit (a file half-edited in the work tree would fail mypyc), and this scripts/compile."""
    tree = tmp_path / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "pipeline", "workers", "pyproject.toml"],
                             capture_output=True)
    if archive.returncode == 0:
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    else:  # not a git checkout
        for d in ("pipeline", "workers"):
            shutil.copytree(ROOT / d, tree / d, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        shutil.copy2(ROOT / "pyproject.toml", tree)
    (tree / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "compile", tree / "scripts" / "compile")
    return tree


class _Compile:
    """scripts/compile running in ``tree``, its output read line by line as it comes."""

    def __init__(self, tree: pathlib.Path) -> None:
        self.tree = tree
        self.proc = subprocess.Popen([PYTHON, str(tree / "scripts" / "compile")], cwd=tree, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return
        raise AssertionError(f"scripts/compile never said {text!r}; it said:\n{''.join(self.lines)}")

    def finish(self, timeout: float) -> str:
        """Wait for the exit; everything it wrote."""
        self.proc.wait(timeout)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return "".join(self.lines)

    def kill(self) -> None:
        """After a failure: compile and whatever it started (mypyc, gcc: their command lines name the tree)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in _processes_mentioning(str(self.tree)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def test_compile_ctrl_c_leaves_nothing(tmp_path):
    """Ctrl-C once gcc runs: exit 130, one line, no build/ and no process left."""
    tree = _compile_tree(tmp_path)
    run = _Compile(tree)
    try:
        run.wait_for("compile: [1/", timeout=60)  # mypyc wrote the C; gcc is at work
        time.sleep(0.5)
        run.proc.send_signal(signal.SIGINT)
        out = run.finish(timeout=20)
    finally:
        run.kill()
    assert run.proc.returncode == 130, out
    assert "compile: interrupted; nothing was changed" in out and "Traceback" not in out, out
    assert not (tree / "build").exists() or not any((tree / "build").iterdir()), list((tree / "build").iterdir())
    assert _processes_mentioning(str(tree)) == []


def test_compile_shows_progress_and_sigterm_keeps_the_old_build(tmp_path):
    """The long gcc step says it is still going; SIGTERM then keeps the previous build as it was."""
    tree = _compile_tree(tmp_path)
    old = tree / "build" / "mypyc"  # a previous build (of other sources, so compile rebuilds)
    (old / "pipeline").mkdir(parents=True)
    (old / "manifest.json").write_text('{"abi": "old", "sources": {}, "files": {}}')
    (old / "pipeline" / "flow.so").write_bytes(b"old build")
    before = sorted((p.relative_to(tree), p.read_bytes() if p.is_file() else None) for p in old.rglob("*"))
    run = _Compile(tree)
    try:
        run.wait_for("modules into build/mypyc", timeout=20)
        run.wait_for("] gcc ustack__mypyc", timeout=60)
        run.wait_for("compile: still building ustack__mypyc (", timeout=20)
        run.proc.send_signal(signal.SIGTERM)
        out = run.finish(timeout=20)
    finally:
        run.kill()
    assert run.proc.returncode == 130, out
    assert "compile: interrupted; nothing was changed" in out and "Traceback" not in out, out
    assert [p.name for p in (tree / "build").iterdir()] == ["mypyc"]
    assert sorted((p.relative_to(tree), p.read_bytes() if p.is_file() else None) for p in old.rglob("*")) == before
    assert _processes_mentioning(str(tree)) == []


# -- 4. the suite cleans up ------------------------------------------------------------------

def test_a_passing_session_leaves_no_tmp_path(tmp_path):
    """With this project's pytest settings, a passing test's tmp_path is gone after the session."""
    (tmp_path / "test_inner.py").write_text(textwrap.dedent("""\
        def test_writes(tmp_path):
            (tmp_path / "big").write_bytes(b"x" * 100_000)
    """))
    temproot = tmp_path / "temproot"
    temproot.mkdir()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
                          cwd=tmp_path, env=dict(os.environ, PYTEST_DEBUG_TEMPROOT=str(temproot)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    left = [p for p in temproot.rglob("*") if p.is_file()]
    assert left == [], left


def test_stack_logs_of_passing_tests_go_failing_ones_stay(tmp_path):
    """The integration conftest's hooks, on Stacks whose "honcho" only writes a line:
    a log goes when every test the stack served passed, and stays otherwise."""
    mark = f"logtest{uuid.uuid4().hex[:6]}"
    (tmp_path / "fake.py").write_text(textwrap.dedent(f"""\
        import subprocess

        from tests.integration.netns import Stack


        class FakeNamespace:
            def __init__(self, name):
                self.name = name

            def popen(self, *args, stdout, stderr, **kwargs):
                return subprocess.Popen(["echo", "the log of", self.name], stdout=stdout, stderr=stderr)


        def stack(name):
            s = Stack(FakeNamespace("{mark}-" + name), run_dir="/nonexistent")
            s.proc.wait()
            return s
    """))
    (tmp_path / "test_a.py").write_text(textwrap.dedent("""\
        from fake import stack


        def test_passes():
            stack("pass").stop()


        def test_fails():
            stack("fail").stop()
            assert False, "on purpose"
    """))
    # A module-scoped stack serves every test of its module (it stops after the last).
    shared = textwrap.dedent("""\
        import pytest

        from fake import stack


        @pytest.fixture(scope="module")
        def shared():
            s = stack("NAME")
            yield s
            s.stop()


        def test_1(shared):
            pass


        def test_2(shared):
            assert OUTCOME


        def test_3(shared):
            pass
    """)
    (tmp_path / "test_b.py").write_text(shared.replace("NAME", "shared-good").replace("OUTCOME", "True"))
    (tmp_path / "test_c.py").write_text(shared.replace("NAME", "shared-bad").replace("OUTCOME", "False"))
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", "/dev/null",
                               "--rootdir", str(tmp_path), "-p", "tests.integration.conftest",
                               str(tmp_path)],
                              cwd=ROOT, env=dict(os.environ, PYTEST_DEBUG_TEMPROOT=str(tmp_path)),
                              capture_output=True, text=True, timeout=60)
        assert "2 failed, 6 passed" in done.stdout, done.stdout + done.stderr
        logs = {name: p for p in (ROOT / ".pytest_cache").glob(f"stack-{mark}-*.log")
                for name in ["pass", "fail", "shared-good", "shared-bad"] if p.name.startswith(f"stack-{mark}-{name}-")}
        assert sorted(logs) == ["fail", "shared-bad"], done.stdout
        assert "the log of" in logs["fail"].read_text()
    finally:
        for p in (ROOT / ".pytest_cache").glob(f"stack-{mark}-*.log"):
            p.unlink()
