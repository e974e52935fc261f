import collections
import os

from pipeline.membership import Membership


def test_join_expire_and_pick():
    ms = Membership(timeout=3.0)
    assert ms.pick("tcp", b"k") is None
    assert ms.seen("tcp.1", "tcp", 0.0, seq=0) == "joined"
    assert ms.seen("tcp.1", "tcp", 1.0, seq=1) is None
    assert ms.seen("tcp.1", "tcp", 2.0, seq=0) == "restarted"  # a new process under the old name
    assert ms.pick("tcp", b"k") == "tcp.1"
    assert ms.expire(4.9) == []
    assert ms.expire(5.1) == ["tcp.1"]
    assert not ms.has_role("tcp")


def test_rendezvous_spreads_and_moves_only_the_leavers_share():
    ms = Membership(timeout=3.0)
    for i in range(1, 5):
        ms.seen(f"tcp.{i}", "tcp", 0.0)
    keys = [os.urandom(10) for _ in range(4000)]
    before = {k: ms.pick("tcp", k) for k in keys}
    share = collections.Counter(before.values())
    assert all(n > 4000 / 4 / 2 for n in share.values()), share
    ms.remove("tcp.2")
    after = {k: ms.pick("tcp", k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "tcp.2" for k in moved)


def test_roles_are_separate():
    ms = Membership(timeout=3.0)
    ms.seen("udp.1", "udp", 0.0)
    assert ms.pick("tcp", b"") is None and ms.pick("udp", b"") == "udp.1"


def test_steered_ports_are_those_live_workers_announce():
    ms = Membership(timeout=3.0)
    assert ms.steered_ports("tcp") == frozenset() and ms.pick_steered("tcp", 5201, b"k") is None
    ms.seen("tcp.1", "tcp", 0.0, seq=0, steered=frozenset({5201}))
    ms.seen("tcp.2", "tcp", 0.0, seq=0)
    ms.seen("udp.1", "udp", 0.0, seq=0, steered=frozenset({53}))
    assert ms.steered_ports("tcp") == {5201} and ms.steered_ports("udp") == {53}
    assert {ms.pick_steered("tcp", 5201, os.urandom(6)) for _ in range(50)} == {"tcp.1"}  # only who announced it
    assert ms.pick_steered("tcp", 53, b"k") is None  # a port of another role
    ms.seen("tcp.2", "tcp", 1.0, seq=1, steered=frozenset({5201}))  # announced later: counted from then
    assert {ms.pick_steered("tcp", 5201, os.urandom(6)) for _ in range(50)} == {"tcp.1", "tcp.2"}
    ms.seen("tcp.1", "tcp", 1.0, seq=1)  # no longer
    ms.seen("tcp.2", "tcp", 3.5, seq=2, steered=frozenset({5201}))
    assert ms.expire(4.1) == ["tcp.1", "udp.1"]
    assert ms.steered_ports("tcp") == {5201} and ms.steered_ports("udp") == frozenset()
    assert ms.pick_steered("tcp", 5201, b"k") == "tcp.2"


def test_steered_pick_is_the_rendezvous_pick_among_the_same_workers():
    ms = Membership(timeout=3.0)
    for i in range(1, 5):
        ms.seen(f"tcp.{i}", "tcp", 0.0, steered=frozenset({5201}))
    keys = [os.urandom(6) for _ in range(200)]
    assert [ms.pick_steered("tcp", 5201, k) for k in keys] == [ms.pick("tcp", k) for k in keys]
