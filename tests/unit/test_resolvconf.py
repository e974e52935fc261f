"""The attached namespace's resolv.conf: written only where none is, removed only if ours."""

from pipeline import resolvconf


def test_written_when_absent_kept_across_a_restart_and_removed_only_if_ours(tmp_path, monkeypatch):
    monkeypatch.setattr(resolvconf, "NETNS_ETC", str(tmp_path))
    assert resolvconf.path_for("/proc/123/ns/net") is None  # unnamed: ip netns exec never reads one
    path = resolvconf.install("/run/netns/box", ["10.0.0.2", "fd00::2"], "/run/ustack/a")
    assert path == str(tmp_path / "box" / "resolv.conf")
    assert open(path).read().splitlines()[1:] == ["nameserver 10.0.0.2", "nameserver fd00::2"]
    assert resolvconf.install("/run/netns/box", ["10.0.0.2"], "/run/ustack/a") == path  # a restarted ingress
    assert resolvconf.install("/run/netns/box", ["10.0.0.2"], "/run/ustack/b") is None  # another stack's
    resolvconf.remove(path, "/run/ustack/b")
    assert (tmp_path / "box" / "resolv.conf").exists()
    resolvconf.remove(path, "/run/ustack/a")
    assert not (tmp_path / "box").exists()


def test_the_operators_own_file_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(resolvconf, "NETNS_ETC", str(tmp_path))
    (tmp_path / "box").mkdir()
    (tmp_path / "box" / "resolv.conf").write_text("nameserver 192.0.2.53\n")
    assert resolvconf.install("/run/netns/box", ["10.0.0.2"], "/run/ustack/a") is None
    resolvconf.remove(str(tmp_path / "box" / "resolv.conf"), "/run/ustack/a")
    assert (tmp_path / "box" / "resolv.conf").read_text() == "nameserver 192.0.2.53\n"
