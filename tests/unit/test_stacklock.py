"""One stack per run directory: join, refuse, take over a stale one, the last one out cleans up."""

import json
import os
import socket

import pytest

from pipeline import stacklock


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path / "run" / "123-ustack0")


def _lock(run_dir, monkeypatch, stack):
    monkeypatch.setenv("USTACK_STACK_ID", stack)
    return stacklock.StackLock(run_dir, os.getpid())


def test_first_creates_same_stack_joins_last_out_removes(run_dir, monkeypatch):
    a = _lock(run_dir, monkeypatch, "stack-1")
    b = _lock(run_dir, monkeypatch, "stack-1")
    assert a.join() == "created"
    assert oct(os.stat(run_dir).st_mode & 0o777) == "0o700"
    assert json.load(open(os.path.join(run_dir, "stack")))["id"] == "stack-1"
    assert b.join() == "joined"
    assert a.leave() is False and os.path.isdir(run_dir)
    assert b.leave() is True and not os.path.exists(run_dir)


def test_another_stack_is_refused_with_its_supervisor_named(run_dir, monkeypatch):
    first = _lock(run_dir, monkeypatch, "stack-1")
    first.join()
    second = _lock(run_dir, monkeypatch, "stack-2")
    with pytest.raises(stacklock.StackBusy) as exc:
        second.join()
    assert f"supervisor pid {os.getpid()} " in str(exc.value) and run_dir in str(exc.value)
    first.leave()
    assert second.join() == "created"  # the first one is gone: the device is free again
    second.leave()


def test_a_stale_directory_is_emptied_and_taken_over(run_dir, monkeypatch):
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "stack"), "w") as f:
        json.dump({"id": "dead", "supervisor": 1}, f)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.path.join(run_dir, "ingress.sock"))
    stale.close()
    lock = _lock(run_dir, monkeypatch, "stack-1")
    assert lock.join() == "took_over"
    assert sorted(os.listdir(run_dir)) == ["stack"]
    lock.leave()


def test_only_the_stacks_own_files_are_ever_removed(tmp_path, monkeypatch):
    # USTACK_RUN_DIR pointed at a directory that holds other things: they survive.
    run_dir = str(tmp_path / "shared")
    os.makedirs(run_dir)
    (tmp_path / "shared" / "notes.txt").write_text("keep me")
    (tmp_path / "shared" / "sub").mkdir()
    lock = _lock(run_dir, monkeypatch, "stack-1")
    assert lock.join() == "created"
    assert lock.leave() is True
    assert sorted(os.listdir(run_dir)) == ["notes.txt", "sub"]


def test_supervisor_checks(monkeypatch):
    me = os.getpid()
    assert stacklock.supervisor_gone(me, stacklock.start_time(me)) is None
    assert stacklock.supervisor_gone(me, -1) == "exited"  # same pid, another process
    monkeypatch.delenv("USTACK_STACK_ID", raising=False)
    assert stacklock.stack_id(me) == f"{me}:{stacklock.start_time(me)}"


def _record(run_dir):
    with open(os.path.join(run_dir, stacklock.STACK_FILE)) as f:
        return json.load(f)


def test_every_namespace_of_attach_is_in_the_stack_file(run_dir, monkeypatch, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"  # any file stands in for a namespace: its inode names it
    a.write_text("")
    b.write_text("")
    monkeypatch.setenv("USTACK_STACK_ID", "stack-1")
    lock = stacklock.StackLock(run_dir, os.getpid(), device="ustack0", attach=[str(a), str(b)])
    assert lock.join() == "created"
    assert _record(run_dir)["attached"] == [{"path": str(a), "netns": os.stat(a).st_ino},
                                            {"path": str(b), "netns": os.stat(b).st_ino}]
    lock.leave()


def test_set_served_rewrites_only_the_list_and_leaves_no_file_behind(run_dir, monkeypatch, tmp_path):
    paths = []
    for name in ("a", "b", "c"):
        (tmp_path / name).write_text("")
        paths.append(str(tmp_path / name))
    lock = _lock(run_dir, monkeypatch, "stack-1")
    lock.attach = paths[:1]
    lock.join()
    before = _record(run_dir)
    stacklock.set_served(run_dir, paths)  # two attached while it runs
    after = _record(run_dir)
    assert [a["path"] for a in after["attached"]] == paths
    assert {k: v for k, v in after.items() if k != "attached"} == {k: v for k, v in before.items() if k != "attached"}
    stacklock.set_served(run_dir, [paths[2]])  # a and b detached
    assert _record(run_dir)["attached"] == [{"path": paths[2], "netns": os.stat(paths[2]).st_ino}]
    assert sorted(os.listdir(run_dir)) == ["stack"]
    (tmp_path / "c").unlink()  # a namespace gone: listed by path, no inode
    stacklock.set_served(run_dir, [paths[2]])
    assert _record(run_dir)["attached"] == [{"path": paths[2], "netns": None}]
    assert stacklock.live_stacks(os.path.dirname(run_dir))[0]["attached"] == [{"path": paths[2], "netns": None}]
    assert lock.leave() is True and not os.path.exists(run_dir)


def test_a_left_over_temporary_stack_file_is_the_stacks_own(run_dir, monkeypatch):
    lock = _lock(run_dir, monkeypatch, "stack-1")
    lock.join()
    with open(os.path.join(run_dir, "stack.tmp-999"), "w") as f:  # set_served killed halfway
        f.write("{")
    assert lock.leave() is True and not os.path.exists(run_dir)


def test_set_served_on_a_broken_stack_file_is_an_os_error(tmp_path):
    (tmp_path / "stack").write_text("{")
    with pytest.raises(OSError, match="not a stack file"):
        stacklock.set_served(str(tmp_path), ["/run/netns/a"])
    (tmp_path / "stack").write_text("[]")
    with pytest.raises(OSError, match="not a stack file"):
        stacklock.set_served(str(tmp_path), ["/run/netns/a"])
    with pytest.raises(OSError):
        stacklock.set_served(str(tmp_path / "none"), ["/run/netns/a"])
    assert sorted(os.listdir(tmp_path)) == ["stack"]
