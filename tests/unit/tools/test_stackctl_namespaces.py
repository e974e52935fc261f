"""stackctl in front of a stack attached to many namespaces: which stack, which namespace
(--ns by name, path or inode), the per-namespace filters and tables, the command line."""

import argparse
import os

import pytest

from pipeline.flow import Flow
from pipeline.tools import ctl

A, B = b"\x0a\x00\x00\x01", b"\xc0\x00\x02\x0a"  # 10.0.0.1 (every namespace's own), 192.0.2.10


def _rows(tmp_path, *names):
    """Namespaces as ingress lists them; files stand in for namespaces (their inodes name them)."""
    rows = []
    for i, name in enumerate(names):
        path = tmp_path / name
        path.write_text("")
        rows.append({"index": i, "name": name, "path": str(path), "device": "ustack0"})
    return rows


def test_a_stack_is_found_by_any_namespace_it_serves():
    many = {"run_dir": "/run/ustack/1-ustack0-attached-2", "netns": 1, "device": "ustack0",
            "attached": [{"path": f"/run/netns/n{i}", "netns": i} for i in (2, 3, 4)]}
    other = {"run_dir": "/run/ustack/1-ustack0-attached-9", "netns": 1, "device": "ustack0",
             "attached": [{"path": "/run/netns/n9", "netns": 9}]}
    for served in (2, 3, 4):
        assert ctl.pick_stack([other, many], served, None) is many
    assert ctl.pick_stack([other, many], 9, None) is other
    assert ctl.pick_stack([other, many], 5, None) is None
    gone = {**many, "attached": [{"path": "/run/netns/n2", "netns": None}]}  # its one namespace deleted
    assert ctl.pick_stack([gone], 2, None) is None


def test_ns_is_resolved_by_name_path_or_the_same_namespace_under_another_path(tmp_path):
    rows = _rows(tmp_path, "a", "b")
    assert ctl.resolve_namespace(rows, "a") == "a"
    assert ctl.resolve_namespace(rows, str(tmp_path / "b")) == "b"
    os.link(tmp_path / "b", tmp_path / "b-again")  # e.g. /proc/PID/ns/net of a process in b
    assert ctl.resolve_namespace(rows, str(tmp_path / "b-again")) == "b"
    assert ctl.resolve_namespace(rows, "c") is None
    assert ctl.resolve_namespace(rows, str(tmp_path / "nothing")) is None
    assert ctl.resolve_namespace([], "a") is None


def test_namespace_of_names_what_is_attached_when_it_is_not(monkeypatch, tmp_path):
    rows = _rows(tmp_path, "a", "b")
    monkeypatch.setattr(ctl, "namespaces", lambda cfg: rows)
    assert ctl.namespace_of(None, "b") == "b"
    with pytest.raises(SystemExit, match=r"not attached to 'c' \(attached: a, b\)"):
        ctl.namespace_of(None, "c")


def _args(**kw):
    base = dict(state=None, addr=None, proc=None, event=None, level="debug", flow=None)
    return argparse.Namespace(**{**base, **kw})


def test_conns_and_logs_keep_one_namespaces_records():
    conns = [{"state": "ESTABLISHED", "local": "10.0.0.2:8000", "remote": "10.0.0.1:40000", "ns": "a"},
             {"state": "ESTABLISHED", "local": "10.0.0.2:8000", "remote": "10.0.0.1:40000", "ns": "b"}]
    assert [r["ns"] for r in conns if ctl.conn_filter(_args(), "b")(r)] == ["b"]
    assert len([r for r in conns if ctl.conn_filter(_args())(r)]) == 2
    assert [r["ns"] for r in conns if ctl.conn_filter(_args(addr=":40000"), "a")(r)] == ["a"]
    records = [{"event": "relay_flow", "src": "10.0.0.1", "ns": "a"}, {"event": "relay_flow", "src": "10.0.0.1", "ns": "b"},
               {"event": "worker_joined"}, {"event": "namespace_detached", "ns": "b", "reason": "stackctl"}]
    keep = ctl.log_filter(_args(), "b")
    assert [r["event"] for r in records if keep(r)] == ["relay_flow", "namespace_detached"]
    assert len([r for r in records if ctl.log_filter(_args())(r)]) == 4


def test_flows_table_and_json_say_the_namespace():
    flow = Flow(A, 40000, 8000)
    relayed = Flow(A, 40000, 7, B)
    rows = [(flow, "tcp.1", "b"), (flow, "tcp.2", "a"), (relayed, "tcp.1", "a")]
    assert ctl.flow_rows(rows) == [
        {"remote": "10.0.0.1", "rport": 40000, "lport": 8000, "worker": "tcp.1", "ns": "b"},
        {"remote": "10.0.0.1", "rport": 40000, "lport": 8000, "worker": "tcp.2", "ns": "a"},
        {"remote": "10.0.0.1", "rport": 40000, "lport": 7, "worker": "tcp.1", "local": "192.0.2.10", "ns": "a"}]
    lines = ctl.render_flows(rows).splitlines()
    assert lines[0].split() == ["remote", "local", "port", "worker", "namespace"]
    assert [line.split()[-1] for line in lines[1:]] == ["a", "a", "b"]  # by namespace, then worker
    assert "192.0.2.10:7" in lines[1]
    plain = ctl.render_flows([(flow, "tcp.1", "")])  # not attached: no namespace column
    assert "namespace" not in plain and plain.splitlines()[1].split() == ["10.0.0.1:40000", "8000", "tcp.1"]
    assert ctl.flows_per_namespace(rows) == {"b": 1, "a": 2}


def test_the_namespaces_table(tmp_path):
    rows = ctl.namespace_rows(list(reversed(_rows(tmp_path, "a", "b", "c"))), {"a": 2, "c": 1})
    assert [(r["index"], r["name"], r["flows"]) for r in rows] == [(0, "a", 2), (1, "b", 0), (2, "c", 1)]
    lines = ctl.render_namespaces(rows).splitlines()
    assert lines[0].split() == ["index", "namespace", "device", "flows", "path"]
    assert lines[2].split() == ["1", "b", "ustack0", "0", str(tmp_path / "b")]
    assert ctl.render_namespaces([]) == "attached to no namespace"
    counted = ctl.namespace_rows([{"index": 0, "name": "a", "path": "/run/netns/a", "device": "ustack0", "flows": 7}],
                                 {"a": 2})
    assert counted[0]["flows"] == 7  # ingress's own count, when it gives one


def test_published_ports_show_their_namespace():
    rows = [{"proto": "tcp", "port": 18000, "to_port": 8000, "ns": "a"},
            {"proto": "udp", "port": 5353, "to_port": 53, "ns": "b"}]
    lines = ctl.render_published(rows).splitlines()
    assert lines[0].split() == ["proto", "port", "to", "port", "namespace"]
    assert lines[2].split() == ["udp", "5353", "53", "b"]
    assert "namespace" not in ctl.render_published([{"proto": "tcp", "port": 1, "to_port": 2}])


def test_publish_sends_the_namespace_it_names(monkeypatch, tmp_path):
    sent = []

    class Reply:
        def __init__(self, payload):
            self.payload = payload

    def request(command, cfg, *args):
        sent.append((command, args))
        if command == "namespaces":
            return Reply({"namespaces": _rows(tmp_path, "a", "b")})
        return Reply({"changed": {"proto": "tcp", "port": 18000, "to_port": 8000, "ns": "b"}})

    monkeypatch.setattr(ctl, "request", request)
    args = ctl.parser().parse_args(["publish", "add", "tcp:18000:8000", "--ns", str(tmp_path / "b")])
    assert ctl.publish(None, args) == 0
    assert sent[-1] == ("publish_add", ("tcp:18000:8000", "b"))  # the path named b by its name
    assert ctl.publish(None, ctl.parser().parse_args(["publish", "remove", "tcp:18000:8000"])) == 0
    assert sent[-1] == ("publish_remove", ("tcp:18000:8000",))  # no --ns: ingress takes the first


def test_detach_by_path_sends_the_stacks_name(monkeypatch, tmp_path, capsys):
    sent = []
    rows = _rows(tmp_path, "a", "b")

    class Reply:
        def __init__(self, payload):
            self.payload = payload

    def request(command, cfg, *args):
        sent.append((command, args))
        return Reply({"namespaces": rows if command == "namespaces" else rows[:1]})

    monkeypatch.setattr(ctl, "request", request)
    assert ctl.attach_or_detach(None, ctl.parser().parse_args(["detach", str(tmp_path / "b")])) == 0
    assert sent[-1] == ("detach", ("b",))
    out = capsys.readouterr()
    assert "detached" in out.err and out.out.splitlines()[1].split()[:2] == ["0", "a"]
    assert ctl.attach_or_detach(None, ctl.parser().parse_args(["attach", "/proc/123/ns/net"])) == 0
    assert sent[-1] == ("attach", ("/proc/123/ns/net",))  # attach: as given, ingress resolves it


def test_command_line():
    p = ctl.parser()
    assert p.parse_args(["--netns", "b", "namespaces", "--json"]).json
    assert p.parse_args(["attach", "n21"]).namespace == "n21"
    assert p.parse_args(["conns", "--ns", "b"]).ns == "b"
    assert p.parse_args(["flows", "--ns", "b", "--json"]).ns == "b"
    assert p.parse_args(["logs", "--ns", "b", "-f"]).ns == "b"
    assert p.parse_args(["publish", "list", "--ns", "b"]).ns == "b"
    assert p.parse_args(["publish", "add", "tcp:1:2"]).ns is None
    with pytest.raises(SystemExit):
        p.parse_args(["detach"])


def test_list_shortens_many_attached_namespaces():
    rows = [{"run_dir": "/run/ustack/1-ustack0-attached-2", "device": "ustack0", "netns": {"name": "host"},
             "attached": [{"name": f"n{i}"} for i in range(1, 21)], "supervisor": 42, "uptime": 3.0}]
    line = ctl.render_stacks(rows).splitlines()[1]
    assert "n1,n2,n3 +17 more" in line and "n4" not in line


def test_status_names_the_namespaces():
    status = {"address": "10.0.0.2", "address6": "fd00::2", "device": "ustack0", "uptime": 1, "epoch": "e",
              "processes": [], "namespaces": [{"index": 0, "name": "a", "path": "/run/netns/a", "device": "ustack0"},
                                              {"index": 1, "name": "b", "path": "/run/netns/b", "device": "ustack0"}]}
    assert "attached to 2 namespaces: a, b" in ctl.render(status)
