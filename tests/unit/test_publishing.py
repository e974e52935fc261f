"""The table of published ports ingress keeps: its checks, and the file a restarted ingress reads."""

import json
import socket

import pytest

from pipeline import publishing, stacklock
from pipeline.publishing import PublishError, PublishTable


def free(proto: str, port: int) -> None:
    return None


def test_add_and_remove_keep_one_port_per_protocol():
    table = PublishTable([("tcp", 8080, 80, 0)])
    assert table.add(" TCP:18000:8000 ", free) == ("tcp", 18000, 8000, 0)
    assert table.add("udp:8080:53", free) == ("udp", 8080, 53, 0)  # another protocol: another port
    assert table.rows() == [("tcp", 8080, 80, 0), ("tcp", 18000, 8000, 0), ("udp", 8080, 53, 0)]
    assert table.remove("tcp:8080:80") == ("tcp", 8080, 80, 0)
    assert table.rows() == [("tcp", 18000, 8000, 0), ("udp", 8080, 53, 0)]
    assert publishing.text(("tcp", 1, 2, 0)) == "tcp:1:2"
    assert publishing.record(("udp", 5353, 53, 1), "b") == {"proto": "udp", "port": 5353, "to_port": 53, "ns": "b"}
    # Into another attached namespace; detaching it takes its ports away.
    assert table.add("tcp:18001:80", free, ns=2) == ("tcp", 18001, 80, 2)
    assert table.drop_namespace(2) == [("tcp", 18001, 80, 2)] and table.drop_namespace(2) == []


@pytest.mark.parametrize("change,item,message", [
    ("add", "tcp:8080", "is not proto:port:port"),
    ("add", "sctp:1:2", "is not proto:port:port"),
    ("add", "tcp:0:80", "is not proto:port:port"),
    ("add", "tcp:8080:81", "tcp port 8080 is already published (to 80)"),
    ("add", "tcp:9999:80", "tcp port 9999 is in use where the stack runs: Address already in use"),
    ("remove", "tcp:9090:80", "tcp port 9090 is not published"),
    ("remove", "tcp:8080:81", "tcp port 8080 is published to 80, not 81"),
    ("remove", "udp:8080:80", "udp port 8080 is not published"),
])
def test_a_refused_change_says_why_and_changes_nothing(change, item, message):
    table = PublishTable([("tcp", 8080, 80, 0)])

    def in_use(proto: str, port: int) -> str | None:
        return "Address already in use" if port == 9999 else None
    with pytest.raises(PublishError) as exc:
        table.add(item, in_use) if change == "add" else table.remove(item)
    assert message in str(exc.value)
    assert table.rows() == [("tcp", 8080, 80, 0)]


def test_port_in_use_is_what_a_bind_says():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert publishing.port_in_use("tcp", port) is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bound:
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        assert publishing.port_in_use("udp", port) is not None
    assert publishing.port_in_use("udp", port) is None  # closed: free again


def stack_file(run_dir, stack_id: str) -> None:
    (run_dir / stacklock.STACK_FILE).write_text(json.dumps({"id": stack_id, "supervisor": 1}))


def test_a_restarted_ingress_takes_the_table_its_stack_wrote(tmp_path):
    stack_file(tmp_path, "42:7")
    stack = publishing.stack_id(str(tmp_path))
    assert stack == "42:7"
    table, restored = publishing.load(str(tmp_path), stack, [("tcp", 8080, 80, 0)])
    assert table.rows() == [("tcp", 8080, 80, 0)] and not restored  # nothing saved: USTACK_PUBLISH
    table.add("udp:5353:53", free)
    table.remove("tcp:8080:80")
    publishing.save(str(tmp_path), stack, table)
    again, restored = publishing.load(str(tmp_path), stack, [("tcp", 8080, 80, 0)])
    assert again.rows() == [("udp", 5353, 53, 0)] and restored


def test_a_fresh_start_begins_from_ustack_publish_and_drops_a_killed_stacks_file(tmp_path):
    stack_file(tmp_path, "42:7")
    publishing.save(str(tmp_path), "42:7", PublishTable([("udp", 5353, 53, 0)]))
    stack_file(tmp_path, "43:9")  # a new stack took the run directory over
    table, restored = publishing.load(str(tmp_path), publishing.stack_id(str(tmp_path)), [("tcp", 8080, 80, 0)])
    assert table.rows() == [("tcp", 8080, 80, 0)] and not restored
    assert not (tmp_path / publishing.FILE).exists()
    # No stack file (a process started by hand): never restored.
    publishing.save(str(tmp_path), None, PublishTable([("udp", 5353, 53, 0)]))
    assert publishing.load(str(tmp_path), None, [])[0].rows() == []


def test_a_clean_exit_removes_the_file_and_a_broken_one_is_ignored(tmp_path):
    publishing.save(str(tmp_path), "42:7", PublishTable([("udp", 5353, 53, 0)]))
    publishing.discard(str(tmp_path))
    publishing.discard(str(tmp_path))  # twice: no error
    assert not (tmp_path / publishing.FILE).exists()
    (tmp_path / publishing.FILE).write_text(json.dumps({"stack": "42:7", "table": [["tcp", "x", 80]]}))
    table, restored = publishing.load(str(tmp_path), "42:7", [("tcp", 1, 2, 0)])
    assert table.rows() == [("tcp", 1, 2, 0)] and not restored
